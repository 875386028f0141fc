//! `POST /webhooks/github` and `POST /webhooks/gitea`.
//!
//! The handler does only what must happen before the answer, in this order:
//! 1. body over the limit: 413 (axum's body limit, before anything is read into memory);
//! 2. signature (`X-Hub-Signature-256` / `X-Gitea-Signature`) missing or wrong, or no secret
//!    configured: 401;
//! 3. body not JSON: 400;
//! 4. `ping`: 200; an event kiln does not run on: 202, ignored and counted;
//! 5. no delivery id: 400; a delivery id seen before: 200, ignored (a replay);
//! 6. otherwise the delivery is recorded in the store and the answer is 202. The intake task
//!    turns it into runs ([`crate::intake`]).
//!
//! [`Trigger::from_delivery`] reads the fields kiln needs from a payload; GitHub's and Gitea's
//! payloads share the shapes used here.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use kiln_store::Delivery;
use tracing::{debug, error, info};

use crate::Shared;
use crate::signature::{verify_gitea, verify_github};

/// The events kiln turns into runs.
pub const RUN_EVENTS: [&str; 3] = ["push", "pull_request", "workflow_dispatch"];

/// Webhook routes with a body limit of `max_body` bytes.
pub(crate) fn routes(max_body: usize) -> Router<Arc<Shared>> {
    Router::new()
        .route("/webhooks/github", post(github))
        .route("/webhooks/gitea", post(gitea))
        .layer(DefaultBodyLimit::max(max_body))
}

/// Which forge a webhook came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forge {
    /// GitHub (or GHES).
    GitHub,
    /// Gitea (or Forgejo).
    Gitea,
}

impl Forge {
    /// `github` or `gitea`.
    pub fn as_str(self) -> &'static str {
        match self {
            Forge::GitHub => "github",
            Forge::Gitea => "gitea",
        }
    }

    /// Parses [`Forge::as_str`].
    pub fn parse(s: &str) -> Option<Forge> {
        match s {
            "github" => Some(Forge::GitHub),
            "gitea" => Some(Forge::Gitea),
            _ => None,
        }
    }
}

async fn github(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    receive(&shared, Forge::GitHub, &headers, &body).await
}

async fn gitea(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Bytes) -> Response {
    receive(&shared, Forge::Gitea, &headers, &body).await
}

fn answer(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "message": message }))).into_response()
}

async fn receive(shared: &Shared, forge: Forge, headers: &HeaderMap, body: &[u8]) -> Response {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let (secret, signature, event, delivery) = match forge {
        Forge::GitHub => (
            &shared.config.secrets.github_webhook,
            header("x-hub-signature-256"),
            header("x-github-event"),
            header("x-github-delivery"),
        ),
        Forge::Gitea => (
            &shared.config.secrets.gitea_webhook,
            header("x-gitea-signature"),
            header("x-gitea-event"),
            header("x-gitea-delivery"),
        ),
    };
    let count = |result: &str| shared.metrics.webhook(forge.as_str(), result);
    let Some(secret) = secret else {
        count("unauthorized");
        return answer(
            StatusCode::UNAUTHORIZED,
            "No webhook secret is configured for this endpoint",
        );
    };
    let verified = match forge {
        Forge::GitHub => verify_github(secret.as_bytes(), signature, body),
        Forge::Gitea => verify_gitea(secret.as_bytes(), signature, body),
    };
    if let Err(e) = verified {
        count("unauthorized");
        debug!("{} webhook rejected: {e}", forge.as_str());
        return answer(StatusCode::UNAUTHORIZED, &e.to_string());
    }
    if serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
        count("malformed");
        return answer(StatusCode::BAD_REQUEST, "The body is not valid JSON");
    }
    let Some(event) = event else {
        count("malformed");
        return answer(StatusCode::BAD_REQUEST, "No event header");
    };
    if event == "ping" {
        count("ping");
        return answer(StatusCode::OK, "pong");
    }
    if !RUN_EVENTS.contains(&event) {
        count("ignored");
        info!("Ignoring {} event `{event}`", forge.as_str());
        return answer(StatusCode::ACCEPTED, "Event ignored");
    }
    let Some(delivery) = delivery.filter(|d| !d.is_empty() && d.len() <= 200) else {
        count("malformed");
        return answer(StatusCode::BAD_REQUEST, "No delivery id header");
    };
    let record = Delivery {
        source: forge.as_str().to_owned(),
        id: delivery.to_owned(),
        event: event.to_owned(),
        payload: String::from_utf8_lossy(body).into_owned(),
    };
    match shared.store.record_delivery(&record).await {
        Ok(true) => {
            count("accepted");
            shared.wake_intake.notify_one();
            answer(StatusCode::ACCEPTED, "Queued")
        }
        Ok(false) => {
            count("duplicate");
            info!("Ignoring replayed {} delivery {delivery}", forge.as_str());
            answer(StatusCode::OK, "Duplicate delivery ignored")
        }
        Err(e) => {
            count("error");
            error!("Cannot record delivery {delivery}: {e}");
            answer(
                StatusCode::SERVICE_UNAVAILABLE,
                "Cannot record the delivery",
            )
        }
    }
}

