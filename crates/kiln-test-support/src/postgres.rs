//! A private, throwaway PostgreSQL cluster for tests.
//!
//! The first call to [`cluster`] in a test process creates one: `initdb` into a fresh directory
//! under the temp dir, then `pg_ctl start` with no TCP listener (clients use the Unix socket in
//! that directory, so parallel test processes never fight over a port) and password
//! authentication (so the tests exercise the password path kiln uses). PostgreSQL refuses to run
//! as root, so when the tests run as root (CI does) the server runs as the `postgres` user that
//! Debian's package creates, through `runuser`.
//!
//! The cluster is stopped and its directory removed when the test process exits, however it
//! exits: a small supervisor shell waits for the end of a pipe the test process holds open, then
//! runs `pg_ctl stop -m immediate` and `rm -rf`.
//!
//! The server binaries are looked for in `KILN_TEST_PG_BIN`, then Debian's
//! `/usr/lib/postgresql/<version>/bin` (newest first), then `PATH`. When none is found the test
//! fails with a message saying what to install; it never passes silently.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// The cluster's superuser.
pub const USER: &str = "kiln";

/// A running throwaway cluster.
pub struct PgCluster {
    root: PathBuf,
    bin: PathBuf,
    password: String,
    /// Holding its stdin open keeps the supervisor waiting; the process's exit closes it.
    _supervisor: Mutex<Child>,
}

/// The test process's cluster, started on first use. Panics (failing the test) with the reason
/// when PostgreSQL is missing or cannot start.
pub fn cluster() -> &'static PgCluster {
    static CLUSTER: OnceLock<PgCluster> = OnceLock::new();
    CLUSTER.get_or_init(|| match PgCluster::start() {
        Ok(cluster) => cluster,
        Err(message) => panic!("Cannot start a test PostgreSQL cluster: {message}"),
    })
}

/// The directory holding `initdb`, `pg_ctl` and `postgres`.
fn find_bin() -> Result<PathBuf, String> {
    let has_server = |dir: &Path| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file();
    if let Some(dir) = std::env::var_os("KILN_TEST_PG_BIN").map(PathBuf::from) {
        return if has_server(&dir) {
            Ok(dir)
        } else {
            Err(format!(
                "KILN_TEST_PG_BIN={} has no initdb and pg_ctl",
                dir.display()
            ))
        };
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((version, entry.path().join("bin")))
        })
        .filter(|(_, dir)| has_server(dir))
        .collect();
    versions.sort();
    if let Some((_, dir)) = versions.pop() {
        return Ok(dir);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        if has_server(&dir) {
            // Debian links the binaries from /usr/local/bin or similar: use their real home so
            // `pg_ctl` finds the matching `postgres`.
            let real = std::fs::canonicalize(dir.join("initdb"))
                .ok()
                .and_then(|p| p.parent().map(Path::to_path_buf))
                .unwrap_or(dir);
            return Ok(real);
        }
    }
    Err(
        "PostgreSQL's server binaries (initdb, pg_ctl, postgres) were not found in \
         KILN_TEST_PG_BIN, /usr/lib/postgresql/*/bin or PATH. Install Debian's `postgresql` \
         package (scripts/test does so when it is missing)."
            .to_owned(),
    )
}

/// `uid:gid` of a user, from `id`.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| -> Option<u32> {
        let out = Command::new("id").args([flag, user]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    Some((id("-u")?, id("-g")?))
}

