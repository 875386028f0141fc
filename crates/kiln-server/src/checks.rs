//! GitHub check runs, one per job, when a GitHub App is configured (instead of commit statuses).
//!
//! ```text
//! job_started  ─> outbox: create  ─> POST  /repos/{repo}/check-runs        {status: in_progress}
//!                                      └─ the answer's id is kept (RunStore::put_report_ref)
//! job_finished ─> outbox: complete ─> PATCH /repos/{repo}/check-runs/{id}  {status: completed,
//!                                      conclusion, output {title, summary, annotations ≤ 50}}
//!              ─> outbox: annotate ─> PATCH ... {output {title, summary, the next 50}} ...
//! ```
//! All items of one check run share an outbox key, so they are sent in order, each retried with
//! backoff until it is delivered; a restart in between changes nothing (the id is in the store).
//! GitHub accepts at most 50 annotations per request and appends those of later updates, so the
//! rest go in further updates of 50. A completion whose create was given up creates the check
//! run completed instead.
//!
//! Other cases: a run that ends before any job started (the commit could not be fetched, the
//! workflow is invalid) gets one completed check run named after the workflow; jobs a restart
//! interrupted are completed (`failure`, or `cancelled` when the run is queued again).
//!
//! Calls use an installation token of the App (see [`crate::github_app`]); so do git fetches
//! when no `KILN_GITHUB_TOKEN` is set (`clone_token`).

use std::sync::Arc;

use kiln_runner::event::{Conclusion, EventKind};
use kiln_runner::executor::Annotation;
use kiln_store::{RunRecord, RunStatus};
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::Shared;
use crate::github_app::github_request;

/// GitHub's limit of annotations per request.
pub const ANNOTATIONS_PER_REQUEST: usize = 50;

/// GitHub's limit on `output.summary`.
const SUMMARY_LIMIT: usize = 65_535;

/// One check-run call, as stored in the outbox.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckRunReport {
    /// GitHub's API base.
    pub api_url: String,
    /// `owner/name`.
    pub repository: String,
    /// The App installation (from the webhook payload); `None`: looked up for the repository.
    pub installation: Option<u64>,
    /// Where the check run's id is kept.
    pub ref_key: String,
    /// The check run's name (the job's display name).
    pub name: String,
    /// The commit.
    pub head_sha: String,
    /// `create` (POST) or `update` (PATCH).
    pub action: CheckAction,
    /// The request body.
    pub body: serde_json::Value,
}

/// What a [`CheckRunReport`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckAction {
    /// `POST /repos/{repo}/check-runs`, keeping the id.
    Create,
    /// `PATCH /repos/{repo}/check-runs/{id}`.
    Update,
}

/// Whether `run`'s reports are check runs (a GitHub run with an App configured).
pub(crate) fn enabled(shared: &Shared, run: &RunRecord) -> bool {
    shared.github_app.is_some() && run.spec.forge == "github"
}

/// The outbox key (and report ref key) of one job's check run.
fn key(run: &RunRecord, job: &str, name: &str) -> String {
    format!(
        "github_check:{}:{}:{job}:{name}",
        run.spec.repository, run.id
    )
}

fn details_url(shared: &Shared, run: &RunRecord) -> String {
    format!("{}/runs/{}", shared.config.public_url, run.id)
}

fn report(shared: &Shared, run: &RunRecord, ref_key: String, name: &str) -> CheckRunReport {
    CheckRunReport {
        api_url: shared
            .config
            .github_api_url
            .trim_end_matches('/')
            .to_owned(),
        repository: run.spec.repository.clone(),
        installation: run
            .spec
            .payload
            .pointer("/installation/id")
            .and_then(serde_json::Value::as_u64),
        ref_key,
        name: name.to_owned(),
        head_sha: run.spec.sha.clone(),
        action: CheckAction::Create,
        body: serde_json::Value::Null,
    }
}

async fn push(shared: &Shared, run: &RunRecord, item: &CheckRunReport) {
    let body = match serde_json::to_string(item) {
        Ok(b) => b,
        Err(e) => {
            error!("Run {}: cannot encode a check run report: {e}", run.id);
            return;
        }
    };
    match shared
        .store
        .push_outbox(&item.ref_key, "github_check_run", &body)
        .await
    {
        Ok(_) => shared.wake_outbox.notify_one(),
        Err(e) => error!(
            "Run {}: cannot queue a check run report: {}",
            run.id,
            crate::api::chain(&e)
        ),
    }
}

