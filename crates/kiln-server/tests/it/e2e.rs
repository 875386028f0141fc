//! A signed push to a real local git repository becomes a run that executes, and the GitHub API
//! stand-in receives the exact status calls in order.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kiln_store::{NewRun, RunFilter, RunResult, RunStatus, RunStore, SqliteStore};

use crate::support::{
    CI_WORKFLOW, FakeGitHub, GITHUB_TOKEN, Harness, Options, PR_WORKFLOW, Repo, push_payload,
    wait_for, wait_for_event,
};

async fn finished_runs(store: &Arc<dyn RunStore>) -> Vec<kiln_store::RunRecord> {
    store
        .list(&RunFilter {
            status: Some(RunStatus::Finished),
            ..RunFilter::default()
        })
        .await
        .expect("list")
}

fn states(calls: &[crate::support::StatusCall]) -> Vec<(String, String)> {
    calls
        .iter()
        .map(|c| {
            (
                c.body["state"].as_str().unwrap_or_default().to_owned(),
                c.body["description"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn signed_push_runs_the_matching_workflow_and_reports_statuses_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::new(
        dir.path(),
        &[("ci.yml", CI_WORKFLOW), ("pr.yml", PR_WORKFLOW)],
    );
    let first = repo.commit("first");
    let sha = repo.commit("second");
    assert_ne!(first, sha);
    let (github, api_url) = FakeGitHub::start().await;
    let h = Harness::start(
        dir.path(),
        repo.rewrite(),
        Options {
            github_api_url: Some(api_url),
            ..Options::default()
        },
    )
    .await;

    let started = std::time::Instant::now();
    let response = h.signed_webhook("push", "e2e-1", &push_payload(&sha)).await;
    assert_eq!(response.status(), 202);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "the webhook answered in {:?}",
        started.elapsed()
    );

    let store = h.store.clone();
    wait_for("the run to finish", Duration::from_secs(60), || {
        let store = store.clone();
        async move { !finished_runs(&store).await.is_empty() }
    })
    .await;
    let runs = h.store.list(&RunFilter::default()).await.expect("list");
    assert_eq!(runs.len(), 1, "only the push workflow runs: {runs:#?}");
    let run = &runs[0];
    assert_eq!(run.spec.workflow_file, ".github/workflows/ci.yml");
    assert_eq!(run.spec.sha, sha);
    assert_eq!(run.result, Some(RunResult::Success), "{run:#?}");

    // The log shows the exact commit's content and the commit id.
    let log = h
        .api(
            reqwest::Method::GET,
            &format!("/api/v1/runs/{}/logs", run.id),
        )
        .await
        .send()
        .await
        .expect("logs")
        .text()
        .await
        .expect("text");
    assert!(log.contains("marker: second"), "{log}");
    assert!(
        log.contains(&format!("sha={sha} ref=refs/heads/main")),
        "{log}"
    );

    let wanted = vec![
        ("pending".to_owned(), "Queued".to_owned()),
        ("pending".to_owned(), "Running".to_owned()),
        ("success".to_owned(), "Succeeded".to_owned()),
    ];
    let gh = github.clone();
    wait_for("three status calls", Duration::from_secs(20), || {
        let gh = gh.clone();
        async move { gh.calls().len() >= 3 }
    })
    .await;
    let calls = github.calls();
    assert_eq!(states(&calls), wanted);
    for call in &calls {
        assert_eq!(call.path, format!("/repos/octo/app/statuses/{sha}"));
        assert_eq!(call.authorization, format!("Bearer {GITHUB_TOKEN}"));
        assert_eq!(call.body["context"], "kiln/CI");
        assert_eq!(
            call.body["target_url"],
            format!("{}/runs/{}", h.url, run.id)
        );
    }

    // The run page renders the steps and the coloured log.
    let page = h
        .api(reqwest::Method::GET, &format!("/runs/{}", run.id))
        .await
        .send()
        .await
        .expect("page")
        .text()
        .await
        .expect("text");
    assert!(page.contains("Show the commit"), "{page}");
    assert!(page.contains("<span class=\"a-f2\">green</span>"), "{page}");
    assert!(page.contains("data-status=\"success\""), "{page}");
    h.stop().await;
}

#[tokio::test]
async fn reports_survive_an_api_outage() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::new(dir.path(), &[("ci.yml", CI_WORKFLOW)]);
    let sha = repo.commit("outage");
    let (github, api_url) = FakeGitHub::start().await;
    github.down.store(true, Ordering::SeqCst);
    let h = Harness::start(
        dir.path(),
        repo.rewrite(),
        Options {
            github_api_url: Some(api_url),
            ..Options::default()
        },
    )
    .await;
    assert_eq!(
        h.signed_webhook("push", "outage-1", &push_payload(&sha))
            .await
            .status(),
        202
    );
    let store = h.store.clone();
    wait_for("the run to finish", Duration::from_secs(60), || {
        let store = store.clone();
        async move { !finished_runs(&store).await.is_empty() }
    })
    .await;
    let gh = github.clone();
    wait_for("refused attempts", Duration::from_secs(10), || {
        let gh = gh.clone();
        async move { *gh.refused.lock().expect("lock") >= 2 }
    })
    .await;
    assert!(github.calls().is_empty());
    assert!(h.store.counts().await.expect("counts").outbox_pending >= 3);

    // The API comes back: every status arrives, in order.
    github.down.store(false, Ordering::SeqCst);
    let gh = github.clone();
    wait_for(
        "the statuses after the outage",
        Duration::from_secs(30),
        || {
            let gh = gh.clone();
            async move { gh.calls().len() >= 3 }
        },
    )
    .await;
    assert_eq!(
        states(&github.calls()),
        [
            ("pending".to_owned(), "Queued".to_owned()),
            ("pending".to_owned(), "Running".to_owned()),
            ("success".to_owned(), "Succeeded".to_owned()),
        ]
    );
    assert_eq!(h.store.counts().await.expect("counts").outbox_pending, 0);
    h.stop().await;
}

#[tokio::test]
async fn restart_marks_interrupted_runs_keeps_the_queue_and_reports() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::new(dir.path(), &[("ci.yml", CI_WORKFLOW)]);
    let sha = repo.commit("restart");
    let run = |name: &str| NewRun {
        forge: "github".into(),
        repository: "octo/app".into(),
        clone_url: crate::support::CLONE_URL.into(),
        sha: sha.clone(),
        git_ref: "refs/heads/main".into(),
        event: "push".into(),
        workflow_file: ".github/workflows/ci.yml".into(),
        workflow_name: name.into(),
        payload: serde_json::from_str(&push_payload(&sha)).expect("json"),
        inputs: serde_json::json!({}),
        delivery: None,
        concurrency_group: None,
        cancel_in_progress: false,
        rerun_of: None,
    };
    // What a killed process leaves behind: one run claimed (running), one queued.
    let (interrupted, queued) = {
        let store = SqliteStore::open(&dir.path().join("kiln.db"))
            .await
            .expect("open");
        let a = store.enqueue(run("CI")).await.expect("enqueue");
        let b = store.enqueue(run("CI")).await.expect("enqueue");
        store.claim_next().await.expect("claim");
        (a, b)
    };
    let (github, api_url) = FakeGitHub::start().await;
    let h = Harness::start(
        dir.path(),
        repo.rewrite(),
        Options {
            github_api_url: Some(api_url),
            ..Options::default()
        },
    )
    .await;
    let store = h.store.clone();
    let id = queued.id.clone();
    wait_for("the queued run to finish", Duration::from_secs(60), || {
        let (store, id) = (store.clone(), id.clone());
        async move {
            store.get(&id).await.expect("get").map(|r| r.status) == Some(RunStatus::Finished)
        }
    })
    .await;
    let old = h
        .store
        .get(&interrupted.id)
        .await
        .expect("get")
        .expect("run");
    assert_eq!(old.result, Some(RunResult::Failure));
    assert_eq!(old.error.as_deref(), Some("interrupted"));
    let new = h.store.get(&queued.id).await.expect("get").expect("run");
    assert_eq!(new.result, Some(RunResult::Success));
    let gh = github.clone();
    wait_for("statuses", Duration::from_secs(20), || {
        let gh = gh.clone();
        async move { gh.calls().len() >= 3 }
    })
    .await;
    let calls = github.calls();
    assert_eq!(
        (
            calls[0].body["state"].as_str(),
            calls[0].body["description"].as_str()
        ),
        (Some("failure"), Some("Failed: interrupted"))
    );
    h.stop().await;
}

#[tokio::test]
async fn gitea_push_reports_gitea_statuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::new(dir.path(), &[("ci.yml", CI_WORKFLOW)]);
    let sha = repo.commit("gitea");
    let (gitea, api_url) = FakeGitHub::start().await;
    let h = Harness::start(
        dir.path(),
        repo.rewrite(),
        Options {
            gitea_api_url: Some(api_url),
            ..Options::default()
        },
    )
    .await;
    let body = push_payload(&sha);
    let signature = kiln_server::signature::sign_hex(
        crate::support::WEBHOOK_SECRET.as_bytes(),
        body.as_bytes(),
    );
    let response = h
        .http
        .post(format!("{}/webhooks/gitea", h.url))
        .header("x-gitea-event", "push")
        .header("x-gitea-delivery", "gitea-1")
        .header("x-gitea-signature", signature)
        .body(body)
        .send()
        .await
        .expect("post");
    assert_eq!(response.status(), 202);
    let gh = gitea.clone();
    wait_for("three Gitea statuses", Duration::from_secs(60), || {
        let gh = gh.clone();
        async move { gh.calls().len() >= 3 }
    })
    .await;
    let calls = gitea.calls();
    assert_eq!(
        states(&calls),
        [
            ("pending".to_owned(), "Queued".to_owned()),
            ("pending".to_owned(), "Running".to_owned()),
            ("success".to_owned(), "Succeeded".to_owned()),
        ]
    );
    assert_eq!(
        calls[0].authorization,
        format!("token {}", crate::support::GITEA_TOKEN)
    );
    assert_eq!(calls[0].path, format!("/repos/octo/app/statuses/{sha}"));
    h.stop().await;
}

