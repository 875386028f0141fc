//! `kiln rerun RUN --from-failed`: a failed run goes on from its last good step snapshot.
//!
//! 1. The run's record (`<data dir>/runs/<run>/run.json`) names the failed step and the last
//!    snapshot taken after a successful step of the same job before it.
//! 2. The workflow file is read again, so a fixed step is picked up. The steps the snapshot
//!    includes, and the jobs that had finished before, must be unchanged: their effects are in
//!    the snapshot, so a changed one is refused (not warned about), naming the step.
//! 3. A new run (its own id, `rerun_of` = the old one, recorded like any run and snapshotted
//!    again) restores the snapshot into a fresh VM and goes on with the next step. Restored
//!    steps are `step_restored` events and show as `restored` in the summary.
//!
//! Secrets are never stored with a run: pass them again with `-s`. The event payload and inputs
//! come from the run database.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use indexmap::IndexMap;
use kiln_runner::event::{Conclusion, EventSink, RunEvent};
use kiln_runner::executor::snapshots::{
    ResumePlan, RunManifest, SnapshotConfig, SnapshotKind, fingerprint,
};
use kiln_runner::executor::{GitInfo, Isolation, RunContext, RunOptions, WorkflowExecutor};
use kiln_runner::session::{SessionConfig, SessionManager};
use kiln_store::RunStore;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::args::RerunArgs;
use crate::config::{Dirs, FileConfig};
use crate::render::{Style, Terminal, summary};
use crate::{Exit, exit, inputs, usage};

/// Where runs' records and step snapshots live: `<data dir>/runs`.
pub fn runs_root(dirs: &Dirs) -> PathBuf {
    dirs.data.join("runs")
}

/// The step-snapshot settings of a run.
pub fn snapshot_config(dirs: &Dirs, keep: usize, max_mib: u64) -> SnapshotConfig {
    SnapshotConfig {
        root: runs_root(dirs),
        keep,
        max_bytes: max_mib.saturating_mul(1 << 20),
    }
}

/// `kiln rerun`.
pub async fn rerun(file: &FileConfig, args: RerunArgs) -> Result<u8, Exit> {
    if !args.from_failed {
        return Err(usage(anyhow!(
            "kiln rerun needs --from-failed (the only kind of rerun for now; to run the whole \
             workflow again, use `kiln run`)"
        )));
    }
    let dirs = Dirs::from_env();
    let manifest = crate::debug::load_manifest(&dirs, &args.run)?;
    let (workflow, plan) = plan(&manifest)?;
    let context = context(file, &dirs, &manifest, &args).await?;
    let provider = crate::debug::provider_for(file, &dirs, &manifest).await?;
    // The same quotas and time limit as `kiln run` (`[vm_types.*]`, `[workflows."PATH"]`, with
    // PATH relative to the directory the rerun runs in, as for `kiln run`).
    let (keep, max_mib) = file.snapshot_limits().map_err(usage)?;
    let vm_config = file.vm_config().map_err(usage)?;
    let root = std::env::current_dir().unwrap_or_else(|_| ".".into());
    let vm_types =
        vm_config.for_workflow(&crate::run::workflow_key(&root, &manifest.workflow_file));
    let sessions = SessionManager::new(provider.clone(), SessionConfig::default());
    let executor = WorkflowExecutor::new(sessions.clone())
        .with_snapshots(snapshot_config(&dirs, keep, max_mib));

    let run_id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
    let (recorder, recording) =
        crate::runs::Recorder::open(&crate::runs::database_path(file, &dirs)).await;
    recorder.start(
        &run_id,
        crate::runs::new_run(&workflow, &context, Some(manifest.run_id.clone())),
    );
    eprintln!(
        "Rerun {run_id} of run {}: restoring the snapshot after step {} ({}) of job {}, going on \
         with step {}",
        manifest.run_id,
        plan.step + 1,
        plan.restored_steps.last().map_or("", String::as_str),
        plan.job,
        plan.step + 2
    );
    let style = Style::detect();
    let (tx, mut rx) = mpsc::unbounded_channel::<RunEvent>();
    let json = args.json;
    let record = recorder.clone();
    let renderer = tokio::spawn(async move {
        let mut terminal = Terminal::new(style, json);
        while let Some(event) = rx.recv().await {
            record.event(&event);
            terminal.event(&event);
        }
    });
    let options = RunOptions {
        run_id: run_id.clone(),
        isolation: Isolation::Workflow,
        spec: (&manifest.spec).into(),
        vm_types: Some(Arc::new(vm_types)),
        context,
        only_jobs: Vec::new(),
        matrix_filter: Vec::new(),
    };
    let events = EventSink::new(run_id.clone(), tx);
    let cancel = CancellationToken::new();
    let watch = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                cancel.cancel();
            }
        })
    };
    let outcome = executor
        .resume(&workflow, &options, &plan, &events, &cancel)
        .await;
    drop(events);
    watch.abort();
    let _ = renderer.await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while sessions.active_count() > 0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let outcome = Ok(Some(outcome));
    crate::runs::record_outcome(&recorder, &run_id, &outcome);
    drop(recorder);
    recording.close().await;
    match outcome {
        Ok(Some(Ok(report))) => {
            if !json {
                eprint!("{}", summary(style, &report, &run_id));
            }
            Ok(match report.result {
                Conclusion::Success | Conclusion::Skipped => exit::SUCCESS,
                Conclusion::Failure => exit::FAILURE,
                Conclusion::Cancelled => exit::CANCELLED,
            })
        }
        Ok(Some(Err(e))) => {
            let code = if e.is_user_error() {
                exit::USAGE
            } else {
                exit::INFRA
            };
            Err(Exit::new(code, anyhow::Error::new(e)))
        }
        _ => Ok(exit::CANCELLED),
    }
}

