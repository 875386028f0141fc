//! GitHub App check runs end to end: a signed push with an App installation becomes a run, and a
//! stand-in for the GitHub API that verifies the App's JWT with its public key hands out an
//! installation token and records the exact check-run calls in order.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use axum::Json;
use axum::extract::{Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::{patch, post};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use kiln_store::RunStore;
use serde_json::{Value, json};

use crate::support::{CLONE_URL, Harness, Options, Repo, wait_for};

const APP_ID: &str = "4242";
const INSTALLATION: u64 = 77;

/// Two jobs: `build` writes a step summary, 62 annotations (more than GitHub takes in one
/// request) and fails; `lint` succeeds.
const CHECKS_WORKFLOW: &str = r###"name: Checks
on: push
jobs:
  build:
    name: Build
    runs-on: ubuntu-latest
    steps:
      - name: Summarize
        run: |
          echo "## Build report" >> "$GITHUB_STEP_SUMMARY"
          echo "All **62** findings below." >> "$GITHUB_STEP_SUMMARY"
      - name: Find problems
        run: |
          echo "::error file=src/main.rs,line=3,col=7,title=Bad call::this call is wrong"
          echo "::warning::be careful"
          for i in $(seq 1 60); do echo "::notice file=src/lib.rs,line=$i::note $i"; done
          exit 1
  lint:
    runs-on: ubuntu-latest
    steps:
      - run: echo lint ok
"###;

fn key_files() -> (String, Vec<u8>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    (
        std::fs::read_to_string(dir.join("github-app-test-key.pem")).expect("key"),
        std::fs::read(dir.join("github-app-test-key.pub.der")).expect("public key"),
    )
}

/// One recorded check-run call.
#[derive(Debug, Clone)]
struct CheckCall {
    method: &'static str,
    path: String,
    body: Value,
}

/// A stand-in for GitHub's App and check-run endpoints.
#[derive(Clone)]
struct FakeGitHubApp {
    public_key: Arc<Vec<u8>>,
    tokens_issued: Arc<AtomicU64>,
    token_installations: Arc<Mutex<Vec<u64>>>,
    calls: Arc<Mutex<Vec<CheckCall>>>,
    /// Check run id -> name.
    check_runs: Arc<Mutex<HashMap<u64, String>>>,
    refused: Arc<AtomicU64>,
    down: Arc<AtomicBool>,
    /// Bare repositories served over smart HTTP at `/git/...` to installation tokens only.
    git_root: Arc<Mutex<Option<std::path::PathBuf>>>,
    /// Git requests: (path and query, whether they carried a valid installation token).
    git_requests: Arc<Mutex<Vec<(String, bool)>>>,
}

/// Verifies an App JWT: RS256 signature by the App's key, `iss` the App id, not expired.
fn verify_jwt(jwt: &str, public_key: &[u8]) -> Result<(), String> {
    let (input, signature) = jwt.rsplit_once('.').ok_or("not a JWT")?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|e| e.to_string())?;
    UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, public_key)
        .verify(input.as_bytes(), &signature)
        .map_err(|_| "bad signature")?;
    let (header, claims) = input.split_once('.').ok_or("not a JWT")?;
    let decode = |part: &str| -> Result<Value, String> {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())
    };
    let (header, claims) = (decode(header)?, decode(claims)?);
    if header["alg"] != "RS256" {
        return Err(format!("alg {}", header["alg"]));
    }
    if claims["iss"] != APP_ID {
        return Err(format!("iss {}", claims["iss"]));
    }
    let now = jiff::Timestamp::now().as_second();
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap_or(i64::MAX),
        claims["exp"].as_i64().unwrap_or(0),
    );
    if !(iat <= now && now < exp && exp - iat <= 600) {
        return Err(format!("iat {iat} exp {exp} now {now}"));
    }
    Ok(())
}

fn bearer(headers: &HeaderMap) -> String {
    headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default()
        .to_owned()
}

