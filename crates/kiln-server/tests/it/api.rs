//! The REST API: auth, listing, detail, logs (text and SSE), cancel, re-run, manual trigger.

use std::time::Duration;

use kiln_store::{RunFilter, RunResult, RunStatus};
use reqwest::Method;

use crate::support::{Harness, Options, Repo, push_payload, wait_for, wait_for_event};

const SLOW_WORKFLOW: &str = r#"name: Slow
on:
  push:
  workflow_dispatch:
    inputs:
      greeting:
        default: hi
jobs:
  slow:
    runs-on: ubuntu-latest
    steps:
      - run: echo "start ${{ inputs.greeting }}"
      - run: |
          for i in 1 2 3 4 5 6 7 8 9 10; do echo "tick $i"; sleep 0.3; done
      - run: echo done
"#;

const SLEEPY_WORKFLOW: &str = r#"name: Sleepy
on: push
jobs:
  sleepy:
    runs-on: ubuntu-latest
    steps:
      - run: echo sleeping
      - run: sleep 120
"#;

#[tokio::test]
async fn no_token_means_401_with_the_documented_error_shape() {
    let dir = tempfile::tempdir().expect("tempdir");
    let h = Harness::start(dir.path(), Vec::new(), Options::default()).await;
    for path in ["/api/v1/runs", "/api/v1/runs/x", "/metrics", "/"] {
        let response = h
            .http
            .get(format!("{}{path}", h.url))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 401, "{path}");
        let body: serde_json::Value = response.json().await.expect("json");
        assert_eq!(body["error"]["code"], "unauthorized", "{path}");
    }
    let wrong = h
        .http
        .get(format!("{}/api/v1/runs", h.url))
        .bearer_auth("wrong")
        .send()
        .await
        .expect("request");
    assert_eq!(wrong.status(), 401);
    // Basic auth with the token as password works (browsers).
    let basic = h
        .http
        .get(format!("{}/api/v1/runs", h.url))
        .basic_auth("anyone", Some(crate::support::API_TOKEN))
        .send()
        .await
        .expect("request");
    assert_eq!(basic.status(), 200);
    // Health and the API description need no token.
    for path in ["/healthz", "/readyz", "/api/v1/openapi.json"] {
        let response = h
            .http
            .get(format!("{}{path}", h.url))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), 200, "{path}");
    }
    let missing = h
        .api(Method::GET, "/api/v1/runs/nope")
        .await
        .send()
        .await
        .expect("request");
    assert_eq!(missing.status(), 404);
    let body: serde_json::Value = missing.json().await.expect("json");
    assert_eq!(body["error"]["code"], "not_found");
    let bad = h
        .api(Method::GET, "/api/v1/runs?status=sleeping")
        .await
        .send()
        .await
        .expect("request");
    assert_eq!(bad.status(), 400);
    h.stop().await;
}

