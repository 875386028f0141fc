//! `kiln serve`: wiring for kiln-server.
//!
//! The runner side (backend, session limit, VM spec) is resolved exactly as for `kiln run`
//! (`[runner]`, `KILN_*`), the server side from `[server]`, `KILN_LISTEN`/`--listen`, and the
//! secrets from the environment or `<NAME>_FILE` files. One `kiln serve` owns its database: it
//! holds an exclusive lock on `<database>.lock` (SQLite) or a PostgreSQL advisory lock, so at
//! start every run still marked running was left by a process that is gone (restart recovery
//! relies on that).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use clap::{Args, FromArgMatches};
use kiln_runner::executor::WorkflowExecutor;
use kiln_runner::session::{SessionConfig, SessionManager};
use kiln_server::{Runner, Secrets, Server, ServerConfig};
use kiln_store::{PostgresStore, RunStore, SqliteStore};
use kiln_vm::select_backend;

use crate::args::{RunArgs, ServeArgs};
use crate::config::{Dirs, FileConfig, Settings};
use crate::{Exit, exit, usage};

/// `kiln serve`.
pub async fn serve(file: &FileConfig, args: ServeArgs) -> Result<u8, Exit> {
    let section = file.server();
    // The runner settings `kiln run` would use with no flags (file < KILN_* environment).
    let run_args = RunArgs::from_arg_matches(
        &RunArgs::augment_args(clap::Command::new("serve"))
            .try_get_matches_from(["serve"])
            .map_err(|e| usage(anyhow!("{e}")))?,
    )
    .map_err(|e| usage(anyhow!("{e}")))?;
    let settings = Settings::resolve(file, &run_args).map_err(usage)?;

    let listen: SocketAddr = args
        .listen
        .as_deref()
        .or(section.listen.as_deref())
        .unwrap_or("127.0.0.1:8080")
        .parse()
        .map_err(|e| usage(anyhow!("--listen: {e}")))?;
    let dirs = Dirs::from_env();
    let database = database_choice(section.database.as_deref(), &dirs).map_err(usage)?;
    let database_password = secret("KILN_DATABASE_PASSWORD").map_err(usage)?;
    if let (Database::Sqlite(_), Some(_)) = (&database, &database_password) {
        return Err(usage(anyhow!(
            "KILN_DATABASE_PASSWORD is set, but [server] database is SQLite (it takes none)"
        )));
    }
    let (store, _lock, database_name) = open_database(&database, database_password.as_deref())
        .await
        .map_err(|e| Exit::new(exit::INFRA, e))?;

    let mut config = ServerConfig::new(listen, dirs.data.join("server"));
    if let Some(url) = &section.public_url {
        config.public_url = url.trim_end_matches('/').to_owned();
    }
    if let Some(url) = &section.github_api_url {
        config.github_api_url = url.trim_end_matches('/').to_owned();
    }
    config.gitea_api_url = section
        .gitea_api_url
        .as_ref()
        .map(|u| u.trim_end_matches('/').to_owned());
    config.clone_url_rewrite = section
        .clone_url_rewrite
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    config.workers = section.workers.unwrap_or(settings.max_sessions).max(1);
    config.requeue_interrupted = section.requeue_interrupted.unwrap_or(false);
    config.secrets = secrets(section.github_app_id).map_err(usage)?;
    if config.secrets.github_webhook.is_none() && config.secrets.gitea_webhook.is_none() {
        eprintln!(
            "warning: neither KILN_GITHUB_WEBHOOK_SECRET nor KILN_GITEA_WEBHOOK_SECRET is set: \
             every webhook will be refused"
        );
    }
    if config.secrets.api_token.is_none() {
        eprintln!(
            "warning: KILN_API_TOKEN is not set: the API, the web UI and /metrics refuse every request"
        );
    }
    let grace = Duration::from_secs(section.shutdown_grace_seconds.unwrap_or(60));

    let backend_config = file
        .backend_config(&dirs, settings.boot_timeout)
        .map_err(usage)?;
    let selection = select_backend(settings.backend, &backend_config)
        .await
        .map_err(|e| Exit::new(exit::INFRA, e))?;
    if !selection.provider.isolates() {
        eprintln!(
            "warning: the {} backend does NOT isolate: workflow steps of every webhook run \
             directly on this host ({})",
            selection.provider.name(),
            selection.reason
        );
    } else {
        eprintln!(
            "Backend {}: {}",
            selection.provider.name(),
            selection.reason
        );
    }
    let sessions = SessionManager::new(
        selection.provider.clone(),
        SessionConfig {
            max_sessions: settings.max_sessions,
            on_limit: settings.on_limit,
            ..SessionConfig::default()
        },
    );
    let runner = Runner {
        executor: WorkflowExecutor::new(sessions.clone()),
        isolation: settings.isolation,
        spec: settings.spec.clone(),
        vms: Some(settings.vms.clone()),
    };
    let server = Server::start(config, store, runner)
        .await
        .map_err(|e| Exit::new(exit::INFRA, e))?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("Cannot listen on {listen}"))
        .map_err(|e| Exit::new(exit::INFRA, e))?;
    eprintln!(
        "kiln serve: listening on http://{} (database {})",
        listener.local_addr().unwrap_or(listen),
        database_name
    );
    server
        .serve(listener, shutdown_signal(), grace)
        .await
        .map_err(|e| Exit::new(exit::INFRA, e))?;
    Ok(exit::SUCCESS)
}