impl FakeGitHubApp {
    async fn start(public_key: Vec<u8>) -> (FakeGitHubApp, String) {
        let fake = FakeGitHubApp {
            public_key: Arc::new(public_key),
            tokens_issued: Arc::default(),
            token_installations: Arc::default(),
            calls: Arc::default(),
            check_runs: Arc::default(),
            refused: Arc::default(),
            down: Arc::default(),
            git_root: Arc::default(),
            git_requests: Arc::default(),
        };
        async fn access_token(
            State(fake): State<FakeGitHubApp>,
            UrlPath(installation): UrlPath<u64>,
            headers: HeaderMap,
        ) -> (StatusCode, Json<Value>) {
            if fake.down.load(Ordering::SeqCst) {
                fake.refused.fetch_add(1, Ordering::SeqCst);
                return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({})));
            }
            if let Err(e) = verify_jwt(&bearer(&headers), &fake.public_key) {
                return (StatusCode::UNAUTHORIZED, Json(json!({"message": e})));
            }
            let n = fake.tokens_issued.fetch_add(1, Ordering::SeqCst) + 1;
            fake.token_installations
                .lock()
                .expect("lock")
                .push(installation);
            let expires = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
            (
                StatusCode::CREATED,
                Json(json!({"token": format!("ghs_installation_{n}"), "expires_at": expires})),
            )
        }
        /// `git http-backend` as CGI, for requests with `x-access-token:<installation token>`
        /// Basic credentials; others get the 401 challenge that makes git ask its credential
        /// helper.
        async fn git_http(
            State(fake): State<FakeGitHubApp>,
            method: axum::http::Method,
            uri: axum::http::Uri,
            headers: HeaderMap,
            body: axum::body::Bytes,
        ) -> axum::response::Response {
            use axum::response::IntoResponse;
            let issued = fake.tokens_issued.load(Ordering::SeqCst);
            let valid = headers
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Basic "))
                .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
                .and_then(|d| String::from_utf8(d).ok())
                .is_some_and(|pair| {
                    (1..=issued).any(|n| pair == format!("x-access-token:ghs_installation_{n}"))
                });
            let target = uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default();
            fake.git_requests
                .lock()
                .expect("lock")
                .push((target, valid));
            if !valid {
                return (
                    StatusCode::UNAUTHORIZED,
                    [("www-authenticate", "Basic realm=\"git\"")],
                    "",
                )
                    .into_response();
            }
            let root = fake
                .git_root
                .lock()
                .expect("lock")
                .clone()
                .expect("git root");
            let header = |name: &str| {
                headers
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned()
            };
            let mut child = tokio::process::Command::new("git")
                .arg("http-backend")
                .env("GIT_PROJECT_ROOT", root)
                .env("GIT_HTTP_EXPORT_ALL", "1")
                .env(
                    "PATH_INFO",
                    uri.path().strip_prefix("/git").unwrap_or_default(),
                )
                .env("REQUEST_METHOD", method.as_str())
                .env("QUERY_STRING", uri.query().unwrap_or_default())
                .env("CONTENT_TYPE", header("content-type"))
                .env("CONTENT_LENGTH", body.len().to_string())
                .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
                .env("GIT_PROTOCOL", header("git-protocol"))
                .env("REMOTE_USER", "x-access-token")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("git http-backend");
            {
                use tokio::io::AsyncWriteExt;
                let mut stdin = child.stdin.take().expect("stdin");
                stdin.write_all(&body).await.expect("request body");
            }
            let out = child.wait_with_output().await.expect("http-backend output");
            let split = out
                .stdout
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .expect("CGI headers");
            let head = String::from_utf8_lossy(&out.stdout[..split]).into_owned();
            let mut response = axum::response::Response::new(axum::body::Body::from(
                out.stdout[split + 4..].to_vec(),
            ));
            for line in head.lines() {
                let Some((name, value)) = line.split_once(": ") else {
                    continue;
                };
                if name.eq_ignore_ascii_case("status") {
                    let code = value
                        .split(' ')
                        .next()
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(500);
                    *response.status_mut() = StatusCode::from_u16(code).expect("status");
                } else if let (Ok(name), Ok(value)) = (
                    axum::http::HeaderName::try_from(name),
                    axum::http::HeaderValue::try_from(value),
                ) {
                    response.headers_mut().insert(name, value);
                }
            }
            response
        }
        fn authorized(fake: &FakeGitHubApp, headers: &HeaderMap) -> bool {
            let token = bearer(headers);
            let issued = fake.tokens_issued.load(Ordering::SeqCst);
            (1..=issued).any(|n| token == format!("ghs_installation_{n}"))
        }
        async fn create(
            State(fake): State<FakeGitHubApp>,
            UrlPath((owner, repo)): UrlPath<(String, String)>,
            headers: HeaderMap,
            Json(body): Json<Value>,
        ) -> (StatusCode, Json<Value>) {
            if fake.down.load(Ordering::SeqCst) {
                fake.refused.fetch_add(1, Ordering::SeqCst);
                return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({})));
            }
            if !authorized(&fake, &headers) {
                return (StatusCode::UNAUTHORIZED, Json(json!({})));
            }
            let mut runs = fake.check_runs.lock().expect("lock");
            let id = 1000 + runs.len() as u64;
            runs.insert(id, body["name"].as_str().unwrap_or_default().to_owned());
            fake.calls.lock().expect("lock").push(CheckCall {
                method: "POST",
                path: format!("/repos/{owner}/{repo}/check-runs"),
                body,
            });
            (StatusCode::CREATED, Json(json!({"id": id})))
        }
        async fn update(
            State(fake): State<FakeGitHubApp>,
            UrlPath((owner, repo, id)): UrlPath<(String, String, u64)>,
            headers: HeaderMap,
            Json(body): Json<Value>,
        ) -> (StatusCode, Json<Value>) {
            if fake.down.load(Ordering::SeqCst) {
                fake.refused.fetch_add(1, Ordering::SeqCst);
                return (StatusCode::SERVICE_UNAVAILABLE, Json(json!({})));
            }
            if !authorized(&fake, &headers) {
                return (StatusCode::UNAUTHORIZED, Json(json!({})));
            }
            if !fake.check_runs.lock().expect("lock").contains_key(&id) {
                return (StatusCode::NOT_FOUND, Json(json!({})));
            }
            fake.calls.lock().expect("lock").push(CheckCall {
                method: "PATCH",
                path: format!("/repos/{owner}/{repo}/check-runs/{id}"),
                body,
            });
            (StatusCode::OK, Json(json!({"id": id})))
        }
        let app = axum::Router::new()
            .route(
                "/app/installations/{installation}/access_tokens",
                post(access_token),
            )
            .route("/repos/{owner}/{repo}/check-runs", post(create))
            .route("/repos/{owner}/{repo}/check-runs/{id}", patch(update))
            .route("/git/{*path}", axum::routing::any(git_http))
            .with_state(fake.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind fake GitHub");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (fake, url)
    }

    fn calls(&self) -> Vec<CheckCall> {
        self.calls.lock().expect("lock").clone()
    }

    /// The calls for the check run named `name`, in order.
    fn calls_for(&self, name: &str) -> Vec<CheckCall> {
        let runs = self.check_runs.lock().expect("lock").clone();
        self.calls()
            .into_iter()
            .filter(|c| {
                c.body["name"] == name
                    || c.path
                        .rsplit('/')
                        .next()
                        .and_then(|id| id.parse().ok())
                        .and_then(|id: u64| runs.get(&id))
                        .is_some_and(|n| n == name)
            })
            .collect()
    }
}