/// What an event asks kiln to run.
#[derive(Debug, Clone, PartialEq)]
pub struct Trigger {
    /// Which forge.
    pub forge: Forge,
    /// Event name.
    pub event: String,
    /// `owner/name`.
    pub repository: String,
    /// Where to fetch from.
    pub clone_url: String,
    /// The ref to fetch.
    pub fetch_ref: String,
    /// The run's `GITHUB_REF`.
    pub git_ref: String,
    /// The exact commit, when the event names one.
    pub sha: Option<String>,
    /// The payload.
    pub payload: serde_json::Value,
    /// `workflow_dispatch` inputs.
    pub inputs: serde_json::Value,
    /// `workflow_dispatch`: only this workflow file.
    pub only_workflow: Option<String>,
    /// Files the event changed, when the payload lists them.
    pub changed_files: Option<Vec<String>>,
}

/// Why a payload cannot become runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    /// A required field is missing.
    #[error("The payload has no `{0}`")]
    Missing(&'static str),
    /// Nothing to run for this event (a deleted branch, a closed pull request...).
    #[error("Nothing to run: {0}")]
    Nothing(String),
    /// The body is not JSON.
    #[error("The payload is not valid JSON")]
    Json,
}

impl Trigger {
    /// Reads a recorded delivery.
    pub fn from_delivery(
        forge: Forge,
        event: &str,
        payload: &str,
    ) -> Result<Trigger, TriggerError> {
        let payload: serde_json::Value =
            serde_json::from_str(payload).map_err(|_| TriggerError::Json)?;
        let s = |pointer: &str| payload.pointer(pointer).and_then(|v| v.as_str());
        let repository = s("/repository/full_name")
            .ok_or(TriggerError::Missing("repository.full_name"))?
            .to_owned();
        let clone_url = s("/repository/clone_url")
            .ok_or(TriggerError::Missing("repository.clone_url"))?
            .to_owned();
        let zero = |sha: &str| sha.bytes().all(|b| b == b'0');
        let mut trigger = Trigger {
            forge,
            event: event.to_owned(),
            repository,
            clone_url,
            fetch_ref: String::new(),
            git_ref: String::new(),
            sha: None,
            payload: serde_json::Value::Null,
            inputs: serde_json::json!({}),
            only_workflow: None,
            changed_files: None,
        };
        match event {
            "push" => {
                let git_ref = s("/ref").ok_or(TriggerError::Missing("ref"))?;
                let after = s("/after").ok_or(TriggerError::Missing("after"))?;
                if payload.get("deleted").and_then(|v| v.as_bool()) == Some(true) || zero(after) {
                    return Err(TriggerError::Nothing(format!("{git_ref} was deleted")));
                }
                trigger.fetch_ref = git_ref.to_owned();
                trigger.git_ref = git_ref.to_owned();
                trigger.sha = Some(after.to_owned());
                trigger.changed_files = changed_files(&payload);
            }
            "pull_request" => {
                let number = payload
                    .pointer("/pull_request/number")
                    .or_else(|| payload.get("number"))
                    .and_then(|v| v.as_u64())
                    .ok_or(TriggerError::Missing("pull_request.number"))?;
                let head = s("/pull_request/head/sha")
                    .ok_or(TriggerError::Missing("pull_request.head.sha"))?;
                if s("/action") == Some("closed") {
                    return Err(TriggerError::Nothing(format!(
                        "pull request #{number} was closed"
                    )));
                }
                // The head is what the pull request shows (statuses go there) and the fallback;
                // intake and the worker run the merge commit of `refs/pull/N/merge` when it
                // merges this head (`GitCache::fetch_pull_merge`), as GitHub does.
                trigger.fetch_ref = format!("refs/pull/{number}/head");
                trigger.git_ref = format!("refs/pull/{number}/merge");
                trigger.sha = Some(head.to_owned());
            }
            "workflow_dispatch" => {
                let git_ref = s("/ref").ok_or(TriggerError::Missing("ref"))?;
                trigger.fetch_ref = git_ref.to_owned();
                trigger.git_ref = git_ref.to_owned();
                trigger.inputs = payload
                    .get("inputs")
                    .filter(|v| v.is_object())
                    .cloned()
                    .unwrap_or_else(|| serde_json::json!({}));
                trigger.only_workflow = s("/workflow").map(str::to_owned);
            }
            other => return Err(TriggerError::Nothing(format!("event `{other}`"))),
        }
        trigger.payload = payload;
        Ok(trigger)
    }