/// Ctrl-C or SIGTERM (systemd's stop).
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        () = term => {}
    }
}

/// Where the runs are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Database {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL URL.
    Postgres(String),
}

fn database_choice(configured: Option<&str>, dirs: &Dirs) -> anyhow::Result<Database> {
    match configured.map(str::trim) {
        None | Some("") => Ok(Database::Sqlite(dirs.data.join("kiln.db"))),
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            Ok(Database::Postgres(url.to_owned()))
        }
        Some(url) if url.contains("://") && !url.starts_with("sqlite://") => bail!(
            "[server] database: `{}` is neither a SQLite path nor a postgres:// URL",
            redact(url)
        ),
        Some(url) => Ok(Database::Sqlite(PathBuf::from(
            url.strip_prefix("sqlite://").unwrap_or(url),
        ))),
    }
}

/// A database URL with any password in it replaced by `***`, for messages.
fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    match rest[..authority_end].rsplit_once('@') {
        Some((userinfo, host)) => match userinfo.split_once(':') {
            Some((user, _)) => format!("{scheme}://{user}:***@{host}{}", &rest[authority_end..]),
            None => url.to_owned(),
        },
        None => url.to_owned(),
    }
}

/// What holds a database for this process: the lock file, or the PostgreSQL session.
enum DatabaseLock {
    Sqlite {
        _file: std::fs::File,
    },
    Postgres {
        _session: kiln_store::PostgresOwnerLock,
    },
}

/// Opens the store and takes its owner lock; returns both and a name for messages.
async fn open_database(
    database: &Database,
    password: Option<&str>,
) -> anyhow::Result<(Arc<dyn RunStore>, DatabaseLock, String)> {
    match database {
        Database::Sqlite(path) => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("Cannot create {}", parent.display()))?;
            }
            let lock = lock_database(path)?;
            let store = SqliteStore::open(path)
                .await
                .with_context(|| format!("Cannot open the run database {}", path.display()))?;
            Ok((
                Arc::new(store),
                DatabaseLock::Sqlite { _file: lock },
                path.display().to_string(),
            ))
        }
        Database::Postgres(url) => {
            let name = redact(url);
            let store = PostgresStore::connect(url, password)
                .await
                .with_context(|| format!("Cannot open the run database {name}"))?;
            let lock = store
                .lock_owner()
                .await
                .with_context(|| format!("Cannot lock the run database {name}"))?
                .ok_or_else(|| anyhow!("{name} is in use by another kiln serve"))?;
            Ok((
                Arc::new(store),
                DatabaseLock::Postgres { _session: lock },
                name,
            ))
        }
    }
}