/// The workflow as it is now, and where to go on from; refuses what cannot be resumed.
fn plan(manifest: &RunManifest) -> Result<(kiln_workflow::Workflow, ResumePlan), Exit> {
    let run = &manifest.run_id;
    let failed = manifest.failed.as_ref().ok_or_else(|| {
        usage(anyhow!(
            "Run {run} has no failed step to go on from (it {})",
            manifest
                .result
                .as_deref()
                .map_or("did not finish".to_owned(), |r| format!("ended with {r}"))
        ))
    })?;
    if manifest.isolation != "workflow" {
        return Err(usage(anyhow!(
            "Run {run} used isolation = \"{}\"; only runs with one VM (isolation = \"workflow\") \
             can be resumed yet",
            manifest.isolation
        )));
    }
    if failed.job.contains('/') {
        return Err(usage(anyhow!(
            "The failed step of run {run} is in a called (reusable) workflow ({}); resuming \
             inside one is not supported yet",
            failed.job
        )));
    }
    let good = manifest
        .last_good(&failed.job, failed.leg, failed.step)
        .ok_or_else(|| {
            usage(anyhow!(
                "Run {run} has no snapshot of job {} before its failed step {} (it is the job's \
                 first step, or the snapshots failed): nothing to restore; run the workflow \
                 again with `kiln run`",
                failed.job,
                failed.step + 1
            ))
        })?;
    if good.collected {
        return Err(usage(anyhow!(
            "The last good snapshot of run {run} (after step {}) was collected by retention",
            good.step + 1
        )));
    }
    if !good.dir.is_dir() {
        return Err(usage(anyhow!(
            "The snapshot files of run {run} are gone ({} does not exist)",
            good.dir.display()
        )));
    }
    let workflow = crate::workflows::load(&manifest.workflow_file)?;
    let job = workflow.jobs.get(&failed.job).ok_or_else(|| {
        usage(anyhow!(
            "{}: job `{}` (which failed in run {run}) is no longer in the workflow",
            manifest.workflow_file.display(),
            failed.job
        ))
    })?;
    if job.strategy.as_ref().is_some_and(|s| s.matrix.is_some()) {
        return Err(usage(anyhow!(
            "Job `{}` has a matrix; resuming matrix jobs is not supported yet",
            failed.job
        )));
    }
    let changed = |index: usize, name: &str, job: &str| {
        usage(anyhow!(
            "{}: step {} (`{name}`) of job `{job}` changed since run {run}, but the snapshot \
             holds what it did; refusing to go on from a state the workflow no longer makes. \
             Run the workflow again with `kiln run`",
            manifest.workflow_file.display(),
            index + 1
        ))
    };
    for (index, recorded) in good.fingerprints.iter().enumerate() {
        match job.steps.get(index) {
            Some(step) if fingerprint(step) == *recorded => {}
            Some(step) => return Err(changed(index, &step.display_name(), &failed.job)),
            None => return Err(changed(index, "removed", &failed.job)),
        }
    }
    // Jobs that finished before the failed job (in this one VM) are kept as they were.
    let position = manifest
        .jobs
        .iter()
        .position(|j| j.id == failed.job)
        .unwrap_or(manifest.jobs.len());
    let finished_jobs = manifest.jobs[..position].to_vec();
    for record in &finished_jobs {
        let now = workflow.jobs.get(&record.id).ok_or_else(|| {
            usage(anyhow!(
                "{}: job `{}` (finished in run {run}) is no longer in the workflow",
                manifest.workflow_file.display(),
                record.id
            ))
        })?;
        let current: Vec<String> = now.steps.iter().map(fingerprint).collect();
        if let Some(index) = (0..record.fingerprints.len().max(current.len()))
            .find(|&i| record.fingerprints.get(i) != current.get(i))
        {
            let name = now
                .steps
                .get(index)
                .map_or("removed".to_owned(), |s| s.display_name());
            return Err(changed(index, &name, &record.id));
        }
    }
    let restored_steps = job.steps[..=good.step]
        .iter()
        .map(|s| s.display_name())
        .collect();
    debug_assert!(good.kind == SnapshotKind::AfterStep);
    let plan = ResumePlan {
        from_run: run.clone(),
        snapshot: manifest.vm_snapshot(good),
        record: good.clone(),
        job: failed.job.clone(),
        step: good.step,
        restored_steps,
        leg_state: good.leg_state.clone(),
        base_path: manifest.base_path.clone(),
        finished_jobs,
    };
    Ok((workflow, plan))
}