fn now() -> String {
    jiff::Timestamp::now().to_string()
}

/// A job started: its check run is created `in_progress`.
pub(crate) async fn job_started(shared: &Shared, run: &RunRecord, job: &str, name: &str) {
    let mut item = report(shared, run, key(run, job, name), name);
    item.body = serde_json::json!({
        "name": name,
        "head_sha": run.spec.sha,
        "status": "in_progress",
        "started_at": now(),
        "details_url": details_url(shared, run),
        "external_id": run.id,
    });
    push(shared, run, &item).await;
}

/// GitHub's `annotation_level` for a workflow command.
fn level(command: &str) -> &'static str {
    match command {
        "error" => "failure",
        "warning" => "warning",
        _ => "notice",
    }
}

/// One annotation in GitHub's shape. Without `file=` it points at `.github`, as GitHub's own
/// runner does.
fn annotation(a: &Annotation) -> serde_json::Value {
    let line = a.line.unwrap_or(1).max(1);
    let mut value = serde_json::json!({
        "path": a.file.as_deref().unwrap_or(".github"),
        "start_line": line,
        "end_line": line,
        "annotation_level": level(&a.level),
        "message": a.message.chars().take(64 * 1024).collect::<String>(),
    });
    if let Some(col) = a.col {
        value["start_column"] = col.into();
        value["end_column"] = col.into();
    }
    if let Some(title) = &a.title {
        value["title"] = title.chars().take(255).collect::<String>().into();
    }
    value
}

/// The check run's title: the result, and how many annotations of each level.
fn title(conclusion: Conclusion, annotations: &[Annotation]) -> String {
    let word = match conclusion {
        Conclusion::Success => "Succeeded",
        Conclusion::Failure => "Failed",
        Conclusion::Cancelled => "Cancelled",
        Conclusion::Skipped => "Skipped",
    };
    let count = |level: &str| annotations.iter().filter(|a| a.level == level).count();
    let parts: Vec<String> = [
        ("error", count("error")),
        ("warning", count("warning")),
        ("notice", count("notice")),
    ]
    .iter()
    .filter(|(_, n)| *n > 0)
    .map(|(word, n)| format!("{n} {word}{}", if *n == 1 { "" } else { "s" }))
    .collect();
    if parts.is_empty() {
        word.to_owned()
    } else {
        format!("{word}: {}", parts.join(", "))
    }
}

/// The step summary, or a line pointing at the logs when the job wrote none.
fn summary(step_summary: &str, details_url: &str) -> String {
    let text = if step_summary.trim().is_empty() {
        format!("No step summary. [Logs in kiln]({details_url})")
    } else {
        step_summary.to_owned()
    };
    if text.len() <= SUMMARY_LIMIT {
        return text;
    }
    let note = "\n\n… (truncated: GitHub keeps 65,535 characters)";
    let mut cut = SUMMARY_LIMIT - note.len();
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{note}", &text[..cut])
}

/// A job finished: its check run is completed with the conclusion, the step summary and the
/// first 50 annotations; further updates carry the rest, 50 at a time.
pub(crate) async fn job_finished(
    shared: &Shared,
    run: &RunRecord,
    job: &str,
    name: &str,
    conclusion: Conclusion,
    step_summary: &str,
    annotations: &[Annotation],
) {
    let details = details_url(shared, run);
    let title = title(conclusion, annotations);
    let summary = summary(step_summary, &details);
    let mut batches = annotations.chunks(ANNOTATIONS_PER_REQUEST);
    let first: Vec<serde_json::Value> = batches
        .next()
        .unwrap_or_default()
        .iter()
        .map(annotation)
        .collect();
    let mut item = report(shared, run, key(run, job, name), name);
    item.action = CheckAction::Update;
    item.body = serde_json::json!({
        "status": "completed",
        "conclusion": conclusion.as_str(),
        "completed_at": now(),
        "details_url": details,
        "output": {"title": title, "summary": summary, "annotations": first},
    });
    push(shared, run, &item).await;
    for batch in batches {
        item.body = serde_json::json!({
            "output": {
                "title": title,
                "summary": summary,
                "annotations": batch.iter().map(annotation).collect::<Vec<_>>(),
            },
        });
        push(shared, run, &item).await;
    }
}

