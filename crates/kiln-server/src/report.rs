//! Commit statuses, and the reporter task that delivers everything in the store's outbox
//! (statuses, and the check runs of [`crate::checks`]).
//!
//! Each state change of a run that came from a forge puts one status in the outbox: `pending`
//! when it is queued (and again when it starts), then `success`, `failure` or `error` when it
//! ends. The context is `kiln/<workflow name>`, the `target_url` the run's page under
//! `public_url`. Statuses of one commit and context share an outbox key, so they reach the forge
//! in the order they were made even across retries.
//!
//! The reporter task sends due items: GitHub `POST {github_api_url}/repos/{repo}/statuses/{sha}`
//! with `Authorization: Bearer <KILN_GITHUB_TOKEN>`; Gitea the same path under its API base with
//! `Authorization: token <KILN_GITEA_TOKEN>`. GitHub runs get no statuses when a GitHub App is
//! configured: they get check runs instead. A failure (network, 5xx, 429, 4xx) is retried
//! after 1 s, 2 s, 4 s ... capped at 10 minutes, and given up after [`MAX_ATTEMPTS`]. Tokens are
//! read at send time, never stored in the outbox.

use std::sync::Arc;
use std::time::Duration;

use kiln_store::{RunRecord, RunResult, RunStatus};
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use crate::Shared;
use crate::webhook::Forge;

/// Attempts before a report is given up.
pub const MAX_ATTEMPTS: u32 = 25;

/// One commit status, as stored in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    /// `github` or `gitea`.
    pub forge: String,
    /// The API base URL.
    pub api_url: String,
    /// `owner/name`.
    pub repository: String,
    /// The commit.
    pub sha: String,
    /// `pending`, `success`, `failure` or `error`.
    pub state: String,
    /// `kiln/<workflow>`.
    pub context: String,
    /// One line for people.
    pub description: String,
    /// The run's page.
    pub target_url: String,
}

/// The status a run's state maps to, with a description.
pub fn status_of(run: &RunRecord) -> (&'static str, String) {
    match (run.status, run.result) {
        (RunStatus::Queued, _) => ("pending", "Queued".to_owned()),
        (RunStatus::Running, _) => ("pending", "Running".to_owned()),
        (RunStatus::Finished, Some(RunResult::Success)) => ("success", "Succeeded".to_owned()),
        (RunStatus::Finished, Some(RunResult::Failure)) => (
            "failure",
            match run.error.as_deref() {
                Some(e) => format!("Failed: {e}"),
                None => "Failed".to_owned(),
            },
        ),
        (RunStatus::Finished, Some(RunResult::Cancelled)) => ("error", "Cancelled".to_owned()),
        (RunStatus::Finished, _) => ("error", "kiln could not run this workflow".to_owned()),
    }
}

/// The API base for a run's forge.
fn api_url(shared: &Shared, forge: Forge, run: &RunRecord) -> Option<String> {
    match forge {
        Forge::GitHub => Some(shared.config.github_api_url.clone()),
        Forge::Gitea => shared.config.gitea_api_url.clone().or_else(|| {
            // https://gitea.example/owner/repo -> https://gitea.example/api/v1
            let html = run.spec.payload.pointer("/repository/html_url")?.as_str()?;
            let base = html.strip_suffix(&format!("/{}", run.spec.repository))?;
            Some(format!("{base}/api/v1"))
        }),
    }
}

/// Puts `run`'s current status in the outbox (runs from forges with a token configured only).
pub(crate) async fn queue_status(shared: &Shared, run: &RunRecord) {
    let Some(forge) = Forge::parse(&run.spec.forge) else {
        return;
    };
    if crate::checks::enabled(shared, run) {
        return;
    }
    let token = match forge {
        Forge::GitHub => &shared.config.secrets.github_token,
        Forge::Gitea => &shared.config.secrets.gitea_token,
    };
    if token.is_none() {
        debug!("No {} token: no status for run {}", forge.as_str(), run.id);
        return;
    }
    let Some(api_url) = api_url(shared, forge, run) else {
        warn!("Run {}: no API URL for {}", run.id, forge.as_str());
        return;
    };
    let (state, description) = status_of(run);
    let report = StatusReport {
        forge: forge.as_str().to_owned(),
        api_url: api_url.trim_end_matches('/').to_owned(),
        repository: run.spec.repository.clone(),
        sha: run.spec.sha.clone(),
        state: state.to_owned(),
        context: format!("kiln/{}", run.spec.workflow_name),
        description,
        target_url: format!("{}/runs/{}", shared.config.public_url, run.id),
    };
    let key = format!(
        "{}:{}:{}:{}",
        report.forge, report.repository, report.sha, report.context
    );
    let body = match serde_json::to_string(&report) {
        Ok(b) => b,
        Err(e) => {
            error!("Run {}: cannot encode its status: {e}", run.id);
            return;
        }
    };
    match shared.store.push_outbox(&key, "status", &body).await {
        Ok(_) => shared.wake_outbox.notify_one(),
        Err(e) => error!(
            "Run {}: cannot queue its status: {}",
            run.id,
            crate::api::chain(&e)
        ),
    }
}

