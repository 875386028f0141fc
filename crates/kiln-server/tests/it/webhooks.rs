//! `/webhooks/github` and `/webhooks/gitea`: signatures, replays, limits, malformed bodies.

use std::time::Duration;

use kiln_server::signature::{sign_github, sign_hex};
use kiln_store::RunFilter;

use crate::support::{Harness, Options, Repo, WEBHOOK_SECRET, push_payload, wait_for};

async fn harness() -> (tempfile::TempDir, Repo, Harness) {
    let dir = tempfile::tempdir().expect("tempdir");
    let repo = Repo::new(dir.path(), &[("ci.yml", crate::support::CI_WORKFLOW)]);
    let harness = Harness::start(dir.path(), repo.rewrite(), Options::default()).await;
    (dir, repo, harness)
}

#[tokio::test]
async fn signatures_valid_invalid_missing_and_wrong_algorithm() {
    let (_dir, _repo, h) = harness().await;
    let body = r#"{"zen":"Keep it logically awesome.","hook_id":1}"#;
    let valid = h.signed_webhook("ping", "p1", body).await;
    assert_eq!(valid.status(), 200);

    let wrong_secret = sign_github(b"not the secret", body.as_bytes());
    let invalid = h.webhook("ping", "p2", body, Some(wrong_secret)).await;
    assert_eq!(invalid.status(), 401);
    let error: serde_json::Value = invalid.json().await.expect("json");
    assert_eq!(error["message"], "Signature mismatch");

    assert_eq!(h.webhook("ping", "p3", body, None).await.status(), 401);

    // GitHub's legacy SHA-1 header value, even correct for SHA-256 hex, is refused.
    let hex = sign_hex(WEBHOOK_SECRET.as_bytes(), body.as_bytes());
    let sha1 = h
        .webhook("ping", "p4", body, Some(format!("sha1={hex}")))
        .await;
    assert_eq!(sha1.status(), 401);

    // A signature of another body.
    let other = sign_github(WEBHOOK_SECRET.as_bytes(), b"{}");
    assert_eq!(
        h.webhook("ping", "p5", body, Some(other)).await.status(),
        401
    );

    // Gitea: bare hex in X-Gitea-Signature.
    let gitea = h
        .http
        .post(format!("{}/webhooks/gitea", h.url))
        .header("x-gitea-event", "ping")
        .header("x-gitea-delivery", "g1")
        .header("x-gitea-signature", hex)
        .body(body)
        .send()
        .await
        .expect("request");
    assert_eq!(gitea.status(), 200);
    h.stop().await;
}

#[tokio::test]
async fn replayed_delivery_is_ignored() {
    let (_dir, repo, h) = harness().await;
    let sha = repo.commit("one");
    let body = push_payload(&sha);
    assert_eq!(h.signed_webhook("push", "d-1", &body).await.status(), 202);
    let replay = h.signed_webhook("push", "d-1", &body).await;
    assert_eq!(replay.status(), 200);
    let text: serde_json::Value = replay.json().await.expect("json");
    assert_eq!(text["message"], "Duplicate delivery ignored");
    let store = h.store.clone();
    wait_for("the run to be queued", Duration::from_secs(30), || {
        let store = store.clone();
        async move {
            !store
                .list(&RunFilter::default())
                .await
                .expect("list")
                .is_empty()
        }
    })
    .await;
    // Give the intake time to (wrongly) process a second copy, then count.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let runs = h.store.list(&RunFilter::default()).await.expect("list");
    assert_eq!(runs.len(), 1, "one run for one delivery");
    assert_eq!(runs[0].spec.delivery.as_deref(), Some("d-1"));
    h.stop().await;
}

#[tokio::test]
async fn oversized_malformed_and_unknown_events() {
    let (_dir, _repo, h) = harness().await;
    // Over the 1 MiB limit the harness configures (GitHub's 25 MB in production).
    let big = format!("{{\"pad\":\"{}\"}}", "x".repeat(2 * 1024 * 1024));
    let response = h.signed_webhook("push", "big", &big).await;
    assert_eq!(response.status(), 413);

    let response = h.signed_webhook("push", "bad", "{not json").await;
    assert_eq!(response.status(), 400);

    let response = h
        .signed_webhook("issues", "i1", r#"{"action":"opened"}"#)
        .await;
    assert_eq!(response.status(), 202);
    let text: serde_json::Value = response.json().await.expect("json");
    assert_eq!(text["message"], "Event ignored");

    // A push without the fields kiln needs is accepted, then fails intake without a run.
    assert_eq!(h.signed_webhook("push", "empty", "{}").await.status(), 202);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        h.store
            .list(&RunFilter::default())
            .await
            .expect("list")
            .is_empty()
    );

    let metrics = h
        .api(reqwest::Method::GET, "/metrics")
        .await
        .send()
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("kiln_webhooks_total{source=\"github\",result=\"ignored\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("kiln_webhooks_total{source=\"github\",result=\"malformed\"} 1"),
        "{metrics}"
    );
    h.stop().await;
}
