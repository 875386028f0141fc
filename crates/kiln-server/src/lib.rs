//! kiln's service mode: webhooks in, runs in microVMs, statuses out.
//!
//! ```text
//! POST /webhooks/github|gitea ─ verify HMAC ─ record delivery (de-dup) ─ 202   (milliseconds)
//!        │ (intake task, also after a restart: every pending delivery)
//!        ▼
//! git fetch of the exact commit ─ .github/workflows/* ─ Triggers::matches ─ enqueue 1 run/workflow
//!        │                                                    └─ outbox: status `pending`
//!        ▼ (N workers = the session limit)
//! claim_next ─ checkout ─ WorkflowExecutor::execute ─ RunEvents → store (+ SSE, metrics)
//!        └─ finish ─ outbox: `success|failure|error` ─ reporter (retry with backoff) ─ forge API
//! ```
//! With a GitHub App configured, GitHub runs get check runs per job instead of commit statuses
//! ([`checks`], authenticated by [`github_app`]).
//! Everything a restart must not lose goes through the store before it is acknowledged:
//! deliveries before the 202, runs before their `pending` status, reports before they are sent.
//! At start, runs a dead process left `running` are finished as `interrupted` (or re-queued) and
//! reported; their VMs died with that process (QEMU runs with `PR_SET_PDEATHSIG`).
//!
//! Modules: [`signature`] (HMAC), [`webhook`] (payloads to [`webhook::Trigger`]s), [`git`]
//! (fetching commits), [`intake`] (triggers to runs), [`worker`] (executing runs),
//! [`report`] (the outbox's reporter; commit statuses), [`checks`] (check runs),
//! [`github_app`] (App JWT and installation tokens), [`api`] (REST), [`ui`] (HTML pages),
//! [`metrics`].

#![warn(missing_docs)]

pub mod api;
pub mod checks;
pub mod git;
pub mod github_app;
pub mod intake;
pub mod metrics;
pub mod report;
pub mod signature;
pub mod ui;
pub mod webhook;
pub mod worker;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use kiln_runner::executor::{Isolation, WorkflowExecutor};
use kiln_store::RunStore;
use kiln_vm::VmSpec;
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// Secrets, read from the environment or files by the caller (never from argv).
#[derive(Clone, Default)]
pub struct Secrets {
    /// `KILN_GITHUB_WEBHOOK_SECRET`: without it, `/webhooks/github` answers 401.
    pub github_webhook: Option<String>,
    /// `KILN_GITEA_WEBHOOK_SECRET`: without it, `/webhooks/gitea` answers 401.
    pub gitea_webhook: Option<String>,
    /// `KILN_GITHUB_TOKEN`: fetches and GitHub commit statuses.
    pub github_token: Option<String>,
    /// `KILN_GITEA_TOKEN`: fetches and Gitea commit statuses.
    pub gitea_token: Option<String>,
    /// `KILN_API_TOKEN`: the bearer token for the API, the UI and `/metrics`.
    pub api_token: Option<String>,
    /// `KILN_GITHUB_APP_ID` (or `[server] github_app_id`): with the private key, GitHub runs
    /// get check runs instead of commit statuses.
    pub github_app_id: Option<String>,
    /// `KILN_GITHUB_APP_PRIVATE_KEY`: the App's PEM private key.
    pub github_app_private_key: Option<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let set = |s: &Option<String>| if s.is_some() { "set" } else { "unset" };
        f.debug_struct("Secrets")
            .field("github_webhook", &set(&self.github_webhook))
            .field("gitea_webhook", &set(&self.gitea_webhook))
            .field("github_token", &set(&self.github_token))
            .field("gitea_token", &set(&self.gitea_token))
            .field("api_token", &set(&self.api_token))
            .field("github_app_id", &self.github_app_id)
            .field("github_app_private_key", &set(&self.github_app_private_key))
            .finish()
    }
}