/// Backoff after `attempts` failed attempts.
pub fn backoff(attempts: u32) -> Duration {
    let secs = 1u64 << attempts.min(10);
    Duration::from_secs(secs.min(600))
}

/// The reporter task.
pub(crate) async fn run_reporter(shared: Arc<Shared>) {
    loop {
        match shared.store.due_outbox(32).await {
            Ok(items) => {
                for item in items {
                    let outcome = deliver(&shared, &item.kind, &item.body).await;
                    let stored = match outcome {
                        Ok(what) => {
                            info!("Report {} delivered: {what}", item.id);
                            shared.metrics.report("delivered");
                            shared.store.outbox_delivered(item.id).await
                        }
                        Err(e) => {
                            let attempts = item.attempts + 1;
                            let retry = (attempts < MAX_ATTEMPTS).then(|| backoff(attempts - 1));
                            warn!(
                                "Report {} failed (attempt {attempts}): {e}{}",
                                item.id,
                                if retry.is_some() { "" } else { "; giving up" }
                            );
                            shared
                                .metrics
                                .report(if retry.is_some() { "retry" } else { "dead" });
                            shared.store.outbox_failed(item.id, &e, retry).await
                        }
                    };
                    if let Err(e) = stored {
                        error!("Outbox: {}", crate::api::chain(&e));
                    }
                }
            }
            Err(e) => error!("Outbox: {}", crate::api::chain(&e)),
        }
        tokio::select! {
            () = shared.wake_outbox.notified() => {}
            () = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

/// Sends one outbox item; `Ok` says what was delivered, `Err` why not.
async fn deliver(shared: &Shared, kind: &str, body: &str) -> Result<String, String> {
    match kind {
        "status" => {
            let report = serde_json::from_str::<StatusReport>(body)
                .map_err(|e| format!("Unreadable report: {e}"))?;
            send(shared, &report).await?;
            Ok(format!(
                "status {} for {}@{} ({})",
                report.state, report.repository, report.sha, report.context
            ))
        }
        "github_check_run" => {
            let report = serde_json::from_str::<crate::checks::CheckRunReport>(body)
                .map_err(|e| format!("Unreadable report: {e}"))?;
            crate::checks::send(shared, &report).await?;
            Ok(format!(
                "check run {:?} of {} for {}@{}",
                report.action, report.name, report.repository, report.head_sha
            ))
        }
        other => Err(format!("Unknown report kind `{other}`")),
    }
}

async fn send(shared: &Shared, report: &StatusReport) -> Result<(), String> {
    let forge = Forge::parse(&report.forge).ok_or_else(|| "Unknown forge".to_owned())?;
    let url = format!(
        "{}/repos/{}/statuses/{}",
        report.api_url, report.repository, report.sha
    );
    let body = serde_json::json!({
        "state": report.state,
        "target_url": report.target_url,
        "description": report.description.chars().take(140).collect::<String>(),
        "context": report.context,
    });
    let request = shared.http.post(&url).json(&body);
    let request = match forge {
        Forge::GitHub => {
            let token = shared
                .config
                .secrets
                .github_token
                .as_deref()
                .unwrap_or_default();
            request
                .bearer_auth(token)
                .header("Accept", "application/vnd.github+json")
                .header("X-GitHub-Api-Version", "2022-11-28")
        }
        Forge::Gitea => {
            let token = shared
                .config
                .secrets
                .gitea_token
                .as_deref()
                .unwrap_or_default();
            request.header("Authorization", format!("token {token}"))
        }
    };
    let response = request.send().await.map_err(|e| {
        // reqwest's message names the URL but never the token (it is a header).
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(&format!(": {s}"));
            source = s.source();
        }
        text
    })?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("HTTP {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(20), Duration::from_secs(600));
    }
}