const GROUPED_WORKFLOW: &str = r#"name: Deploy
on: push
concurrency:
  group: deploy-${{ github.ref }}
  cancel-in-progress: true
jobs:
  deploy:
    runs-on: ubuntu-latest
    steps:
      - run: |
          echo "deploying $(cat marker.txt)"
          if [ "$(cat marker.txt)" = old ]; then sleep 120; fi
"#;

#[tokio::test]
async fn cancel_in_progress_cancels_the_older_run_of_the_group() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::new(dir.path(), &[("deploy.yml", GROUPED_WORKFLOW)]);
    let old = repo.commit("old");
    let h = Harness::start(dir.path(), repo.rewrite(), Options::default()).await;
    assert_eq!(
        h.signed_webhook("push", "g-1", &push_payload(&old))
            .await
            .status(),
        202
    );
    wait_for_event(&h.store, "the old run to deploy", |body| {
        body.contains("deploying old")
    })
    .await;
    let new = repo.commit("new");
    assert_eq!(
        h.signed_webhook("push", "g-2", &push_payload(&new))
            .await
            .status(),
        202
    );
    let store = h.store.clone();
    wait_for("both runs to finish", Duration::from_secs(60), || {
        let store = store.clone();
        async move { finished_runs(&store).await.len() == 2 }
    })
    .await;
    let runs = h.store.list(&RunFilter::default()).await.expect("list");
    let by_sha = |sha: &str| {
        runs.iter()
            .find(|r| r.spec.sha == sha)
            .expect("run")
            .clone()
    };
    assert_eq!(by_sha(&old).result, Some(RunResult::Cancelled));
    assert_eq!(by_sha(&new).result, Some(RunResult::Success));
    assert_eq!(
        by_sha(&new).spec.concurrency_group.as_deref(),
        Some("octo/app:deploy-refs/heads/main")
    );
    h.stop().await;
}