#[tokio::test]
async fn live_logs_detail_rerun_and_manual_trigger() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::new(dir.path(), &[("slow.yml", SLOW_WORKFLOW)]);
    let sha = repo.commit("api");
    let h = Harness::start(dir.path(), repo.rewrite(), Options::default()).await;
    assert_eq!(
        h.signed_webhook("push", "api-1", &push_payload(&sha))
            .await
            .status(),
        202
    );
    let store = h.store.clone();
    wait_for("the run to start", Duration::from_secs(30), || {
        let store = store.clone();
        async move {
            store
                .list(&RunFilter::default())
                .await
                .expect("list")
                .first()
                .is_some_and(|r| r.status == RunStatus::Running)
        }
    })
    .await;
    let run = h
        .store
        .list(&RunFilter::default())
        .await
        .expect("list")
        .remove(0);

    // SSE while the run is going: events arrive as they happen, then `end`.
    let mut response = h
        .api(Method::GET, &format!("/api/v1/runs/{}/logs", run.id))
        .await
        .header("accept", "text/event-stream")
        .send()
        .await
        .expect("sse");
    assert_eq!(response.status(), 200);
    let mut text = String::new();
    let mut saw_live_tick_before_end = false;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(60), response.chunk())
        .await
        .expect("SSE chunk in time")
        .expect("chunk")
    {
        text.push_str(&String::from_utf8_lossy(&chunk));
        if text.contains("tick 5") && !text.contains("event: run_finished") {
            saw_live_tick_before_end = true;
        }
        if text.contains("event: end") {
            break;
        }
    }
    assert!(saw_live_tick_before_end, "{text}");
    assert!(text.contains("event: run_finished"), "{text}");
    assert!(text.contains("id: "), "{text}");

    let detail = h.get_json(&format!("/api/v1/runs/{}", run.id)).await;
    assert_eq!(detail["result"], "success");
    let steps = detail["jobs"][0]["steps"].as_array().expect("steps");
    assert_eq!(steps.len(), 3);
    assert_eq!(steps[1]["status"], "success");
    assert!(steps[1]["duration_ms"].as_u64().expect("duration") >= 2000);

    // Re-run: a new run of the same workflow at the same commit.
    let rerun = h
        .api(Method::POST, &format!("/api/v1/runs/{}/rerun", run.id))
        .await
        .send()
        .await
        .expect("rerun");
    assert_eq!(rerun.status(), 201);
    let rerun: serde_json::Value = rerun.json().await.expect("json");
    assert_eq!(rerun["rerun_of"], run.id.as_str());
    assert_eq!(rerun["sha"], sha.as_str());

    // Manual trigger, like workflow_dispatch, with an input.
    let triggered = h
        .api(Method::POST, "/api/v1/runs")
        .await
        .json(&serde_json::json!({
            "repository": "octo/app",
            "ref": "main",
            "workflow": "slow.yml",
            "inputs": {"greeting": "bonjour"},
            "clone_url": crate::support::CLONE_URL,
        }))
        .send()
        .await
        .expect("trigger");
    assert_eq!(triggered.status(), 201);
    let triggered: serde_json::Value = triggered.json().await.expect("json");
    let manual = triggered["runs"][0]["id"].as_str().expect("id").to_owned();
    assert_eq!(triggered["runs"][0]["event"], "workflow_dispatch");
    let store = h.store.clone();
    let id = manual.clone();
    wait_for("the manual run to finish", Duration::from_secs(60), || {
        let (store, id) = (store.clone(), id.clone());
        async move {
            store.get(&id).await.expect("get").map(|r| r.status) == Some(RunStatus::Finished)
        }
    })
    .await;
    let log = h
        .api(Method::GET, &format!("/api/v1/runs/{manual}/logs"))
        .await
        .send()
        .await
        .expect("logs")
        .text()
        .await
        .expect("text");
    assert!(log.contains("start bonjour"), "{log}");

    let listed = h.get_json("/api/v1/runs?limit=2").await;
    assert_eq!(listed["runs"].as_array().expect("runs").len(), 2);
    assert!(listed["next"].is_i64(), "{listed}");
    h.stop().await;
}

#[tokio::test]
async fn cancel_stops_a_running_run() {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::new(dir.path(), &[("sleepy.yml", SLEEPY_WORKFLOW)]);
    let sha = repo.commit("cancel");
    let h = Harness::start(dir.path(), repo.rewrite(), Options::default()).await;
    assert_eq!(
        h.signed_webhook("push", "c-1", &push_payload(&sha))
            .await
            .status(),
        202
    );
    wait_for_event(&h.store, "the sleep step", |body| {
        body.contains("\"step_started\"") && body.contains("sleep 120")
    })
    .await;
    let run = h
        .store
        .list(&RunFilter::default())
        .await
        .expect("list")
        .remove(0);
    let started = std::time::Instant::now();
    let response = h
        .api(Method::POST, &format!("/api/v1/runs/{}/cancel", run.id))
        .await
        .send()
        .await
        .expect("cancel");
    assert_eq!(response.status(), 202);
    let store = h.store.clone();
    let id = run.id.clone();
    wait_for(
        "the cancelled run to finish",
        Duration::from_secs(30),
        || {
            let (store, id) = (store.clone(), id.clone());
            async move {
                store.get(&id).await.expect("get").map(|r| r.status) == Some(RunStatus::Finished)
            }
        },
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(30));
    let done = h.store.get(&run.id).await.expect("get").expect("run");
    assert_eq!(done.result, Some(RunResult::Cancelled));
    // Cancelling a finished run is a conflict.
    let again = h
        .api(Method::POST, &format!("/api/v1/runs/{}/cancel", run.id))
        .await
        .send()
        .await
        .expect("cancel");
    assert_eq!(again.status(), 409);
    h.stop().await;
}