/// Holds an exclusive lock on `<database>.lock` for as long as it lives.
fn lock_database(database: &Path) -> anyhow::Result<std::fs::File> {
    let mut name = database.as_os_str().to_owned();
    name.push(".lock");
    let path = PathBuf::from(name);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("Cannot open {}", path.display()))?;
    rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(
        |_| {
            anyhow!(
                "{} is in use by another kiln serve (lock {})",
                database.display(),
                path.display()
            )
        },
    )?;
    Ok(file)
}

/// `NAME` from the environment, or the contents of the file `NAME_FILE` names (one trailing
/// newline removed). Both set is an error.
fn secret(name: &str) -> anyhow::Result<Option<String>> {
    let direct = std::env::var(name).ok().filter(|v| !v.is_empty());
    let file_var = format!("{name}_FILE");
    let from_file = std::env::var_os(&file_var).filter(|v| !v.is_empty());
    match (direct, from_file) {
        (Some(_), Some(_)) => bail!("Both {name} and {file_var} are set; set one"),
        (Some(v), None) => Ok(Some(v)),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("{file_var}: cannot read {}", path.to_string_lossy()))?;
            let value = text.strip_suffix('\n').unwrap_or(&text);
            let value = value.strip_suffix('\r').unwrap_or(value);
            if value.is_empty() {
                bail!("{file_var}: {} is empty", path.to_string_lossy());
            }
            Ok(Some(value.to_owned()))
        }
        (None, None) => Ok(None),
    }
}

fn secrets(github_app_id: Option<u64>) -> anyhow::Result<Secrets> {
    let app_id = std::env::var("KILN_GITHUB_APP_ID")
        .ok()
        .filter(|v| !v.is_empty())
        .or_else(|| github_app_id.map(|id| id.to_string()));
    Ok(Secrets {
        github_app_id: app_id,
        github_app_private_key: secret("KILN_GITHUB_APP_PRIVATE_KEY")?,
        github_webhook: secret("KILN_GITHUB_WEBHOOK_SECRET")?,
        gitea_webhook: secret("KILN_GITEA_WEBHOOK_SECRET")?,
        github_token: secret("KILN_GITHUB_TOKEN")?,
        gitea_token: secret("KILN_GITEA_TOKEN")?,
        api_token: secret("KILN_API_TOKEN")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn database_defaults_to_sqlite_in_the_data_dir_and_takes_postgres_urls() {
        let dirs = Dirs {
            data: PathBuf::from("/data"),
            runtime: PathBuf::from("/run"),
        };
        assert_eq!(
            database_choice(None, &dirs).expect("path"),
            Database::Sqlite(PathBuf::from("/data/kiln.db"))
        );
        assert_eq!(
            database_choice(Some("sqlite:///x/y.db"), &dirs).expect("path"),
            Database::Sqlite(PathBuf::from("/x/y.db"))
        );
        assert_eq!(
            database_choice(Some("postgres://kiln@h/db"), &dirs).expect("url"),
            Database::Postgres("postgres://kiln@h/db".to_owned())
        );
        let err = database_choice(Some("mysql://u:secret@h/db"), &dirs).expect_err("refused");
        assert!(!err.to_string().contains("secret"), "{err}");
    }

    #[test]
    fn passwords_in_database_urls_are_redacted() {
        assert_eq!(
            redact("postgres://kiln:hunter2@db:5432/kiln?sslmode=require"),
            "postgres://kiln:***@db:5432/kiln?sslmode=require"
        );
        assert_eq!(redact("postgres://kiln@db/kiln"), "postgres://kiln@db/kiln");
        assert_eq!(
            redact("postgres:///kiln?host=/run/pg"),
            "postgres:///kiln?host=/run/pg"
        );
    }

    #[test]
    fn a_second_lock_on_the_same_database_is_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("kiln.db");
        let first = lock_database(&db).expect("first lock");
        assert!(lock_database(&db).is_err());
        drop(first);
        lock_database(&db).expect("lock after release");
    }
}