fn push_payload_with_installation(sha: &str) -> String {
    json!({
        "ref": "refs/heads/main",
        "before": "0".repeat(40),
        "after": sha,
        "repository": {
            "full_name": "octo/app",
            "clone_url": CLONE_URL,
            "html_url": "https://github.example/octo/app",
        },
        "installation": {"id": INSTALLATION},
        "sender": {"login": "octocat"},
        "head_commit": {"id": sha},
    })
    .to_string()
}

async fn start(dir: &std::path::Path, repo: &Repo) -> (FakeGitHubApp, Harness) {
    let (private_key, public_key) = key_files();
    let (github, api_url) = FakeGitHubApp::start(public_key).await;
    let h = Harness::start(
        dir,
        repo.rewrite(),
        Options {
            github_api_url: Some(api_url),
            github_app: Some((APP_ID.to_owned(), private_key)),
            ..Options::default()
        },
    )
    .await;
    (github, h)
}

/// Checks the exact calls of both check runs once all of them arrived.
async fn assert_check_runs(github: &FakeGitHubApp, h: &Harness, sha: &str) {
    let gh = github.clone();
    // build: create, complete (50 annotations), 12 more; lint: create, complete.
    wait_for("five check-run calls", Duration::from_secs(30), || {
        let gh = gh.clone();
        async move { gh.calls().len() >= 5 }
    })
    .await;
    let runs = h
        .store
        .list(&kiln_store::RunFilter::default())
        .await
        .expect("list");
    let details_url = format!("{}/runs/{}", h.url, runs[0].id);

    let build = github.calls_for("Build");
    let methods: Vec<&str> = build.iter().map(|c| c.method).collect();
    assert_eq!(methods, ["POST", "PATCH", "PATCH"], "{build:#?}");
    assert_eq!(build[0].path, "/repos/octo/app/check-runs");
    let created = &build[0].body;
    assert_eq!(created["status"], "in_progress");
    assert_eq!(created["head_sha"], sha);
    assert_eq!(created["details_url"], details_url.as_str());
    assert_eq!(created["external_id"], runs[0].id.as_str());
    assert!(created.get("conclusion").is_none());

    let done = &build[1].body;
    assert!(build[1].path.starts_with("/repos/octo/app/check-runs/"));
    assert_eq!(
        build[1].path, build[2].path,
        "both updates patch one check run"
    );
    assert_eq!(done["status"], "completed");
    assert_eq!(done["conclusion"], "failure");
    assert_eq!(
        done["output"]["title"],
        "Failed: 1 error, 1 warning, 60 notices"
    );
    let summary = done["output"]["summary"].as_str().unwrap_or_default();
    assert!(summary.contains("## Build report"), "{summary}");
    assert!(summary.contains("All **62** findings below."), "{summary}");
    let first = done["output"]["annotations"]
        .as_array()
        .expect("annotations");
    assert_eq!(first.len(), 50);
    assert_eq!(
        first[0],
        json!({
            "path": "src/main.rs",
            "start_line": 3,
            "end_line": 3,
            "start_column": 7,
            "end_column": 7,
            "annotation_level": "failure",
            "message": "this call is wrong",
            "title": "Bad call",
        })
    );
    assert_eq!(first[1]["annotation_level"], "warning");
    assert_eq!(first[1]["path"], ".github");
    assert_eq!(first[2]["message"], "note 1");
    let rest = build[2].body["output"]["annotations"]
        .as_array()
        .expect("annotations");
    assert_eq!(rest.len(), 12);
    assert_eq!(rest[11]["message"], "note 60");
    assert_eq!(rest[11]["annotation_level"], "notice");
    assert_eq!(build[2].body["output"]["title"], done["output"]["title"]);
    assert!(build[2].body.get("conclusion").is_none());

    let lint = github.calls_for("lint");
    let shape: Vec<(&str, Value)> = lint
        .iter()
        .map(|c| (c.method, c.body["status"].clone()))
        .collect();
    assert_eq!(
        shape,
        [
            ("POST", json!("in_progress")),
            ("PATCH", json!("completed"))
        ]
    );
    assert_eq!(lint[1].body["conclusion"], "success");
    assert_eq!(lint[1].body["output"]["title"], "Succeeded");
    assert!(
        lint[1].body["output"]["annotations"]
            .as_array()
            .is_some_and(Vec::is_empty)
    );
    assert_eq!(
        github.calls().len(),
        5,
        "nothing else: {:#?}",
        github.calls()
    );
    // One installation token served every call (cached), for the payload's installation.
    assert_eq!(
        *github.token_installations.lock().expect("lock"),
        [INSTALLATION]
    );
}

