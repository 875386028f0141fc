//! From a recorded delivery to queued runs.
//!
//! The intake task takes pending deliveries oldest first (at start, and whenever the webhook
//! handler records one), fetches the event's commit, reads the commit's
//! `.github/workflows/*`, keeps the workflows whose `on:` matches the event and its filters
//! (`Triggers::matches`), and enqueues one run per workflow. A delivery is marked done only
//! after its runs are in the store, so a crash in between repeats the intake instead of losing
//! it (a repeated intake can enqueue a run twice; it never drops one).
//!
//! `concurrency:` is evaluated here against the `github` context: a new run in a group cancels
//! the group's older queued runs (GitHub keeps at most one pending), and with
//! `cancel-in-progress` also its running run.

use std::sync::Arc;
use std::time::Duration;

use indexmap::IndexMap;
use kiln_store::{NewRun, RunRecord, RunStatus};
use kiln_workflow::{BoolOrExpr, EvalContext, Host, JobStatus, Value, Workflow};
use tracing::{error, info, warn};

use crate::Shared;
use crate::git::GitError;
use crate::webhook::{Forge, Trigger, TriggerError};

/// Why an event could not be turned into runs.
#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    /// The payload is unusable.
    #[error("Unusable event")]
    Trigger(#[from] TriggerError),
    /// Fetching failed.
    #[error("Cannot fetch the repository")]
    Git(#[from] GitError),
    /// The store failed.
    #[error("Store error")]
    Store(#[from] kiln_store::StoreError),
}

/// The intake task (see the module docs).
pub(crate) async fn run_intake(shared: Arc<Shared>) {
    loop {
        match shared.store.pending_deliveries().await {
            Ok(deliveries) => {
                for d in deliveries {
                    let Some(forge) = Forge::parse(&d.source) else {
                        continue;
                    };
                    let outcome = match Trigger::from_delivery(forge, &d.event, &d.payload) {
                        Ok(trigger) => enqueue_trigger(&shared, &trigger, Some(&d.id)).await,
                        Err(e) => Err(e.into()),
                    };
                    let error = match outcome {
                        Ok(runs) => {
                            info!(
                                "Delivery {} ({}): {} run(s) queued",
                                d.id,
                                d.event,
                                runs.len()
                            );
                            None
                        }
                        Err(IntakeError::Trigger(TriggerError::Nothing(why))) => {
                            info!("Delivery {} ({}): {why}", d.id, d.event);
                            None
                        }
                        Err(IntakeError::Store(e)) => {
                            // Leave it pending: the store will be back.
                            error!("Delivery {}: {}", d.id, crate::api::chain(&e));
                            break;
                        }
                        Err(e) => {
                            let text = crate::api::chain(&e);
                            warn!("Delivery {} ({}) failed: {text}", d.id, d.event);
                            Some(text)
                        }
                    };
                    if let Err(e) = shared
                        .store
                        .finish_delivery(&d.source, &d.id, error.as_deref())
                        .await
                    {
                        error!("Delivery {}: {}", d.id, crate::api::chain(&e));
                    }
                }
            }
            Err(e) => error!("Cannot read pending deliveries: {}", crate::api::chain(&e)),
        }
        tokio::select! {
            () = shared.wake_intake.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(30)) => {}
        }
    }
}

/// Fetches the trigger's commit, selects its workflows and enqueues their runs.
pub(crate) async fn enqueue_trigger(
    shared: &Shared,
    trigger: &Trigger,
    delivery: Option<&str>,
) -> Result<Vec<RunRecord>, IntakeError> {
    let token = crate::checks::clone_token(
        shared,
        trigger.forge.as_str(),
        &trigger.repository,
        &trigger.payload,
    )
    .await;
    // A pull request's workflows come from its merge commit, as on GitHub; the run keeps the
    // head commit (`sha`), which its statuses and check runs are reported on.
    let pull = (trigger.event == "pull_request")
        .then(|| crate::git::pull_number(&trigger.git_ref))
        .flatten();
    let merge = match (pull, trigger.sha.as_deref()) {
        (Some(number), Some(head)) => {
            match shared
                .git
                .fetch_pull_merge(&trigger.clone_url, number, head, token.as_deref())
                .await
            {
                Ok(found) => Some(found),
                Err(reason) => {
                    warn!(
                        "{} pull request #{number}: using the head commit {head}: {reason}",
                        trigger.repository
                    );
                    None
                }
            }
        }
        _ => None,
    };
    let (cache, sha, workflow_sha) = match merge {
        Some((cache, merge_sha)) => {
            let head = trigger.sha.clone().unwrap_or_else(|| merge_sha.clone());
            (cache, head, merge_sha)
        }
        None => {
            let (cache, sha) = shared
                .git
                .fetch(
                    &trigger.clone_url,
                    &trigger.fetch_ref,
                    trigger.sha.as_deref(),
                    token.as_deref(),
                )
                .await?;
            (cache, sha.clone(), sha)
        }
    };
    let files = shared.git.workflows(&cache, &workflow_sha).await?;
    let event = trigger.event();
    let mut runs = Vec::new();
    for file in files {
        if let Some(only) = &trigger.only_workflow
            && !workflow_named(only, &file.path)
        {
            continue;
        }
        let workflow = match kiln_workflow::parse_workflow(&file.path, &file.text) {
            Ok(w) => w,
            Err(e) => {
                warn!("{}@{sha}: {e}", trigger.repository);
                continue;
            }
        };
        if !workflow.on.matches(&event) {
            continue;
        }
        let (group, cancel_in_progress) = concurrency(&workflow, trigger, &workflow_sha);
        let run = shared
            .store
            .enqueue(NewRun {
                forge: trigger.forge.as_str().to_owned(),
                repository: trigger.repository.clone(),
                clone_url: trigger.clone_url.clone(),
                sha: sha.clone(),
                git_ref: trigger.git_ref.clone(),
                event: trigger.event.clone(),
                workflow_file: file.path.clone(),
                workflow_name: workflow.display_name().to_owned(),
                payload: trigger.payload.clone(),
                inputs: trigger.inputs.clone(),
                delivery: delivery.map(str::to_owned),
                concurrency_group: group.clone(),
                cancel_in_progress,
                rerun_of: None,
            })
            .await?;
        if let Some(group) = &group {
            apply_concurrency(shared, &run, group, cancel_in_progress).await?;
        }
        crate::report::queue_status(shared, &run).await;
        runs.push(run);
    }
    if !runs.is_empty() {
        shared.wake_workers.notify_waiters();
    }
    Ok(runs)
}

/// Cancels what a new run in `group` supersedes.
pub(crate) async fn apply_concurrency(
    shared: &Shared,
    run: &RunRecord,
    group: &str,
    cancel_in_progress: bool,
) -> Result<(), kiln_store::StoreError> {
    for older in shared.store.group_runs(group, RunStatus::Queued).await? {
        if older.seq < run.seq {
            info!(
                "Run {} superseded by run {} in group {group}",
                older.id, run.id
            );
            let cancelled = shared.store.request_cancel(&older.id).await?;
            crate::report::queue_status(shared, &cancelled).await;
        }
    }
    if cancel_in_progress {
        for running in shared.store.group_runs(group, RunStatus::Running).await? {
            info!(
                "Cancelling run {} (group {group}, cancel-in-progress)",
                running.id
            );
            shared.store.request_cancel(&running.id).await?;
            crate::worker::cancel_live(shared, &running.id);
        }
    }
    Ok(())
}

/// Whether `.github/workflows/x.yml` is the workflow a dispatch names (by path or file name).
fn workflow_named(wanted: &str, path: &str) -> bool {
    wanted == path || path.rsplit('/').next() == Some(wanted)
}

struct NoHost;

impl Host for NoHost {
    fn job_status(&self) -> JobStatus {
        JobStatus::Success
    }

    fn hash_files(&self, _patterns: &[String]) -> Result<String, String> {
        Err("hashFiles is not available in concurrency groups".to_owned())
    }
}

/// The workflow's evaluated `concurrency:` group and `cancel-in-progress`.
fn concurrency(workflow: &Workflow, trigger: &Trigger, sha: &str) -> (Option<String>, bool) {
    let Some(c) = &workflow.concurrency else {
        return (None, false);
    };
    let s = |v: &str| Value::String(v.to_owned());
    let ref_name = trigger
        .git_ref
        .strip_prefix("refs/heads/")
        .or_else(|| trigger.git_ref.strip_prefix("refs/tags/"))
        .unwrap_or(&trigger.git_ref);
    let head_ref = trigger
        .payload
        .pointer("/pull_request/head/ref")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let github: IndexMap<String, Value> = [
        ("event_name", s(&trigger.event)),
        ("event", Value::from_json(trigger.payload.clone())),
        ("ref", s(&trigger.git_ref)),
        ("ref_name", s(ref_name)),
        ("head_ref", s(head_ref)),
        ("sha", s(sha)),
        ("repository", s(&trigger.repository)),
        ("workflow", s(workflow.display_name())),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    let mut contexts = IndexMap::new();
    contexts.insert("github".to_owned(), Value::Object(github));
    contexts.insert(
        "inputs".to_owned(),
        Value::from_json(trigger.inputs.clone()),
    );
    let ctx = EvalContext {
        contexts: &contexts,
        host: &NoHost,
    };
    let group = match c.group.eval(&ctx) {
        Ok(g) if !g.is_empty() => Some(format!("{}:{g}", trigger.repository)),
        Ok(_) => None,
        Err(e) => {
            warn!("{}: concurrency group: {e}", workflow.file);
            None
        }
    };
    let cancel = match &c.cancel_in_progress {
        BoolOrExpr::Bool(b) => *b,
        BoolOrExpr::Expr(t) => t.eval_value(&ctx).is_ok_and(|v| v.is_truthy()),
    };
    (group, cancel)
}