/// The server's checked configuration.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where to listen.
    pub listen: SocketAddr,
    /// The base URL people reach the UI at (for `target_url` links), without a trailing `/`.
    pub public_url: String,
    /// GitHub's REST API base (GHES: `https://HOST/api/v3`).
    pub github_api_url: String,
    /// Gitea's API base (`https://HOST/api/v1`); `None`: derived from each repository's URL.
    pub gitea_api_url: Option<String>,
    /// Clone URL prefix rewrites (mirrors, tests).
    pub clone_url_rewrite: Vec<(String, String)>,
    /// Where repository caches live.
    pub work_dir: PathBuf,
    /// How many runs execute at once.
    pub workers: usize,
    /// Re-queue runs interrupted by a restart instead of failing them.
    pub requeue_interrupted: bool,
    /// Largest accepted webhook body.
    pub max_body_bytes: usize,
    /// Secrets.
    pub secrets: Secrets,
}

impl ServerConfig {
    /// Defaults around `listen` and `work_dir`: GitHub's public API, 4 workers, a 25 MiB body
    /// limit (GitHub's payload cap), interrupted runs failed.
    pub fn new(listen: SocketAddr, work_dir: PathBuf) -> ServerConfig {
        ServerConfig {
            public_url: format!("http://{listen}"),
            listen,
            github_api_url: "https://api.github.com".to_owned(),
            gitea_api_url: None,
            clone_url_rewrite: Vec::new(),
            work_dir,
            workers: 4,
            requeue_interrupted: false,
            max_body_bytes: 25 * 1024 * 1024,
            secrets: Secrets::default(),
        }
    }
}

/// How runs are executed: the runner and backend kiln already has, set up by the caller.
#[derive(Clone)]
pub struct Runner {
    /// The executor (its session manager owns the backend and the session limit).
    pub executor: WorkflowExecutor,
    /// Session granularity.
    pub isolation: Isolation,
    /// The VM every run asks for, when `vms` is `None`.
    pub spec: VmSpec,
    /// The VM types jobs' `runs-on` selects, and per-workflow quotas (keyed by the workflow
    /// file's path in the repository).
    pub vms: Option<Arc<kiln_runner::vm_types::VmConfig>>,
}