#[tokio::test]
async fn an_app_gets_check_runs_per_job_with_summary_and_batched_annotations() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::new(dir.path(), &[("checks.yml", CHECKS_WORKFLOW)]);
    let sha = repo.commit("checks");
    let (github, h) = start(dir.path(), &repo).await;
    let response = h
        .signed_webhook("push", "checks-1", &push_payload_with_installation(&sha))
        .await;
    assert_eq!(response.status(), 202);
    assert_check_runs(&github, &h, &sha).await;
    // The last job's check run can be completed before the run itself is recorded finished.
    let store = h.store.clone();
    wait_for("the run to finish", Duration::from_secs(30), || {
        let store = store.clone();
        async move {
            store
                .list(&kiln_store::RunFilter::default())
                .await
                .expect("list")
                .first()
                .is_some_and(|r| r.result.is_some())
        }
    })
    .await;
    let run = &h
        .store
        .list(&kiln_store::RunFilter::default())
        .await
        .expect("list")[0];
    assert_eq!(run.result, Some(kiln_store::RunResult::Failure));
    h.stop().await;
}

#[tokio::test]
async fn check_runs_survive_an_api_outage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::new(dir.path(), &[("checks.yml", CHECKS_WORKFLOW)]);
    let sha = repo.commit("checks outage");
    let (github, h) = start(dir.path(), &repo).await;
    github.down.store(true, Ordering::SeqCst);
    assert_eq!(
        h.signed_webhook(
            "push",
            "checks-outage",
            &push_payload_with_installation(&sha)
        )
        .await
        .status(),
        202
    );
    let store = h.store.clone();
    wait_for("the run to finish", Duration::from_secs(60), || {
        let store = store.clone();
        async move {
            store
                .list(&kiln_store::RunFilter::default())
                .await
                .expect("list")
                .first()
                .is_some_and(|r| r.status == kiln_store::RunStatus::Finished)
        }
    })
    .await;
    let gh = github.clone();
    wait_for("refused attempts", Duration::from_secs(10), || {
        let gh = gh.clone();
        async move { gh.refused.load(Ordering::SeqCst) >= 2 }
    })
    .await;
    assert!(github.calls().is_empty());
    assert!(h.store.counts().await.expect("counts").outbox_pending >= 5);

    // The API comes back: every call arrives, in order, exactly once.
    github.down.store(false, Ordering::SeqCst);
    assert_check_runs(&github, &h, &sha).await;
    assert_eq!(h.store.counts().await.expect("counts").outbox_pending, 0);
    h.stop().await;
}

