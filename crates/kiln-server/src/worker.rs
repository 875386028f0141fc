//! Workers: take runs from the queue and execute them.
//!
//! There are as many workers as the session limit. Each one loops: claim the oldest claimable
//! run (the store's order and concurrency rules), check out its commit, load its workflow from
//! that commit, and execute it with the runner. The run's events go through one channel into
//! the store in batches as they happen (SSE readers are woken after each batch) and into the
//! metrics, and job starts and ends become check runs when a GitHub App is configured. The run
//! is finished in the store and its final status queued for the forge.
//!
//! A run is cancelled through its [`CancellationToken`] (the API's cancel, `cancel-in-progress`,
//! the end of the shutdown grace period); the executor then stops the running step, runs the
//! `always()` steps and releases the VM.

use std::sync::Arc;
use std::time::Duration;

use kiln_runner::event::{Conclusion, EventKind, EventSink, RunEvent};
use kiln_runner::executor::{GitInfo, RunContext, RunOptions};
use kiln_store::{RunRecord, RunResult};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::Shared;

/// Cancels a run this process is executing (no-op for others).
pub(crate) fn cancel_live(shared: &Shared, run: &str) {
    let live = shared.live.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(token) = live.get(run) {
        token.cancel();
    }
}

/// One worker's loop.
pub(crate) async fn run_worker(shared: Arc<Shared>, n: usize) {
    loop {
        if shared.stopping.is_cancelled() {
            return;
        }
        // Register interest before looking, so a wake-up between the two is not lost.
        let woken = shared.wake_workers.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        match shared.store.claim_next().await {
            Ok(Some(run)) => {
                info!("Worker {n} runs {} ({})", run.id, run.spec.workflow_name);
                execute(&shared, run).await;
                continue;
            }
            Ok(None) => {}
            Err(e) => error!("Worker {n}: cannot claim: {}", crate::api::chain(&e)),
        }
        tokio::select! {
            () = woken => {}
            () = shared.stopping.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}

/// Removes the run's cancel token when the run is over, however it ends.
struct LiveGuard<'a> {
    shared: &'a Shared,
    run: String,
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.shared
            .live
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.run);
    }
}

async fn execute(shared: &Arc<Shared>, run: RunRecord) {
    let cancel = CancellationToken::new();
    shared
        .live
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(run.id.clone(), cancel.clone());
    let _live = LiveGuard {
        shared,
        run: run.id.clone(),
    };
    // A cancel that arrived between the claim and the registration.
    if matches!(shared.store.get(&run.id).await, Ok(Some(r)) if r.cancel_requested) {
        cancel.cancel();
    }
    shared.metrics.run_started();
    crate::report::queue_status(shared, &run).await;

    let (tx, rx) = mpsc::unbounded_channel::<RunEvent>();
    let sink = EventSink::new(run.id.clone(), tx);
    let pump = tokio::spawn(pump_events(
        crate::checks::JobWatcher::new(shared.clone(), run.clone()),
        rx,
    ));
    let (result, error) = match prepare_and_run(shared, &run, &sink, &cancel).await {
        Ok(c) => (
            match c {
                Conclusion::Success | Conclusion::Skipped => RunResult::Success,
                Conclusion::Failure => RunResult::Failure,
                Conclusion::Cancelled => RunResult::Cancelled,
            },
            None,
        ),
        Err(message) => {
            // Put the reason in the run's own log, where people look.
            sink.emit(EventKind::Log {
                job: String::new(),
                step: None,
                stream: kiln_runner::event::LogStream::Stderr,
                line: format!("kiln: {message}"),
            });
            (
                if cancel.is_cancelled() {
                    RunResult::Cancelled
                } else {
                    RunResult::Error
                },
                Some(message),
            )
        }
    };
    drop(sink);
    let jobs_started = match pump.await {
        Ok(started) => started,
        Err(_) => {
            warn!("Run {}: the event writer stopped early", run.id);
            0
        }
    };
    let error = error.or_else(|| {
        (result == RunResult::Cancelled && shared.stopping.is_cancelled())
            .then(|| "cancelled by shutdown".to_owned())
    });
    match shared.store.finish(&run.id, result, error.as_deref()).await {
        Ok(done) => {
            info!("Run {} finished: {result}", run.id);
            shared.metrics.run_finished(result, &done);
            crate::report::queue_status(shared, &done).await;
            if jobs_started == 0
                && result != RunResult::Success
                && crate::checks::enabled(shared, &done)
            {
                crate::checks::run_failed_early(shared, &done).await;
            }
        }
        Err(e) => error!(
            "Run {}: cannot record the result: {}",
            run.id,
            crate::api::chain(&e)
        ),
    }
    shared.events_tick.send_modify(|n| *n += 1);
    shared.wake_workers.notify_waiters();
}