fn run(command: &mut Command, what: &str) -> Result<(), String> {
    let out = command
        .output()
        .map_err(|e| format!("{what}: cannot run: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl PgCluster {
    fn start() -> Result<PgCluster, String> {
        let bin = find_bin()?;
        let as_root = std::fs::metadata("/proc/self")
            .map_err(|e| e.to_string())?
            .uid()
            == 0;
        // As root, every server-side command runs as `postgres`.
        let owner = if as_root {
            Some(user_ids("postgres").ok_or(
                "running as root (PostgreSQL refuses to), and there is no `postgres` user to run \
                 the server as; Debian's `postgresql` package creates it",
            )?)
        } else {
            None
        };
        let server_command = |program: &str| -> Command {
            if owner.is_some() {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]).arg(bin.join(program));
                c
            } else {
                Command::new(bin.join(program))
            }
        };

        static COUNT: AtomicUsize = AtomicUsize::new(0);
        // Short: the socket path must fit in 107 bytes.
        let root = std::env::temp_dir().join(format!(
            "kiln-pg-{}-{}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir(&root).map_err(|e| format!("mkdir {}: {e}", root.display()))?;
        let password = format!(
            "pw-{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or_default()
        );
        let pwfile = root.join("pwfile");
        std::fs::write(&pwfile, format!("{password}\n")).map_err(|e| e.to_string())?;
        for path in [&root, &pwfile] {
            if let Some((uid, gid)) = owner {
                std::os::unix::fs::chown(path, Some(uid), Some(gid))
                    .map_err(|e| format!("chown {}: {e}", path.display()))?;
            }
        }
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
            .map_err(|e| e.to_string())?;

        // The supervisor first, so that even a failed start is cleaned up.
        let run_as = if owner.is_some() {
            "runuser -u postgres --"
        } else {
            ""
        };
        let mut supervisor = Command::new("sh")
            .arg("-c")
            .arg(
                "trap '' INT TERM HUP; cat >/dev/null; \
                 $KILN_PG_RUN_AS \"$KILN_PG_BIN/pg_ctl\" -D \"$KILN_PG_ROOT/data\" -m immediate \
                 stop >/dev/null 2>&1; rm -rf \"$KILN_PG_ROOT\"",
            )
            .env("KILN_PG_RUN_AS", run_as)
            .env("KILN_PG_BIN", &bin)
            .env("KILN_PG_ROOT", &root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("cannot start the cleanup supervisor: {e}"))?;
        if let Some(stdin) = supervisor.stdin.as_mut() {
            // Nothing is ever written; this only proves the pipe is open.
            let _ = stdin.flush();
        }

        run(
            server_command("initdb")
                .arg("-D")
                .arg(root.join("data"))
                .args([
                    "-U",
                    USER,
                    "--auth=scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-locale",
                ])
                .arg(format!("--pwfile={}", pwfile.display())),
            "initdb",
        )?;
        let options = format!(
            "-c listen_addresses='' -k {} -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off",
            root.display()
        );
        let started = run(
            server_command("pg_ctl")
                .arg("-D")
                .arg(root.join("data"))
                .arg("-l")
                .arg(root.join("server.log"))
                .args(["-w", "-t", "120", "-o", &options, "start"]),
            "pg_ctl start",
        );
        if let Err(e) = started {
            let log = std::fs::read_to_string(root.join("server.log")).unwrap_or_default();
            return Err(format!("{e}\nserver log:\n{log}"));
        }
        Ok(PgCluster {
            root,
            bin,
            password,
            _supervisor: Mutex::new(supervisor),
        })
    }

    /// The directory holding the server's Unix socket.
    pub fn socket_dir(&self) -> &Path {
        &self.root
    }

    /// The superuser's password (not in [`PgCluster::url`]).
    pub fn password(&self) -> &str {
        &self.password
    }

    /// A connection URL for `database`, without the password.
    pub fn url(&self, database: &str) -> String {
        format!(
            "postgres://{USER}@localhost/{database}?host={}",
            self.root.display()
        )
    }

    /// Creates a new, empty database and returns its name.
    pub fn create_database(&self) -> String {
        static COUNT: AtomicUsize = AtomicUsize::new(0);
        let name = format!("kiln_test_{}", COUNT.fetch_add(1, Ordering::SeqCst));
        let created = run(
            Command::new(self.bin.join("createdb"))
                .arg("-h")
                .arg(&self.root)
                .args(["-U", USER, &name])
                .env("PGPASSWORD", &self.password),
            "createdb",
        );
        if let Err(e) = created {
            panic!("Cannot create test database {name}: {e}");
        }
        name
    }
}