/// Server errors at start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The store failed.
    #[error("Store error")]
    Store(#[from] kiln_store::StoreError),
    /// The GitHub App is misconfigured.
    #[error("GitHub App")]
    GitHubApp(#[from] github_app::GitHubAppError),
    /// Only half of a GitHub App is configured.
    #[error("{0}")]
    Config(String),
    /// Binding or serving failed.
    #[error("Cannot serve on {addr}")]
    Io {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// What every handler and task shares.
pub(crate) struct Shared {
    pub(crate) config: ServerConfig,
    pub(crate) store: Arc<dyn RunStore>,
    pub(crate) runner: Runner,
    pub(crate) git: git::GitCache,
    pub(crate) metrics: metrics::Metrics,
    /// Cancel tokens of the runs this process executes.
    pub(crate) live: Mutex<HashMap<String, CancellationToken>>,
    /// Bumped after every batch of events stored (SSE readers wait on it).
    pub(crate) events_tick: watch::Sender<u64>,
    pub(crate) wake_intake: Notify,
    pub(crate) wake_workers: Notify,
    pub(crate) wake_outbox: Notify,
    /// Cancelled when the server stops taking work.
    pub(crate) stopping: CancellationToken,
    pub(crate) http: reqwest::Client,
    /// The GitHub App, when configured: check runs instead of GitHub commit statuses.
    pub(crate) github_app: Option<github_app::GitHubApp>,
}

/// A started server: background tasks running, router ready to serve.
pub struct Server {
    shared: Arc<Shared>,
    tasks: JoinSet<()>,
    workers: JoinSet<()>,
}

impl Server {
    /// Recovers from an earlier process (interrupted runs), then starts the intake task, the
    /// workers and the reporter.
    pub async fn start(
        config: ServerConfig,
        store: Arc<dyn RunStore>,
        runner: Runner,
    ) -> Result<Server, ServerError> {
        let token = config
            .secrets
            .github_token
            .clone()
            .or_else(|| config.secrets.gitea_token.clone());
        let git = git::GitCache::new(
            config.work_dir.join("repos"),
            config.clone_url_rewrite.clone(),
            token,
        );
        let github_app = match (
            &config.secrets.github_app_id,
            &config.secrets.github_app_private_key,
        ) {
            (Some(id), Some(key)) => Some(github_app::GitHubApp::new(id, key)?),
            (None, None) => None,
            (Some(_), None) => {
                return Err(ServerError::Config(
                    "A GitHub App id is set but KILN_GITHUB_APP_PRIVATE_KEY is not".to_owned(),
                ));
            }
            (None, Some(_)) => {
                return Err(ServerError::Config(
                    "KILN_GITHUB_APP_PRIVATE_KEY is set but no GitHub App id \
                     (KILN_GITHUB_APP_ID or [server] github_app_id)"
                        .to_owned(),
                ));
            }
        };
        if let Some(app) = &github_app {
            info!(
                "GitHub App {}: GitHub runs get check runs per job",
                app.app_id()
            );
        }
        let shared = Arc::new(Shared {
            github_app,
            metrics: metrics::Metrics::new(),
            git,
            store,
            runner,
            live: Mutex::default(),
            events_tick: watch::Sender::new(0),
            wake_intake: Notify::new(),
            wake_workers: Notify::new(),
            wake_outbox: Notify::new(),
            stopping: CancellationToken::new(),
            http: reqwest::Client::builder()
                .user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
                .timeout(Duration::from_secs(30))
                .build()
                .unwrap_or_default(),
            config,
        });
        let recovered = shared
            .store
            .recover(shared.config.requeue_interrupted)
            .await?;
        for run in &recovered {
            warn!(
                "Run {} was interrupted by a restart; {}",
                run.id,
                if run.status == kiln_store::RunStatus::Queued {
                    "queued again"
                } else {
                    "marked failed"
                }
            );
            if run.status == kiln_store::RunStatus::Finished {
                report::queue_status(&shared, run).await;
            }
            if checks::enabled(&shared, run) {
                checks::interrupted(&shared, run).await;
            }
        }
        let mut tasks = JoinSet::new();
        tasks.spawn(intake::run_intake(shared.clone()));
        tasks.spawn(report::run_reporter(shared.clone()));
        let mut workers = JoinSet::new();
        for n in 0..shared.config.workers.max(1) {
            workers.spawn(worker::run_worker(shared.clone(), n));
        }
        Ok(Server {
            shared,
            tasks,
            workers,
        })
    }

    /// The HTTP routes.
    pub fn router(&self) -> Router {
        Router::new()
            .merge(webhook::routes(self.shared.config.max_body_bytes))
            .merge(api::routes(self.shared.clone()))
            .merge(ui::routes(self.shared.clone()))
            .merge(metrics::routes(self.shared.clone()))
            .with_state(self.shared.clone())
    }

    /// Serves on `listener` until `shutdown` resolves, then shuts down gracefully: no new work
    /// is taken, running runs get `grace` to finish, then they are cancelled and their VMs
    /// released.
    pub async fn serve(
        mut self,
        listener: tokio::net::TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
        grace: Duration,
    ) -> Result<(), ServerError> {
        let addr = listener.local_addr().unwrap_or(self.shared.config.listen);
        info!("kiln serve listening on {addr}");
        let stopping = self.shared.stopping.clone();
        let http_stop = CancellationToken::new();
        let http = {
            let app = self.router();
            let http_stop = http_stop.clone();
            tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(async move { http_stop.cancelled().await })
                    .await
            })
        };
        shutdown.await;
        info!("Shutting down: no new runs are taken; running runs get {grace:?} to finish");
        stopping.cancel();
        self.shared.wake_workers.notify_waiters();
        let drained = tokio::time::timeout(grace, async {
            while self.workers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!("Grace period over: cancelling the runs still going");
            let tokens: Vec<CancellationToken> = self
                .shared
                .live
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .values()
                .cloned()
                .collect();
            for token in tokens {
                token.cancel();
            }
            if tokio::time::timeout(Duration::from_secs(30), async {
                while self.workers.join_next().await.is_some() {}
            })
            .await
            .is_err()
            {
                // Dropping the tasks drops the executors' futures, whose session guards release
                // the VMs.
                self.workers.abort_all();
                while self.workers.join_next().await.is_some() {}
            }
        }
        http_stop.cancel();
        self.tasks.abort_all();
        match http.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(source)) => Err(ServerError::Io { addr, source }),
            Err(_) => Ok(()),
        }
    }
}