/// The rerun's context: the original event payload and inputs from the run database, this
/// checkout's git facts, and the secrets and variables given now.
async fn context(
    file: &FileConfig,
    dirs: &Dirs,
    manifest: &RunManifest,
    args: &RerunArgs,
) -> Result<RunContext, Exit> {
    let workspace = std::env::current_dir().ok();
    let git = GitInfo::discover(workspace.as_deref().unwrap_or(std::path::Path::new(".")));
    let mut context = RunContext::new(manifest.event.clone(), workspace, git);
    let database = crate::runs::database_path(file, dirs);
    let stored = match kiln_store::SqliteStore::open(&database).await {
        Ok(store) => store.get(&manifest.run_id).await.ok().flatten(),
        Err(_) => None,
    };
    match stored {
        Some(record) => {
            context.event_payload = record.spec.payload;
            if let serde_json::Value::Object(map) = record.spec.inputs {
                context.inputs = map.into_iter().collect();
            }
        }
        None => eprintln!(
            "warning: run {} is not in the run database; github.event is empty",
            manifest.run_id
        ),
    }
    let mut secrets = IndexMap::new();
    for s in &args.secrets {
        let (k, v) = inputs::parse_pair("--secret", s, true).map_err(usage)?;
        secrets.insert(k, v);
    }
    let mut vars = IndexMap::new();
    for s in &args.vars {
        let (k, v) = inputs::parse_pair("--var", s, false).map_err(usage)?;
        vars.insert(k, v);
    }
    context.secrets = secrets;
    context.vars = vars;
    Ok(context)
}