/// A run ended before any job started: one completed check run named after the workflow says
/// why.
pub(crate) async fn run_failed_early(shared: &Shared, run: &RunRecord) {
    let name = run.spec.workflow_name.clone();
    let conclusion = match run.result {
        Some(kiln_store::RunResult::Cancelled) => "cancelled",
        _ => "failure",
    };
    let mut item = report(shared, run, key(run, "", &name), &name);
    item.body = serde_json::json!({
        "name": name,
        "head_sha": run.spec.sha,
        "status": "completed",
        "conclusion": conclusion,
        "completed_at": now(),
        "details_url": details_url(shared, run),
        "external_id": run.id,
        "output": {
            "title": if conclusion == "cancelled" { "Cancelled" } else { "kiln could not run this workflow" },
            "summary": run.error.as_deref().unwrap_or("See the run's log in kiln."),
        },
    });
    push(shared, run, &item).await;
}

/// After a restart: completes the check runs of `run`'s jobs that had started and not finished.
pub(crate) async fn interrupted(shared: &Shared, run: &RunRecord) {
    let mut open: Vec<(String, String)> = Vec::new();
    let mut after = 0;
    loop {
        let events = match shared.store.events(&run.id, after, 1000).await {
            Ok(events) => events,
            Err(e) => {
                error!(
                    "Run {}: cannot read its events: {}",
                    run.id,
                    crate::api::chain(&e)
                );
                return;
            }
        };
        let Some(last) = events.last() else { break };
        after = last.id;
        for event in &events {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(&event.body) else {
                continue;
            };
            let field = |name: &str| value[name].as_str().unwrap_or_default().to_owned();
            match value["type"].as_str() {
                Some("job_started") => open.push((field("job"), field("name"))),
                Some("job_finished") => {
                    let done = (field("job"), field("name"));
                    open.retain(|o| *o != done);
                }
                _ => {}
            }
        }
    }
    let (conclusion, text) = if run.status == RunStatus::Queued {
        (
            "cancelled",
            "kiln restarted during this job; the run was queued again.",
        )
    } else {
        ("failure", "kiln restarted during this job (interrupted).")
    };
    for (job, name) in open {
        let mut item = report(shared, run, key(run, &job, &name), &name);
        item.action = CheckAction::Update;
        item.body = serde_json::json!({
            "status": "completed",
            "conclusion": conclusion,
            "completed_at": now(),
            "details_url": details_url(shared, run),
            "output": {"title": "Interrupted", "summary": text},
        });
        push(shared, run, &item).await;
    }
}

/// Watches a run's events for job starts and ends.
pub(crate) struct JobWatcher {
    shared: Arc<Shared>,
    run: RunRecord,
    /// Jobs whose check run was created.
    pub(crate) started: usize,
}

impl JobWatcher {
    /// A watcher for `run` (does nothing unless check runs are enabled for it).
    pub(crate) fn new(shared: Arc<Shared>, run: RunRecord) -> JobWatcher {
        JobWatcher {
            shared,
            run,
            started: 0,
        }
    }

    /// The server's shared state.
    pub(crate) fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// The run watched.
    pub(crate) fn run_id(&self) -> &str {
        &self.run.id
    }

    /// Acts on one event.
    pub(crate) async fn event(&mut self, kind: &EventKind) {
        if !enabled(&self.shared, &self.run) {
            return;
        }
        match kind {
            EventKind::JobStarted { job, name } => {
                self.started += 1;
                job_started(&self.shared, &self.run, job, name).await;
            }
            EventKind::JobFinished {
                job,
                name,
                result,
                summary,
                annotations,
                ..
            } => {
                job_finished(
                    &self.shared,
                    &self.run,
                    job,
                    name,
                    *result,
                    summary,
                    annotations,
                )
                .await;
            }
            _ => {}
        }
    }
}

