//! The harness: a real `kiln-server` on loopback with a SQLite store, a local git repository
//! served by `file://` URL (through `clone_url_rewrite`), and a stand-in for the GitHub API that
//! records every status call.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use kiln_runner::executor::{Isolation, WorkflowExecutor};
use kiln_runner::session::{SessionConfig, SessionManager};
use kiln_server::signature::sign_github;
use kiln_server::{Runner, Secrets, Server, ServerConfig};
use kiln_store::{RunFilter, RunStore, SqliteStore};
use kiln_vm::{VmProvider, VmSpec};

pub const WEBHOOK_SECRET: &str = "webhook-secret";
pub const API_TOKEN: &str = "api-token";
pub const GITHUB_TOKEN: &str = "ghs_test_token";
pub const GITEA_TOKEN: &str = "gitea_test_token";
pub const CLONE_URL: &str = "https://github.example/octo/app.git";

pub const CI_WORKFLOW: &str = r#"name: CI
on:
  push:
    branches: [main]
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - uses: actions/checkout@v4
      - name: Show the commit
        run: |
          echo "marker: $(cat marker.txt)"
          printf '\033[32mgreen\033[0m\n'
      - run: echo "sha=$GITHUB_SHA ref=$GITHUB_REF"
"#;

/// Never selected by a push.
pub const PR_WORKFLOW: &str = r#"name: PR only
on: pull_request
jobs:
  x:
    runs-on: ubuntu-latest
    steps:
      - run: echo pr
"#;

/// One recorded call to the fake GitHub API.
#[derive(Debug, Clone, PartialEq)]
pub struct StatusCall {
    pub path: String,
    pub authorization: String,
    pub body: serde_json::Value,
}

/// A stand-in for `api.github.com` that records status calls; `down` makes it answer 503.
#[derive(Clone, Default)]
pub struct FakeGitHub {
    pub calls: Arc<Mutex<Vec<StatusCall>>>,
    pub refused: Arc<Mutex<usize>>,
    pub down: Arc<AtomicBool>,
}

impl FakeGitHub {
    pub async fn start() -> (FakeGitHub, String) {
        let fake = FakeGitHub::default();
        async fn status(
            State(fake): State<FakeGitHub>,
            UrlPath((owner, repo, sha)): UrlPath<(String, String, String)>,
            headers: HeaderMap,
            Json(body): Json<serde_json::Value>,
        ) -> StatusCode {
            if fake.down.load(Ordering::SeqCst) {
                *fake.refused.lock().expect("lock") += 1;
                return StatusCode::SERVICE_UNAVAILABLE;
            }
            fake.calls.lock().expect("lock").push(StatusCall {
                path: format!("/repos/{owner}/{repo}/statuses/{sha}"),
                authorization: headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned(),
                body,
            });
            StatusCode::CREATED
        }
        let app = axum::Router::new()
            .route("/repos/{owner}/{repo}/statuses/{sha}", post(status))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake GitHub");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (fake, url)
    }

    pub fn calls(&self) -> Vec<StatusCall> {
        self.calls.lock().expect("lock").clone()
    }
}

/// A repository: a work tree and a bare "remote" reached through a rewritten clone URL.
pub struct Repo {
    pub work: PathBuf,
    pub remotes: PathBuf,
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.invalid")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.invalid")
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

impl Repo {
    pub fn new(root: &Path, workflows: &[(&str, &str)]) -> Repo {
        let work = root.join("work");
        let remotes = root.join("remotes");
        std::fs::create_dir_all(work.join(".github/workflows")).expect("mkdir");
        std::fs::create_dir_all(remotes.join("octo")).expect("mkdir");
        git(&work, &["init", "-q", "-b", "main"]);
        for (name, text) in workflows {
            std::fs::write(work.join(".github/workflows").join(name), text).expect("write");
        }
        let repo = Repo { work, remotes };
        let bare = repo.remotes.join("octo/app.git");
        git(
            &repo.remotes,
            &["init", "-q", "--bare", bare.to_str().expect("utf-8")],
        );
        git(
            &repo.work,
            &["remote", "add", "origin", bare.to_str().expect("utf-8")],
        );
        repo
    }

    /// Commits `marker.txt = text` and pushes main; returns the commit.
    pub fn commit(&self, text: &str) -> String {
        std::fs::write(self.work.join("marker.txt"), text).expect("write");
        git(&self.work, &["add", "-A"]);
        git(&self.work, &["commit", "-q", "-m", text]);
        git(&self.work, &["push", "-q", "origin", "main"]);
        git(&self.work, &["rev-parse", "HEAD"])
    }

    pub fn rewrite(&self) -> Vec<(String, String)> {
        vec![(
            "https://github.example/".to_owned(),
            format!("file://{}/", self.remotes.display()),
        )]
    }
}

pub fn push_payload(sha: &str) -> String {
    serde_json::json!({
        "ref": "refs/heads/main",
        "before": "0".repeat(40),
        "after": sha,
        "repository": {
            "full_name": "octo/app",
            "clone_url": CLONE_URL,
            "html_url": "https://github.example/octo/app",
        },
        "sender": {"login": "octocat"},
        "head_commit": {"id": sha},
    })
    .to_string()
}