    /// The event as trigger filters see it.
    pub fn event(&self) -> kiln_workflow::Event {
        kiln_workflow::Event {
            name: self.event.clone(),
            payload: self.payload.clone(),
            changed_files: self.changed_files.clone(),
        }
    }
}

/// `added`, `modified` and `removed` of every commit of a push, when all are listed.
fn changed_files(payload: &serde_json::Value) -> Option<Vec<String>> {
    let commits = payload.get("commits")?.as_array()?;
    if commits.is_empty() {
        return None;
    }
    let mut files = Vec::new();
    for commit in commits {
        for key in ["added", "modified", "removed"] {
            for f in commit.get(key)?.as_array()? {
                files.push(f.as_str()?.to_owned());
            }
        }
    }
    files.sort();
    files.dedup();
    Some(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn push(after: &str) -> String {
        serde_json::json!({
            "ref": "refs/heads/main",
            "after": after,
            "repository": {"full_name": "octo/app", "clone_url": "https://github.com/octo/app.git"},
            "commits": [{"added": ["a.rs"], "modified": ["src/b.rs"], "removed": []}],
        })
        .to_string()
    }

    #[test]
    fn push_names_ref_commit_and_changed_files() {
        let sha = "1".repeat(40);
        let t = Trigger::from_delivery(Forge::GitHub, "push", &push(&sha)).expect("trigger");
        assert_eq!(t.repository, "octo/app");
        assert_eq!(t.fetch_ref, "refs/heads/main");
        assert_eq!(t.sha.as_deref(), Some(sha.as_str()));
        assert_eq!(
            t.changed_files,
            Some(vec!["a.rs".into(), "src/b.rs".into()])
        );
    }

    #[test]
    fn deleted_branch_runs_nothing() {
        let err = Trigger::from_delivery(Forge::GitHub, "push", &push(&"0".repeat(40)));
        assert!(matches!(err, Err(TriggerError::Nothing(_))), "{err:?}");
    }

    #[test]
    fn pull_request_fetches_the_head_commit() {
        let body = serde_json::json!({
            "action": "synchronize",
            "number": 7,
            "pull_request": {"number": 7, "head": {"sha": "abc"}, "base": {"ref": "main"}},
            "repository": {"full_name": "octo/app", "clone_url": "https://github.com/octo/app.git"},
        })
        .to_string();
        let t = Trigger::from_delivery(Forge::GitHub, "pull_request", &body).expect("trigger");
        assert_eq!(t.fetch_ref, "refs/pull/7/head");
        assert_eq!(t.git_ref, "refs/pull/7/merge");
        assert_eq!(t.sha.as_deref(), Some("abc"));
    }

    #[test]
    fn dispatch_carries_inputs_and_workflow() {
        let body = serde_json::json!({
            "ref": "refs/heads/main",
            "workflow": ".github/workflows/ci.yml",
            "inputs": {"level": "3"},
            "repository": {"full_name": "octo/app", "clone_url": "https://github.com/octo/app.git"},
        })
        .to_string();
        let t = Trigger::from_delivery(Forge::GitHub, "workflow_dispatch", &body).expect("t");
        assert_eq!(t.inputs["level"], "3");
        assert_eq!(t.only_workflow.as_deref(), Some(".github/workflows/ci.yml"));
        assert_eq!(t.sha, None);
    }

    #[test]
    fn missing_repository_is_named() {
        let err = Trigger::from_delivery(Forge::Gitea, "push", "{}");
        assert_eq!(err, Err(TriggerError::Missing("repository.full_name")));
    }
}