/// A restart completes the check runs of jobs it interrupted, and a run that fails before any
/// job starts gets one completed check run saying why. Neither check run was created before
/// (the create was lost with the process, or never happened), so both are created completed.
#[tokio::test]
async fn interrupted_jobs_and_early_failures_get_completed_check_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::new(dir.path(), &[("checks.yml", CHECKS_WORKFLOW)]);
    let sha = repo.commit("interrupted");
    let run = |name: &str, sha: &str| kiln_store::NewRun {
        forge: "github".into(),
        repository: "octo/app".into(),
        clone_url: CLONE_URL.into(),
        sha: sha.to_owned(),
        git_ref: "refs/heads/main".into(),
        event: "push".into(),
        workflow_file: ".github/workflows/checks.yml".into(),
        workflow_name: name.into(),
        payload: serde_json::from_str(&push_payload_with_installation(sha)).expect("json"),
        inputs: json!({}),
        delivery: None,
        concurrency_group: None,
        cancel_in_progress: false,
        rerun_of: None,
    };
    // What a killed process leaves: a run executing its `Build` job.
    let interrupted = {
        let store = kiln_store::SqliteStore::open(&dir.path().join("kiln.db"))
            .await
            .expect("open");
        let a = store.enqueue(run("Checks", &sha)).await.expect("enqueue");
        store.claim_next().await.expect("claim");
        let started = json!({"type": "job_started", "ts": "2026-01-01T00:00:00Z",
            "run": a.id, "job": "build", "name": "Build"});
        store
            .append_events(&a.id, &[started.to_string()])
            .await
            .expect("events");
        a
    };
    let (github, h) = start(dir.path(), &repo).await;
    let gh = github.clone();
    wait_for(
        "the interrupted job's check run",
        Duration::from_secs(30),
        || {
            let gh = gh.clone();
            async move { !gh.calls().is_empty() }
        },
    )
    .await;
    let calls = github.calls();
    assert_eq!(calls.len(), 1, "{calls:#?}");
    assert_eq!(calls[0].method, "POST");
    let body = &calls[0].body;
    assert_eq!(body["name"], "Build");
    assert_eq!(body["head_sha"], sha.as_str());
    assert_eq!(body["status"], "completed");
    assert_eq!(body["conclusion"], "failure");
    assert_eq!(body["output"]["title"], "Interrupted");
    assert_eq!(
        body["details_url"],
        format!("{}/runs/{}", h.url, interrupted.id)
    );

    // A commit that does not exist: the run fails before any job starts.
    let missing = "0123456789abcdef0123456789abcdef01234567";
    let early = h
        .store
        .enqueue(run("Checks", missing))
        .await
        .expect("enqueue");
    let gh = github.clone();
    wait_for(
        "the early failure's check run",
        Duration::from_secs(60),
        || {
            let gh = gh.clone();
            async move { gh.calls().len() >= 2 }
        },
    )
    .await;
    let calls = github.calls();
    assert_eq!(calls.len(), 2, "{calls:#?}");
    let body = &calls[1].body;
    assert_eq!(calls[1].method, "POST");
    assert_eq!(body["name"], "Checks");
    assert_eq!(body["head_sha"], missing);
    assert_eq!(body["status"], "completed");
    assert_eq!(body["conclusion"], "failure");
    assert_eq!(body["output"]["title"], "kiln could not run this workflow");
    let error = h
        .store
        .get(&early.id)
        .await
        .expect("get")
        .and_then(|r| r.error)
        .expect("an error");
    assert_eq!(body["output"]["summary"], error.as_str());
    h.stop().await;
}