/// Checks out the commit, loads the workflow and executes it. `Err` is a message for people.
async fn prepare_and_run(
    shared: &Shared,
    run: &RunRecord,
    sink: &EventSink,
    cancel: &CancellationToken,
) -> Result<Conclusion, String> {
    let spec = &run.spec;
    let token =
        crate::checks::clone_token(shared, &spec.forge, &spec.repository, &spec.payload).await;
    // A pull request runs on its merge commit (`GITHUB_SHA`), as on GitHub, when the forge
    // has an up-to-date one; otherwise on its head, saying why in the run's log.
    let pull = (spec.event == "pull_request")
        .then(|| crate::git::pull_number(&spec.git_ref))
        .flatten();
    let merge = match pull {
        Some(number) => match shared
            .git
            .fetch_pull_merge(&spec.clone_url, number, &spec.sha, token.as_deref())
            .await
        {
            Ok(found) => Some(found),
            Err(reason) => {
                let message = format!(
                    "Pull request #{number}: running its head commit {}: {reason}",
                    spec.sha
                );
                warn!("Run {}: {message}", run.id);
                sink.emit(EventKind::Log {
                    job: String::new(),
                    step: None,
                    stream: kiln_runner::event::LogStream::Stderr,
                    line: format!("kiln: {message}"),
                });
                None
            }
        },
        None => None,
    };
    let (cache, sha) = match merge {
        Some(found) => found,
        None => {
            let fetch_ref = match pull {
                Some(number) => format!("refs/pull/{number}/head"),
                None => spec.git_ref.clone(),
            };
            shared
                .git
                .fetch(
                    &spec.clone_url,
                    &fetch_ref,
                    Some(&spec.sha),
                    token.as_deref(),
                )
                .await
                .map_err(|e| crate::api::chain(&e))?
        }
    };
    let checkout = shared
        .git
        .checkout(&cache, &sha, &spec.clone_url)
        .await
        .map_err(|e| crate::api::chain(&e))?;
    let workdir = checkout.path().join("repo");
    let path = workdir.join(&spec.workflow_file);
    let text = tokio::fs::read_to_string(&path)
        .await
        .map_err(|e| format!("Cannot read {}: {e}", spec.workflow_file))?;
    let workflow =
        kiln_workflow::parse_workflow(&spec.workflow_file, &text).map_err(|e| e.to_string())?;

    let actor = spec
        .payload
        .pointer("/sender/login")
        .and_then(|v| v.as_str())
        .unwrap_or("kiln")
        .to_owned();
    let git = GitInfo {
        sha: sha.clone(),
        git_ref: spec.git_ref.clone(),
        repository: spec.repository.clone(),
        actor,
    };
    let mut context = RunContext::new(spec.event.clone(), Some(workdir), git);
    context.event_payload = spec.payload.clone();
    if let Some(inputs) = spec.inputs.as_object() {
        context.inputs = inputs.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }
    context.run_number = u64::try_from(run.seq).unwrap_or(1);
    let options = RunOptions {
        run_id: run.id.clone(),
        isolation: shared.runner.isolation,
        spec: shared.runner.spec.clone(),
        vm_types: shared
            .runner
            .vms
            .as_ref()
            .map(|vms| std::sync::Arc::new(vms.for_workflow(&spec.workflow_file))),
        context,
        only_jobs: Vec::new(),
        matrix_filter: Vec::new(),
    };
    let report = shared
        .runner
        .executor
        .execute(&workflow, &options, sink, cancel)
        .await
        .map_err(|e| crate::api::chain(&e))?;
    drop(checkout);
    Ok(report.result)
}

/// Writes a run's events to the store in batches, in order, counts them, and hands job starts
/// and ends to the check-run watcher. Returns how many jobs started.
async fn pump_events(
    mut watcher: crate::checks::JobWatcher,
    mut rx: mpsc::UnboundedReceiver<RunEvent>,
) -> usize {
    let shared = watcher.shared();
    let (store, tick, metrics, run) = (
        &shared.store,
        &shared.events_tick,
        &shared.metrics,
        watcher.run_id().to_owned(),
    );
    let mut batch: Vec<RunEvent> = Vec::new();
    while rx.recv_many(&mut batch, 256).await > 0 {
        let mut bodies = Vec::with_capacity(batch.len());
        let mut jobs = Vec::new();
        for event in batch.drain(..) {
            metrics.event(&event);
            if matches!(
                event.kind,
                EventKind::JobStarted { .. } | EventKind::JobFinished { .. }
            ) {
                jobs.push(event.kind.clone());
            }
            match serde_json::to_string(&event) {
                Ok(body) => bodies.push(body),
                Err(e) => warn!("Run {run}: unserializable event: {e}"),
            }
        }
        // A store hiccup must not lose the events: retry a few times before giving up.
        let mut attempt = 0;
        while let Err(e) = store.append_events(&run, &bodies).await {
            attempt += 1;
            if attempt >= 5 {
                error!(
                    "Run {run}: dropping {} events: {}",
                    bodies.len(),
                    crate::api::chain(&e)
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(200 * attempt)).await;
        }
        tick.send_modify(|n| *n += 1);
        // After the batch is stored, so a check run's page already shows the job.
        for kind in &jobs {
            watcher.event(kind).await;
        }
    }
    watcher.started
}