/// The token to fetch a GitHub repository with when only a GitHub App is configured: an
/// installation token (`None` otherwise: git then uses `KILN_GITHUB_TOKEN`, or nothing for
/// public repositories).
pub(crate) async fn clone_token(
    shared: &Shared,
    forge: &str,
    repository: &str,
    payload: &serde_json::Value,
) -> Option<String> {
    let app = shared.github_app.as_ref()?;
    if forge != "github" || shared.config.secrets.github_token.is_some() {
        return None;
    }
    let installation = payload
        .pointer("/installation/id")
        .and_then(serde_json::Value::as_u64);
    match app
        .installation_token(
            &shared.http,
            shared.config.github_api_url.trim_end_matches('/'),
            repository,
            installation,
        )
        .await
    {
        Ok(token) => Some(token),
        Err(e) => {
            tracing::warn!("Fetching {repository} without credentials: {e}");
            None
        }
    }
}

/// Sends one check-run item. `Err` is a message for the log.
pub(crate) async fn send(shared: &Shared, report: &CheckRunReport) -> Result<(), String> {
    let app = shared
        .github_app
        .as_ref()
        .ok_or("A check run report, but no GitHub App is configured now")?;
    let token = app
        .installation_token(
            &shared.http,
            &report.api_url,
            &report.repository,
            report.installation,
        )
        .await?;
    let id = match report.action {
        CheckAction::Create => None,
        CheckAction::Update => shared
            .store
            .report_ref(&report.ref_key)
            .await
            .map_err(|e| crate::api::chain(&e))?,
    };
    let base = format!("{}/repos/{}/check-runs", report.api_url, report.repository);
    let request = match (&id, report.action) {
        (Some(id), _) => shared.http.patch(format!("{base}/{id}")).json(&report.body),
        (None, CheckAction::Create) => shared.http.post(&base).json(&report.body),
        (None, CheckAction::Update) => {
            // The create was given up: create the check run in its final state instead (an
            // update that only adds annotations cannot stand alone).
            if report.body.get("status").is_none() {
                return Err("The check run was never created".to_owned());
            }
            let mut body = report.body.clone();
            body["name"] = report.name.clone().into();
            body["head_sha"] = report.head_sha.clone().into();
            shared.http.post(&base).json(&body)
        }
    };
    let response = github_request(request, &token)
        .send()
        .await
        .map_err(|e| crate::api::chain(&e))?;
    let status = response.status();
    if status == reqwest::StatusCode::UNAUTHORIZED {
        app.forget_token(&report.api_url, &token);
    }
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    if id.is_none() {
        #[derive(Deserialize)]
        struct Created {
            id: u64,
        }
        let created: Created = response
            .json()
            .await
            .map_err(|e| format!("Unreadable check run answer: {e}"))?;
        shared
            .store
            .put_report_ref(&report.ref_key, &created.id.to_string())
            .await
            .map_err(|e| crate::api::chain(&e))?;
        info!(
            "Check run {} ({}) created for {}@{}",
            created.id, report.name, report.repository, report.head_sha
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn note(level: &str, file: Option<&str>, line: Option<u32>) -> Annotation {
        Annotation {
            level: level.to_owned(),
            message: "m".to_owned(),
            file: file.map(str::to_owned),
            line,
            col: None,
            title: None,
            step: 0,
        }
    }

    #[test]
    fn annotations_take_github_levels_and_default_to_the_workflow_dir() {
        let a = annotation(&note("error", Some("src/lib.rs"), Some(3)));
        assert_eq!(a["annotation_level"], "failure");
        assert_eq!(
            (a["path"].as_str(), a["start_line"].as_u64()),
            (Some("src/lib.rs"), Some(3))
        );
        let b = annotation(&note("notice", None, None));
        assert_eq!(
            (b["path"].as_str(), b["start_line"].as_u64()),
            (Some(".github"), Some(1))
        );
    }

    #[test]
    fn titles_count_annotations() {
        let list = [
            note("error", None, None),
            note("error", None, None),
            note("warning", None, None),
        ];
        assert_eq!(
            title(Conclusion::Failure, &list),
            "Failed: 2 errors, 1 warning"
        );
        assert_eq!(title(Conclusion::Success, &[]), "Succeeded");
    }

    #[test]
    fn long_summaries_are_cut_at_githubs_limit() {
        let long = "é".repeat(40_000);
        let text = summary(&long, "u");
        assert!(text.len() <= SUMMARY_LIMIT);
        assert!(text.ends_with("characters)"));
        assert!(summary("", "http://k/runs/1").contains("http://k/runs/1"));
    }
}