pub struct Options {
    pub provider: Option<Arc<dyn VmProvider>>,
    pub spec: VmSpec,
    pub workers: usize,
    pub github_api_url: Option<String>,
    pub gitea_api_url: Option<String>,
    pub requeue: bool,
    /// A GitHub App (id, PEM private key): check runs instead of statuses.
    pub github_app: Option<(String, String)>,
    /// `KILN_GITHUB_TOKEN` (default: a test token).
    pub github_token: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            provider: None,
            spec: VmSpec::default(),
            workers: 2,
            github_api_url: None,
            gitea_api_url: None,
            requeue: false,
            github_app: None,
            github_token: Some(GITHUB_TOKEN.into()),
        }
    }
}

/// A running server.
pub struct Harness {
    pub url: String,
    pub store: Arc<dyn RunStore>,
    pub http: reqwest::Client,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<Result<(), kiln_server::ServerError>>>,
    _runtime: tempfile::TempDir,
}

impl Harness {
    pub async fn start(dir: &Path, rewrite: Vec<(String, String)>, options: Options) -> Harness {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let mut config = ServerConfig::new(addr, dir.join("server"));
        config.public_url = format!("http://{addr}");
        config.clone_url_rewrite = rewrite;
        config.workers = options.workers;
        config.requeue_interrupted = options.requeue;
        config.max_body_bytes = 1024 * 1024;
        if let Some(api) = options.github_api_url {
            config.github_api_url = api;
        }
        config.gitea_api_url = options.gitea_api_url;
        config.secrets = Secrets {
            github_webhook: Some(WEBHOOK_SECRET.into()),
            gitea_webhook: Some(WEBHOOK_SECRET.into()),
            github_token: options.github_token,
            gitea_token: Some(GITEA_TOKEN.into()),
            api_token: Some(API_TOKEN.into()),
            github_app_id: options.github_app.as_ref().map(|(id, _)| id.clone()),
            github_app_private_key: options.github_app.map(|(_, key)| key),
        };
        let runtime = tempfile::tempdir().expect("tempdir");
        let provider = options.provider.unwrap_or_else(|| {
            Arc::new(kiln_vm::local::LocalProvider::new(
                runtime.path().to_path_buf(),
            ))
        });
        let sessions = SessionManager::new(
            provider,
            SessionConfig {
                max_sessions: options.workers,
                ..SessionConfig::default()
            },
        );
        let runner = Runner {
            executor: WorkflowExecutor::new(sessions),
            isolation: Isolation::Workflow,
            spec: options.spec,
            vms: None,
        };
        let store: Arc<dyn RunStore> = Arc::new(
            SqliteStore::open(&dir.join("kiln.db"))
                .await
                .expect("open store"),
        );
        let server = Server::start(config, store.clone(), runner)
            .await
            .expect("server starts");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(server.serve(
            listener,
            async move {
                let _ = stopped.await;
            },
            Duration::from_secs(5),
        ));
        Harness {
            url: format!("http://{addr}"),
            store,
            http: reqwest::Client::new(),
            stop: Some(stop),
            served: Some(served),
            _runtime: runtime,
        }
    }

    /// Graceful shutdown.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(served) = self.served.take() {
            served.await.expect("serve task").expect("served");
        }
    }

    pub async fn webhook(
        &self,
        event: &str,
        delivery: &str,
        body: &str,
        signature: Option<String>,
    ) -> reqwest::Response {
        let mut request = self
            .http
            .post(format!("{}/webhooks/github", self.url))
            .header("content-type", "application/json")
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .body(body.to_owned());
        if let Some(signature) = signature {
            request = request.header("x-hub-signature-256", signature);
        }
        request.send().await.expect("request")
    }

    pub async fn signed_webhook(
        &self,
        event: &str,
        delivery: &str,
        body: &str,
    ) -> reqwest::Response {
        let signature = sign_github(WEBHOOK_SECRET.as_bytes(), body.as_bytes());
        self.webhook(event, delivery, body, Some(signature)).await
    }

    pub async fn api(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(API_TOKEN)
    }

    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        let response = self
            .api(reqwest::Method::GET, path)
            .await
            .send()
            .await
            .expect("request");
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().await.expect("json")
    }
}

/// Waits until the oldest run in the store has an event whose JSON satisfies `matches`.
pub async fn wait_for_event(
    store: &Arc<dyn RunStore>,
    what: &str,
    matches: impl Fn(&str) -> bool + Copy,
) {
    wait_for(what, Duration::from_secs(30), || {
        let store = store.clone();
        async move {
            let Some(run) = store.list(&RunFilter::default()).await.expect("list").pop() else {
                return false;
            };
            store
                .events(&run.id, 0, 1000)
                .await
                .expect("events")
                .iter()
                .any(|e| matches(&e.body))
        }
    })
    .await;
}

/// Polls an async condition every 50 ms until it holds; panics naming `what` after `limit`.
pub async fn wait_for<F, Fut>(what: &str, limit: Duration, mut condition: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while !condition().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