/// With only a GitHub App (no `KILN_GITHUB_TOKEN`), kiln fetches with an installation token:
/// the repository is served over smart HTTP to installation tokens only.
#[tokio::test]
async fn with_only_an_app_git_fetches_with_an_installation_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::new(dir.path(), &[("ci.yml", crate::support::CI_WORKFLOW)]);
    let sha = repo.commit("private");
    let (private_key, public_key) = key_files();
    let (github, api_url) = FakeGitHubApp::start(public_key).await;
    *github.git_root.lock().expect("lock") = Some(repo.remotes.clone());
    let h = Harness::start(
        dir.path(),
        vec![(
            "https://github.example/".to_owned(),
            format!("{api_url}/git/"),
        )],
        Options {
            github_api_url: Some(api_url),
            github_app: Some((APP_ID.to_owned(), private_key)),
            github_token: None,
            ..Options::default()
        },
    )
    .await;
    assert_eq!(
        h.signed_webhook("push", "private-1", &push_payload_with_installation(&sha))
            .await
            .status(),
        202
    );
    let store = h.store.clone();
    wait_for("the run to finish", Duration::from_secs(60), || {
        let store = store.clone();
        async move {
            store
                .list(&kiln_store::RunFilter::default())
                .await
                .expect("list")
                .first()
                .is_some_and(|r| r.result.is_some())
        }
    })
    .await;
    let run = &h
        .store
        .list(&kiln_store::RunFilter::default())
        .await
        .expect("list")[0];
    assert_eq!(run.result, Some(kiln_store::RunResult::Success), "{run:#?}");
    let requests = github.git_requests.lock().expect("lock").clone();
    assert!(
        requests
            .iter()
            .any(|(path, valid)| *valid && path.contains("git-upload-pack")),
        "an authorized fetch: {requests:#?}"
    );
    assert!(
        requests.iter().any(|(_, valid)| !valid),
        "git first asked without credentials: {requests:#?}"
    );
    h.stop().await;
}
