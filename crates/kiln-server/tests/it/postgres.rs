//! The real `kiln serve` binary on a PostgreSQL database: a webhook run is queued, executed and
//! reported through the PostgreSQL store, the password comes from `KILN_DATABASE_PASSWORD_FILE`,
//! and a second `kiln serve` on the same database is refused.

use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_store::{PostgresStore, RunFilter, RunResult, RunStore};

use crate::support::{
    API_TOKEN, CI_WORKFLOW, FakeGitHub, GITHUB_TOKEN, Repo, WEBHOOK_SECRET, push_payload, wait_for,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kiln_serve_runs_on_postgresql_and_owns_its_database() {
    let cluster = kiln_test_support::postgres::cluster();
    let database_url = cluster.url(&cluster.create_database());
    let bin = tokio::task::spawn_blocking(crate::vm::kiln_binary)
        .await
        .expect("build");
    let dir = tempfile::tempdir().expect("tempdir");
    let (data, runtime) = (dir.path().join("data"), dir.path().join("runtime"));
    std::fs::create_dir_all(&data).expect("mkdir");
    std::fs::create_dir_all(&runtime).expect("mkdir");
    let password_file = dir.path().join("db-password");
    std::fs::write(&password_file, format!("{}\n", cluster.password())).expect("write");
    let repo = Repo::new(dir.path(), &[("ci.yml", CI_WORKFLOW)]);
    let sha = repo.commit("on postgres");
    let (github, api_url) = FakeGitHub::start().await;
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let url = format!("http://127.0.0.1:{port}");
    let (from, to) = repo.rewrite().remove(0);
    let config = dir.path().join("kiln.toml");
    std::fs::write(
        &config,
        format!(
            "[runner]\nbackend = \"local\"\nmax_sessions = 1\n\n\
             [server]\nlisten = \"127.0.0.1:{port}\"\ndatabase = \"{database_url}\"\n\
             github_api_url = \"{api_url}\"\npublic_url = \"{url}\"\n\
             shutdown_grace_seconds = 5\n\
             clone_url_rewrite = {{ \"{from}\" = \"{to}\" }}\n",
        ),
    )
    .expect("config");
    let serve = |log: &str| {
        let log = std::fs::File::create(dir.path().join(log)).expect("log");
        let mut command = Command::new(&bin);
        command
            .args(["serve", "--config"])
            .arg(&config)
            .env("KILN_DATA_DIR", &data)
            .env("KILN_RUNTIME_DIR", &runtime)
            .env("KILN_DATABASE_PASSWORD_FILE", &password_file)
            .env("KILN_GITHUB_WEBHOOK_SECRET", WEBHOOK_SECRET)
            .env("KILN_API_TOKEN", API_TOKEN)
            .env("KILN_GITHUB_TOKEN", GITHUB_TOKEN)
            .env("KILN_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        command
    };
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _first = Killed(serve("serve.log").spawn().expect("kiln serve starts"));
    let http = reqwest::Client::new();
    wait_for("kiln serve to answer", Duration::from_secs(120), || {
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.get(format!("{url}/healthz"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        }
    })
    .await;

    // A second kiln serve on the same database is refused before it takes any work.
    let mut second = serve("second.log");
    let second = tokio::task::spawn_blocking(move || second.status())
        .await
        .expect("join")
        .expect("second kiln serve runs");
    assert!(!second.success());
    let second_log = std::fs::read_to_string(dir.path().join("second.log")).expect("log");
    assert!(
        second_log.contains("in use by another kiln serve"),
        "{second_log}"
    );
    assert!(!second_log.contains(cluster.password()), "{second_log}");

    let body = push_payload(&sha);
    let signature = kiln_server::signature::sign_github(WEBHOOK_SECRET.as_bytes(), body.as_bytes());
    let response = http
        .post(format!("{url}/webhooks/github"))
        .header("x-github-event", "push")
        .header("x-github-delivery", "pg-1")
        .header("x-hub-signature-256", signature)
        .body(body)
        .send()
        .await
        .expect("webhook");
    assert_eq!(response.status(), 202);

    // The run is in PostgreSQL, finished, and its statuses went out.
    let store = PostgresStore::connect(&database_url, Some(cluster.password()))
        .await
        .expect("connect");
    wait_for("the run to finish", Duration::from_secs(120), || {
        let store = store.clone();
        async move {
            store
                .list(&RunFilter::default())
                .await
                .expect("list")
                .first()
                .is_some_and(|r| r.result.is_some())
        }
    })
    .await;
    let runs = store.list(&RunFilter::default()).await.expect("list");
    assert_eq!(runs.len(), 1);
    assert_eq!(runs[0].result, Some(RunResult::Success), "{runs:#?}");
    assert_eq!(runs[0].spec.sha, sha);
    let gh = github.clone();
    wait_for("three statuses", Duration::from_secs(30), || {
        let gh = gh.clone();
        async move { gh.calls().len() >= 3 }
    })
    .await;
    let states: Vec<String> = github
        .calls()
        .iter()
        .map(|c| c.body["state"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(states, ["pending", "pending", "success"]);
    let log = store.events(&runs[0].id, 0, 1000).await.expect("events");
    assert!(
        log.iter().any(|e| e.body.contains("marker: on postgres")),
        "the run's log is in PostgreSQL"
    );
}
