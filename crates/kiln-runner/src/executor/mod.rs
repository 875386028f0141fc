//! The workflow executor: runs one workflow run in its session's VM.
//!
//! ```text
//! execute(workflow)
//!   check what kiln can run            (before any VM exists: unsupported features fail here)
//!   resolve actions and called workflows on the host (actions::catalog; errors fail here too)
//!   create_session  -> one VM          (isolation = "workflow"; "job" makes one per job leg)
//!   setup: workspace copied in, runner dirs, event payload
//!   jobs in dependency order           (a `uses:` job runs the called workflow: reusable.rs)
//!     job if: -> matrix legs -> pre steps of actions -> steps:
//!       if: -> env -> run: | uses: (actions::run) | actions/checkout (native)
//!          each process: file-command files -> exec (streamed, masked) -> file commands read back
//!     post steps of actions, in reverse -> job outputs
//!   cleanup: every process the run left behind is killed   (always)
//!   release_session                                        (always, even on panic: the guard)
//! ```
//!
//! Under `isolation = "workflow"` (the seed's model) every job runs in the one VM, one after the
//! other, and shares the workspace. Under `isolation = "job"` each job leg gets its own session
//! and the legs of a dependency level run concurrently, bounded by the session limit.

pub mod actions;
pub mod commands;
mod context;
mod git;
mod hash;
mod reusable;
mod shell;
pub mod snapshots;
mod vms;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indexmap::IndexMap;
use kiln_vm::{ExecRequest, ExitStatus, Output, Stream, Vm, VmError, VmSpec};
use kiln_workflow::{
    BoolOrExpr, Condition, EvalContext, Job, JobStatus, MatrixLeg, NumberOrExpr, Step, StepAction,
    Template, Value, Workflow,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::event::{Conclusion, EventKind, EventSink, LogStream};
use crate::session::{SessionError, SessionGuard, SessionManager, SessionRequest};
pub use commands::Annotation;
use commands::{Masker, parse_key_values, parse_path_file, parse_workflow_command};
pub use context::RunContext;
pub use git::GitInfo;
use snapshots::{
    JobRecord, LegRecord, ResumePlan, RunManifest, SnapshotConfig, SnapshotError, SnapshotKind,
    StepSnapshots, Taking,
};

/// GitHub's default job timeout.
const DEFAULT_JOB_TIMEOUT: Duration = Duration::from_secs(360 * 60);

/// How many VMs a run gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Isolation {
    /// One VM for the whole run (the seed's model).
    #[default]
    Workflow,
    /// One VM per job leg (GitHub's model).
    Job,
}

impl std::str::FromStr for Isolation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "workflow" => Ok(Isolation::Workflow),
            "job" => Ok(Isolation::Job),
            other => Err(format!(
                "unknown isolation `{other}` (expected workflow or job)"
            )),
        }
    }
}

/// Everything about one run that is not in the workflow file.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// The run id (events' `run`).
    pub run_id: String,
    /// Session granularity.
    pub isolation: Isolation,
    /// What to ask the backend for, when `vm_types` is `None`.
    pub spec: VmSpec,
    /// How jobs' `runs-on` labels select their VM and the run's time limit
    /// ([`crate::vm_types`]); `None`: every VM is `spec`, with no time limit.
    pub vm_types: Option<Arc<crate::vm_types::VmTypes>>,
    /// The run's inputs: event, repository, secrets, variables.
    pub context: RunContext,
    /// Run only these jobs (and nothing else), as `-j` does.
    pub only_jobs: Vec<String>,
    /// Run only matrix legs whose values match all of these (`--matrix KEY:VALUE`).
    pub matrix_filter: Vec<(String, String)>,
}

/// A step's result, for the summary.
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// Display name.
    pub name: String,
    /// Result before `continue-on-error`.
    pub outcome: Conclusion,
    /// Result after `continue-on-error`.
    pub conclusion: Conclusion,
    /// Exit code, when the step ran and exited.
    pub exit_code: Option<i32>,
    /// Wall time.
    pub duration: Duration,
    /// Why it failed, when kiln (not the step's command) decided so.
    pub error: Option<String>,
    /// Not run: `kiln rerun --from-failed` restored its effects from a snapshot.
    pub restored: bool,
}

/// A job leg's result, for the summary.
#[derive(Debug, Clone, PartialEq)]
pub struct JobReport {
    /// Job id.
    pub id: String,
    /// Display name with matrix suffix.
    pub name: String,
    /// Result.
    pub result: Conclusion,
    /// Wall time.
    pub duration: Duration,
    /// Its steps.
    pub steps: Vec<StepReport>,
    /// Evaluated outputs.
    pub outputs: IndexMap<String, String>,
    /// What steps wrote to `GITHUB_STEP_SUMMARY` (secrets masked).
    pub summary: String,
    /// `::error`/`::warning`/`::notice` annotations, in order.
    pub annotations: Vec<Annotation>,
}

/// A run's result.
#[derive(Debug, Clone, PartialEq)]
pub struct RunReport {
    /// Workflow display name.
    pub workflow: String,
    /// Result.
    pub result: Conclusion,
    /// Wall time.
    pub duration: Duration,
    /// VMs allocated.
    pub vm_allocations: usize,
    /// Job legs in the order they ran.
    pub jobs: Vec<JobReport>,
}

/// Errors that stop a run before or outside its steps.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// The workflow uses something kiln cannot run yet. Nothing was allocated.
    #[error("{workflow} cannot run yet:\n{}", .problems.join("\n"))]
    Unsupported {
        /// Workflow file.
        workflow: String,
        /// One line per problem, each with `file:line:col`.
        problems: Vec<String>,
    },
    /// An action the workflow uses could not be resolved or read. Nothing was allocated.
    #[error("Actions of {workflow} cannot be used:\n{}", .problems.join("\n"))]
    Actions {
        /// Workflow file.
        workflow: String,
        /// One line per problem: `file:line:col`, the step, the action, what was tried.
        problems: Vec<String>,
    },
    /// The job graph is invalid.
    #[error("Invalid job graph in {workflow}")]
    Graph {
        /// Workflow file.
        workflow: String,
        /// The graph error.
        #[source]
        source: Box<kiln_workflow::GraphError>,
    },
    /// No session could be had.
    #[error("No session for run {run}")]
    Session {
        /// Run id.
        run: String,
        /// Why.
        #[source]
        source: Box<SessionError>,
    },
    /// A job's `runs-on` selects no VM type (or several, where the run has one VM). Nothing
    /// was allocated.
    #[error("{workflow}: no VM for its jobs")]
    VmType {
        /// Workflow file.
        workflow: String,
        /// Why.
        #[source]
        source: crate::vm_types::VmTypeError,
    },
    /// `--snapshots steps` cannot be used, or its run record not written. Nothing was
    /// allocated.
    #[error(transparent)]
    Snapshots(#[from] SnapshotError),
    /// A resume (`kiln rerun --from-failed`) that cannot be carried out. Nothing was allocated.
    #[error("Cannot go on from the failed step: {0}")]
    Resume(String),
    /// Setting up the VM failed.
    #[error("Setting up VM {vm} failed")]
    Setup {
        /// VM id.
        vm: String,
        /// Why.
        #[source]
        source: VmError,
    },
}

impl ExecError {
    /// Whether this is the user's workflow's fault (exit code 2) rather than the host's (3).
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            ExecError::Unsupported { .. }
                | ExecError::Graph { .. }
                | ExecError::Actions { .. }
                | ExecError::VmType { .. }
                | ExecError::Resume(_)
                | ExecError::Snapshots(SnapshotError::Unsupported { .. })
        ) || matches!(self, ExecError::Session { source, .. }
                if matches!(**source, SessionError::LimitReached { .. }))
    }
}

/// Runs workflows in sessions.
#[derive(Clone)]
pub struct WorkflowExecutor {
    sessions: SessionManager,
    resolver: actions::ActionResolver,
    snapshots: Option<SnapshotConfig>,
}

/// Per-run state shared by its jobs.
struct RunState<'a> {
    workflow: &'a Workflow,
    options: &'a RunOptions,
    events: &'a EventSink,
    cancel: &'a CancellationToken,
    allocations: std::sync::atomic::AtomicUsize,
    /// Remote actions resolved on the host before the run started.
    catalog: actions::Catalog,
    /// The VM of the run's session(s) and its time limit.
    plan: vms::RunPlan,
    /// `--snapshots steps`: the run's snapshots and record.
    snapshots: Option<&'a StepSnapshots>,
    /// `kiln rerun --from-failed`: where the run goes on from.
    resume: Option<&'a ResumePlan>,
}

/// The part of a job leg's state that steps change.
struct LegState {
    env: IndexMap<String, String>,
    path: Vec<String>,
    steps: IndexMap<String, Value>,
    status: JobStatus,
    masker: Masker,
    summary: String,
    annotations: Vec<Annotation>,
    /// Actions' `post` scripts, in the order their main steps ran (run in reverse).
    posts: Vec<actions::PostStep>,
    /// State saved by `pre` scripts, by the index of the step whose action they belong to.
    pre_state: HashMap<usize, IndexMap<String, String>>,
    /// The environment and working directory of the last process a step ran (for the step
    /// snapshot's record: `kiln debug` opens its shell there).
    last_exec: Option<(IndexMap<String, String>, String)>,
}

impl LegState {
    fn new(status: JobStatus) -> LegState {
        LegState {
            env: IndexMap::new(),
            path: Vec::new(),
            steps: IndexMap::new(),
            status,
            masker: Masker::default(),
            summary: String::new(),
            annotations: Vec::new(),
            posts: Vec::new(),
            pre_state: HashMap::new(),
            last_exec: None,
        }
    }
}

/// Where the runner's files live inside a VM.
#[derive(Debug, Clone)]
struct Layout {
    workspace: String,
    /// Remote actions' trees: `<actions>/<owner>/<repo>/<commit>`.
    actions: String,
    temp: String,
    tool_cache: String,
    home: String,
    file_commands: String,
    event_path: String,
}

impl Layout {
    fn new(root: &str) -> Layout {
        Layout {
            workspace: format!("{root}/workspace"),
            actions: format!("{root}/_actions"),
            temp: format!("{root}/temp"),
            tool_cache: format!("{root}/tool-cache"),
            home: format!("{root}/home"),
            file_commands: format!("{root}/temp/_runner_file_commands"),
            event_path: format!("{root}/temp/_github_workflow/event.json"),
        }
    }
}

/// A session with its VM set up for a run.
struct Prepared {
    guard: SessionGuard,
    layout: Layout,
    base_path: String,
    /// Guest directories of remote actions already copied into this VM.
    copied: std::sync::Mutex<std::collections::HashSet<String>>,
    /// The guest's node: `(major, "vX.Y.Z")`, or `None` inside when there is none. Asked once.
    node: tokio::sync::Mutex<Option<Option<(u32, String)>>>,
    /// Whether the workspace is still exactly the copy made at setup (no process ran yet).
    pristine: std::sync::atomic::AtomicBool,
}

impl Prepared {
    fn new(guard: SessionGuard, layout: Layout, base_path: String) -> Prepared {
        Prepared {
            guard,
            layout,
            base_path,
            copied: Default::default(),
            node: Default::default(),
            pristine: std::sync::atomic::AtomicBool::new(true),
        }
    }

    /// A process is about to run: the workspace may change from now on.
    fn touch_workspace(&self) {
        self.pristine
            .store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl WorkflowExecutor {
    /// An executor that takes its sessions from `sessions`.
    pub fn new(sessions: SessionManager) -> WorkflowExecutor {
        WorkflowExecutor {
            sessions,
            resolver: actions::ActionResolver::default(),
            snapshots: None,
        }
    }

    /// Takes step snapshots (`--snapshots steps`, see [`snapshots`]) in every run, and records
    /// runs under `config.root`.
    pub fn with_snapshots(mut self, config: SnapshotConfig) -> WorkflowExecutor {
        self.snapshots = Some(config);
        self
    }

    /// Where remote actions and reusable workflows come from (base URL, cache, offline,
    /// overrides). The default fetches from `https://github.com` into kiln's data directory.
    pub fn with_actions(mut self, config: actions::ActionConfig) -> WorkflowExecutor {
        self.resolver = actions::ActionResolver::new(config);
        self
    }

    /// The session manager.
    pub fn sessions(&self) -> &SessionManager {
        &self.sessions
    }

    /// Runs `workflow`. Step failures are a [`RunReport`] with `result = failure`; an
    /// [`ExecError`] means the run could not be carried out at all.
    ///
    /// Cancelling `cancel` stops the running step and skips the rest, except steps whose `if:`
    /// asks for `always()` or `cancelled()`. Dropping the returned future releases every
    /// session the run holds.
    pub async fn execute(
        &self,
        workflow: &Workflow,
        options: &RunOptions,
        events: &EventSink,
        cancel: &CancellationToken,
    ) -> Result<RunReport, ExecError> {
        self.run(workflow, options, None, events, cancel).await
    }

    /// Goes on with a run from a step snapshot (`kiln rerun --from-failed`): the session's VM
    /// is restored from `plan.snapshot` (the seed's rollback: the VM as it was after the last
    /// good step), the jobs that had finished keep their recorded results, the steps the
    /// snapshot includes are reported as restored (`step_restored`), and the run goes on with
    /// the next step of `workflow` as it is now. Only `isolation = "workflow"` runs can be
    /// resumed.
    pub async fn resume(
        &self,
        workflow: &Workflow,
        options: &RunOptions,
        plan: &ResumePlan,
        events: &EventSink,
        cancel: &CancellationToken,
    ) -> Result<RunReport, ExecError> {
        if options.isolation != Isolation::Workflow {
            return Err(ExecError::Resume(
                "only runs with isolation = \"workflow\" (one VM) can be resumed".to_owned(),
            ));
        }
        self.run(workflow, options, Some(plan), events, cancel)
            .await
    }

    async fn run(
        &self,
        workflow: &Workflow,
        options: &RunOptions,
        resume: Option<&ResumePlan>,
        events: &EventSink,
        cancel: &CancellationToken,
    ) -> Result<RunReport, ExecError> {
        let started = Instant::now();
        let name = workflow.display_name().to_owned();
        check_supported(workflow, &options.only_jobs)?;
        let plan = vms::plan(workflow, options)?;
        let snapshots = match &self.snapshots {
            Some(config) => {
                let provider = self.sessions.provider();
                if !provider.supports_checkpoints() {
                    return Err(SnapshotError::Unsupported {
                        backend: provider.name(),
                    }
                    .into());
                }
                Some(StepSnapshots::start(
                    config.clone(),
                    RunManifest {
                        format: 1,
                        run_id: options.run_id.clone(),
                        workflow_file: std::path::absolute(&*workflow.file)
                            .unwrap_or_else(|_| PathBuf::from(&*workflow.file)),
                        workflow_name: name.clone(),
                        event: options.context.event_name.clone(),
                        backend: provider.name().to_owned(),
                        isolation: match options.isolation {
                            Isolation::Workflow => "workflow",
                            Isolation::Job => "job",
                        }
                        .to_owned(),
                        spec: (&plan.spec).into(),
                        base_path: String::new(),
                        result: None,
                        failed: None,
                        jobs: Vec::new(),
                        snapshots: Vec::new(),
                        rerun_of: resume.map(|p| p.from_run.clone()),
                    },
                )?)
            }
            None => None,
        };
        let catalog = actions::catalog::build(
            &self.resolver,
            workflow,
            &options.only_jobs,
            options.context.workspace.as_deref(),
        )
        .await
        .map_err(|problems| ExecError::Actions {
            workflow: workflow.file.to_string(),
            problems,
        })?;
        let levels = kiln_workflow::job_order(workflow).map_err(|source| ExecError::Graph {
            workflow: workflow.file.to_string(),
            source: Box::new(source),
        })?;
        // The whole-run time limit cancels the run like Ctrl-C does: running steps are killed,
        // cleanup runs, and the session is released.
        let limited = cancel.child_token();
        let _limit = plan
            .timeout
            .map(|limit| arm_time_limit(limit, events.clone(), limited.clone()));
        let cancel = &limited;
        events.emit(EventKind::RunStarted {
            workflow: name.clone(),
            file: workflow.file.to_string(),
            event: options.context.event_name.clone(),
        });
        info!("Starting workflow '{name}' (run {})", options.run_id);
        let state = RunState {
            workflow,
            options,
            events,
            cancel,
            allocations: Default::default(),
            catalog,
            plan,
            snapshots: snapshots.as_ref(),
            resume,
        };
        let outcome = match options.isolation {
            Isolation::Workflow => self.run_in_one_session(&state, &levels).await,
            Isolation::Job => self.run_session_per_job(&state, &levels).await,
        };
        let elapsed = started.elapsed();
        let vm_allocations = state.allocations.load(std::sync::atomic::Ordering::SeqCst);
        let jobs = match outcome {
            Ok(jobs) => jobs,
            Err(e) => {
                error!(
                    "Workflow '{name}' failed in {} ms: {e}",
                    elapsed.as_millis()
                );
                events.emit(EventKind::RunFinished {
                    workflow: name,
                    result: Conclusion::Failure,
                    duration_ms: millis(elapsed),
                    vm_allocations,
                });
                return Err(e);
            }
        };
        let result = run_result(&jobs, cancel.is_cancelled());
        if let Some(snapshots) = &snapshots {
            snapshots.update(|m| m.result = Some(result.as_str().to_owned()));
        }
        if result == Conclusion::Success {
            info!(
                "Workflow '{name}' completed successfully in {} ms",
                elapsed.as_millis()
            );
        } else {
            info!(
                "Workflow '{name}' failed in {} ms ({result})",
                elapsed.as_millis()
            );
        }
        events.emit(EventKind::RunFinished {
            workflow: name.clone(),
            result,
            duration_ms: millis(elapsed),
            vm_allocations,
        });
        Ok(RunReport {
            workflow: name,
            result,
            duration: elapsed,
            vm_allocations,
            jobs,
        })
    }

    async fn run_in_one_session(
        &self,
        state: &RunState<'_>,
        levels: &[Vec<String>],
    ) -> Result<Vec<JobReport>, ExecError> {
        let session_id = state.options.run_id.clone();
        let prepared = self
            .open_session(state, session_id, state.plan.spec.clone())
            .await?;
        let mut needs: HashMap<String, NeedResult> = HashMap::new();
        let mut reports = Vec::new();
        for level in levels {
            for job_id in level {
                let Some(job) = state.workflow.jobs.get(job_id) else {
                    continue;
                };
                if !selected(job_id, &state.options.only_jobs) {
                    continue;
                }
                if let Some(record) = state
                    .resume
                    .and_then(|plan| plan.finished_jobs.iter().find(|j| &j.id == job_id))
                {
                    let report = self.restored_job(state, record);
                    needs.insert(
                        job_id.clone(),
                        NeedResult::from_legs(std::slice::from_ref(&report)),
                    );
                    reports.push(report);
                    continue;
                }
                let (legs, need) = self
                    .run_any(state, job_id, job, &needs, Some(&prepared), 0)
                    .await?;
                needs.insert(job_id.clone(), need);
                reports.extend(legs);
            }
        }
        self.close_session(state, prepared).await;
        Ok(reports)
    }

    async fn run_session_per_job(
        &self,
        state: &RunState<'_>,
        levels: &[Vec<String>],
    ) -> Result<Vec<JobReport>, ExecError> {
        let mut needs: HashMap<String, NeedResult> = HashMap::new();
        let mut reports = Vec::new();
        for level in levels {
            let jobs: Vec<(&String, &Job)> = level
                .iter()
                .filter(|id| selected(id, &state.options.only_jobs))
                .filter_map(|id| state.workflow.jobs.get_key_value(id.as_str()))
                .collect();
            // The jobs of one level are independent: run them concurrently; the session limit
            // bounds how many VMs exist at once.
            let runs = jobs
                .iter()
                .map(|(id, job)| self.run_any(state, id, job, &needs, None, 0));
            let results = futures_join_all(runs).await;
            for ((id, _), result) in jobs.iter().zip(results) {
                let (legs, need) = result?;
                needs.insert((*id).clone(), need);
                reports.extend(legs);
            }
        }
        Ok(reports)
    }

    async fn open_session(
        &self,
        state: &RunState<'_>,
        session_id: String,
        spec: VmSpec,
    ) -> Result<Prepared, ExecError> {
        let request = SessionRequest {
            session_id,
            run_id: state.options.run_id.clone(),
            workflow: state.workflow.display_name().to_owned(),
            spec,
        };
        let created = match state.resume {
            Some(plan) => {
                self.sessions
                    .create_session_from(request, plan.snapshot.clone())
                    .await
            }
            None => self.sessions.create_session(request).await,
        };
        let guard = created.map_err(|source| ExecError::Session {
            run: state.options.run_id.clone(),
            source: Box::new(source),
        })?;
        state
            .allocations
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        state.events.emit(EventKind::SessionAllocated {
            session: guard.id().to_owned(),
            vm: guard.vm_id().to_owned(),
            backend: guard.vm().backend().to_owned(),
            allocation_ms: millis(guard.allocation_time()),
            workflow: state.workflow.display_name().to_owned(),
            source: guard.source().to_string(),
        });
        let vm = guard.vm().clone();
        let layout = Layout::new(vm.work_root());
        if let Some(plan) = state.resume {
            // The restored VM is set up already: its workspace is the one the steps left. The
            // restored snapshot is this run's first, so that this run can be resumed too.
            if let Some(snapshots) = state.snapshots {
                snapshots.update(|m| {
                    m.base_path = plan.base_path.clone();
                    m.snapshots.push(plan.record.clone());
                });
            }
            return Ok(Prepared::new(guard, layout, plan.base_path.clone()));
        }
        match setup(&*vm, &layout, &state.options.context).await {
            Ok(base_path) => {
                if let Some(snapshots) = state.snapshots {
                    snapshots.update(|m| m.base_path = base_path.clone());
                }
                Ok(Prepared::new(guard, layout, base_path))
            }
            Err(source) => {
                let vm_id = guard.vm_id().to_owned();
                self.close_session(state, Prepared::new(guard, layout, String::new()))
                    .await;
                Err(ExecError::Setup { vm: vm_id, source })
            }
        }
    }

    /// Cleanup and release. Errors are logged: the run's result is already decided.
    async fn close_session(&self, state: &RunState<'_>, prepared: Prepared) {
        let vm = prepared.guard.vm().clone();
        if let Err(e) = vm.kill_all().await {
            tracing::warn!(vm = vm.id(), "cleanup failed: {e}");
        }
        let session = prepared.guard.id().to_owned();
        let vm_id = prepared.guard.vm_id().to_owned();
        if let Err(e) = self.sessions.release_session(prepared.guard).await {
            error!(vm = %vm_id, "release of session {session} failed: {e}");
        }
        state
            .events
            .emit(EventKind::SessionReleased { session, vm: vm_id });
    }

    /// Runs every leg of one job. With `shared`, in that session; otherwise each leg gets its
    /// own.
    async fn run_job(
        &self,
        state: &RunState<'_>,
        job_id: &str,
        job: &Job,
        needs: &HashMap<String, NeedResult>,
        shared: Option<&Prepared>,
    ) -> Result<Vec<JobReport>, ExecError> {
        let needs_ctx = context::needs_context(job, needs);
        let needs_status = needs_status(job, needs, state.cancel.is_cancelled());
        let base = state.options.context.base_contexts(state.workflow, job_id);
        let mut ctx_map = base.clone();
        ctx_map.insert("needs".into(), needs_ctx.clone());
        let host = StaticHost::new(needs_status);

        // Job-level `if:` sees needs, not matrix or steps.
        let run_it = match &job.if_cond {
            Some(cond) => eval_condition(cond, &ctx_map, &host),
            None => Ok(needs_status == JobStatus::Success),
        };
        match run_it {
            Ok(true) => {}
            Ok(false) => return Ok(vec![self.skip_job(state, job_id, job, &ctx_map, &host)]),
            Err(message) => return Ok(vec![self.job_error(state, job_id, job, &message)]),
        }
        let legs = match context::matrix_legs(job, &ctx_map, &host, &state.options.matrix_filter) {
            Ok(legs) if legs.is_empty() => {
                return Ok(vec![self.skip_job(state, job_id, job, &ctx_map, &host)]);
            }
            Ok(legs) => legs,
            Err(message) => return Ok(vec![self.job_error(state, job_id, job, &message)]),
        };

        let fail_fast = match &job.strategy {
            Some(strategy) => eval_bool(&strategy.fail_fast, &ctx_map, &host).unwrap_or(true),
            None => true,
        };
        let total = legs.len();
        let mut reports = Vec::new();
        let leg_cancel = state.cancel.child_token();
        match shared {
            Some(prepared) => {
                for (index, leg) in legs.iter().enumerate() {
                    let leg_info = (leg, index, total);
                    if let Err(message) = vms::check_shared(
                        state.options,
                        &state.plan,
                        job_id,
                        job,
                        &ctx_map,
                        leg_info,
                    ) {
                        reports.push(self.job_error(state, job_id, job, &message));
                        continue;
                    }
                    let report = self
                        .run_leg(
                            state,
                            job_id,
                            job,
                            leg,
                            (index, total),
                            &ctx_map,
                            prepared,
                            &leg_cancel,
                        )
                        .await;
                    if fail_fast && report.result == Conclusion::Failure && total > 1 {
                        leg_cancel.cancel();
                    }
                    reports.push(report);
                }
            }
            None => {
                // `strategy.max-parallel` bounds how many legs (VMs) of this job run at once.
                let max_parallel = job
                    .strategy
                    .as_ref()
                    .and_then(|s| s.max_parallel.as_ref())
                    .and_then(|m| match m {
                        NumberOrExpr::Number(n) => Some(*n),
                        NumberOrExpr::Expr(t) => {
                            eval_value(t, &ctx_map, &host).ok().map(|v| v.to_number())
                        }
                    })
                    .filter(|n| n.is_finite() && *n >= 1.0)
                    .map_or(total, |n| (n as usize).min(total.max(1)));
                let parallel = tokio::sync::Semaphore::new(max_parallel.max(1));
                let runs = legs.iter().enumerate().map(|(index, leg)| {
                    let ctx_map = &ctx_map;
                    let leg_cancel = &leg_cancel;
                    let parallel = &parallel;
                    async move {
                        let _slot = parallel.acquire().await;
                        if leg_cancel.is_cancelled() && fail_fast {
                            // fail-fast cancelled the legs that had not started yet.
                            return Ok(self.cancelled_leg(state, job_id, job, leg, ctx_map));
                        }
                        let session_id = if total > 1 {
                            format!("{}-{job_id}-{}", state.options.run_id, index + 1)
                        } else {
                            format!("{}-{job_id}", state.options.run_id)
                        };
                        let spec = match vms::leg_spec(
                            state.options,
                            job_id,
                            job,
                            ctx_map,
                            (leg, index, total),
                        ) {
                            Ok(spec) => spec,
                            Err(message) => return Ok(self.job_error(state, job_id, job, &message)),
                        };
                        let prepared = self.open_session(state, session_id, spec).await?;
                        let report = self
                            .run_leg(
                                state,
                                job_id,
                                job,
                                leg,
                                (index, total),
                                ctx_map,
                                &prepared,
                                leg_cancel,
                            )
                            .await;
                        if fail_fast && report.result == Conclusion::Failure && total > 1 {
                            leg_cancel.cancel();
                        }
                        self.close_session(state, prepared).await;
                        Ok::<_, ExecError>(report)
                    }
                });
                for result in futures_join_all(runs).await {
                    reports.push(result?);
                }
            }
        }
        Ok(reports)
    }

    /// A leg that never started because fail-fast cancelled it.
    fn cancelled_leg(
        &self,
        state: &RunState<'_>,
        job_id: &str,
        job: &Job,
        leg: &MatrixLeg,
        ctx_map: &IndexMap<String, Value>,
    ) -> JobReport {
        let name = job_display_name(
            job_id,
            job,
            leg,
            ctx_map,
            &StaticHost::new(JobStatus::Cancelled),
        );
        state.events.emit(EventKind::JobStarted {
            job: job_id.to_owned(),
            name: name.clone(),
        });
        state.events.emit(EventKind::JobFinished {
            job: job_id.to_owned(),
            name: name.clone(),
            result: Conclusion::Cancelled,
            outputs: IndexMap::new(),
            summary: String::new(),
            annotations: Vec::new(),
        });
        JobReport {
            id: job_id.to_owned(),
            name,
            result: Conclusion::Cancelled,
            duration: Duration::ZERO,
            steps: Vec::new(),
            outputs: IndexMap::new(),
            summary: String::new(),
            annotations: Vec::new(),
        }
    }

    fn skip_job(
        &self,
        state: &RunState<'_>,
        job_id: &str,
        job: &Job,
        ctx_map: &IndexMap<String, Value>,
        host: &StaticHost,
    ) -> JobReport {
        let name = job_display_name(job_id, job, &MatrixLeg::default(), ctx_map, host);
        state.events.emit(EventKind::JobStarted {
            job: job_id.to_owned(),
            name: name.clone(),
        });
        state.events.emit(EventKind::JobFinished {
            job: job_id.to_owned(),
            name: name.clone(),
            result: Conclusion::Skipped,
            outputs: IndexMap::new(),
            summary: String::new(),
            annotations: Vec::new(),
        });
        JobReport {
            id: job_id.to_owned(),
            name,
            result: Conclusion::Skipped,
            duration: Duration::ZERO,
            steps: Vec::new(),
            outputs: IndexMap::new(),
            summary: String::new(),
            annotations: Vec::new(),
        }
    }

    fn job_error(&self, state: &RunState<'_>, job_id: &str, job: &Job, message: &str) -> JobReport {
        let name = job
            .name
            .as_ref()
            .map(|n| n.source().to_owned())
            .unwrap_or_else(|| job_id.to_owned());
        state.events.emit(EventKind::JobStarted {
            job: job_id.to_owned(),
            name: name.clone(),
        });
        state.events.emit(EventKind::Log {
            job: job_id.to_owned(),
            step: None,
            stream: LogStream::Stderr,
            line: format!("Error: {message}"),
        });
        state.events.emit(EventKind::JobFinished {
            job: job_id.to_owned(),
            name: name.clone(),
            result: Conclusion::Failure,
            outputs: IndexMap::new(),
            summary: String::new(),
            annotations: Vec::new(),
        });
        JobReport {
            id: job_id.to_owned(),
            name,
            result: Conclusion::Failure,
            duration: Duration::ZERO,
            steps: Vec::new(),
            outputs: IndexMap::new(),
            summary: String::new(),
            annotations: Vec::new(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_leg(
        &self,
        state: &RunState<'_>,
        job_id: &str,
        job: &Job,
        leg: &MatrixLeg,
        (index, total): (usize, usize),
        base: &IndexMap<String, Value>,
        prepared: &Prepared,
        cancel: &CancellationToken,
    ) -> JobReport {
        let started = Instant::now();
        let vm = prepared.guard.vm().clone();
        let mut ctx_map = base.clone();
        ctx_map.insert("matrix".into(), context::matrix_value(leg));
        ctx_map.insert(
            "strategy".into(),
            context::strategy_value(job, index, total),
        );
        ctx_map.insert(
            "runner".into(),
            context::runner_value(&prepared.layout.temp, &prepared.layout.tool_cache, vm.id()),
        );
        let host = StaticHost::new(JobStatus::Success);
        let name = job_display_name(job_id, job, leg, &ctx_map, &host);
        state.events.emit(EventKind::JobStarted {
            job: job_id.to_owned(),
            name: name.clone(),
        });
        let mut leg_state = LegState::new(JobStatus::Success);
        for secret in state.options.context.secrets.values() {
            leg_state.masker.add(secret);
        }
        let job_timeout = job
            .timeout_minutes
            .as_ref()
            .and_then(|t| eval_minutes(t, &ctx_map, &host))
            .unwrap_or(DEFAULT_JOB_TIMEOUT);
        let deadline = tokio::time::Instant::now() + job_timeout;

        let mut steps = Vec::new();
        let total_steps = job.steps.len();
        // Pre and post steps are numbered after the job's own steps.
        let mut next_index = total_steps;
        // Pre steps see the workflow's and the job's env (no step has run yet).
        let mut pre_env = state.options.context.env.clone();
        for (k, t) in state.workflow.env.iter().chain(job.env.iter()) {
            ctx_map.insert("env".into(), string_map_value(&pre_env));
            if let Ok(v) = eval_string(t, &ctx_map, &host) {
                pre_env.insert(k.clone(), v);
            }
        }
        ctx_map.insert("env".into(), string_map_value(&pre_env));
        let resume = state.resume.filter(|plan| plan.job == job_id);
        match resume {
            // The snapshot holds what the pre steps and the first steps did.
            Some(plan) => steps.extend(self.restore_leg(state, job_id, plan, &mut leg_state)),
            None => steps.extend(
                self.run_pre_steps(
                    state,
                    job_id,
                    &job.steps,
                    &mut next_index,
                    (&vm, prepared, cancel),
                    &ctx_map,
                    &mut leg_state,
                    deadline,
                )
                .await,
            ),
        }
        for step in &job.steps {
            if resume.is_some_and(|plan| step.index <= plan.step) {
                continue;
            }
            if cancel.is_cancelled() && leg_state.status != JobStatus::Cancelled {
                leg_state.status = JobStatus::Cancelled;
            }
            let report = self
                .run_step(
                    state,
                    job_id,
                    job,
                    step,
                    total_steps,
                    &vm,
                    prepared,
                    &mut ctx_map,
                    &mut leg_state,
                    cancel,
                    deadline,
                )
                .await;
            if report.conclusion == Conclusion::Failure {
                leg_state.status = JobStatus::Failure;
            }
            if report.outcome == Conclusion::Cancelled {
                leg_state.status = JobStatus::Cancelled;
            }
            if let Some(snapshots) = state.snapshots {
                self.snapshot_step(
                    state,
                    snapshots,
                    (job_id, index, job),
                    step,
                    &report,
                    &leg_state,
                    (&vm, prepared),
                )
                .await;
            }
            steps.push(report);
        }
        ctx_map.insert("steps".into(), Value::Object(leg_state.steps.clone()));
        steps.extend(
            self.run_post_steps(
                state,
                job_id,
                &mut next_index,
                (&vm, prepared, cancel),
                &ctx_map,
                &mut leg_state,
                deadline,
            )
            .await,
        );

        // Outputs see the final steps context.
        ctx_map.insert("steps".into(), Value::Object(leg_state.steps.clone()));
        let out_host = StaticHost::new(leg_state.status);
        let mut outputs = IndexMap::new();
        for (key, template) in &job.outputs {
            match eval_string(template, &ctx_map, &out_host) {
                Ok(value) => {
                    outputs.insert(key.clone(), value);
                }
                Err(e) => state.events.emit(EventKind::Log {
                    job: job_id.to_owned(),
                    step: None,
                    stream: LogStream::Stderr,
                    line: format!("Error: output `{key}`: {e}"),
                }),
            }
        }
        let mut result = match leg_state.status {
            JobStatus::Success => Conclusion::Success,
            JobStatus::Failure => Conclusion::Failure,
            JobStatus::Cancelled => Conclusion::Cancelled,
        };
        if result == Conclusion::Failure
            && eval_bool(&job.continue_on_error, &ctx_map, &out_host).unwrap_or(false)
        {
            result = Conclusion::Success;
        }
        state.events.emit(EventKind::JobFinished {
            job: job_id.to_owned(),
            name: name.clone(),
            result,
            outputs: outputs.clone(),
            summary: leg_state.summary.clone(),
            annotations: leg_state.annotations.clone(),
        });
        if let Some(snapshots) = state.snapshots {
            snapshots.update(|m| {
                m.jobs.push(JobRecord {
                    id: job_id.to_owned(),
                    name: name.clone(),
                    result: result.as_str().to_owned(),
                    outputs: outputs.clone(),
                    steps: steps
                        .iter()
                        .take(job.steps.len())
                        .map(|s| s.name.clone())
                        .collect(),
                    fingerprints: job.steps.iter().map(snapshots::fingerprint).collect(),
                })
            });
        }
        JobReport {
            id: job_id.to_owned(),
            name,
            result,
            duration: started.elapsed(),
            steps,
            outputs,
            summary: leg_state.summary,
            annotations: leg_state.annotations,
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_step(
        &self,
        state: &RunState<'_>,
        job_id: &str,
        job: &Job,
        step: &Step,
        total_steps: usize,
        vm: &Arc<dyn Vm>,
        prepared: &Prepared,
        ctx_map: &mut IndexMap<String, Value>,
        leg: &mut LegState,
        cancel: &CancellationToken,
        deadline: tokio::time::Instant,
    ) -> StepReport {
        let started = Instant::now();
        // Keeps the idle reaper away from a session that is working.
        prepared.guard.touch();
        let layout = &prepared.layout;
        let (host, _hash_copy) = StaticHost::for_step(leg.status, &**vm, layout, step).await;
        // The env context: --env-file < workflow < job < GITHUB_ENV.
        let mut env = state.options.context.env.clone();
        ctx_map.insert("steps".into(), Value::Object(leg.steps.clone()));
        for (k, t) in state.workflow.env.iter().chain(job.env.iter()) {
            ctx_map.insert("env".into(), string_map_value(&env));
            match eval_string(t, ctx_map, &host) {
                Ok(v) => {
                    env.insert(k.clone(), v);
                }
                Err(e) => return self.step_error(state, job_id, step, vm, started, &e),
            }
        }
        if let Some(t) = &job.env_expr {
            ctx_map.insert("env".into(), string_map_value(&env));
            match eval_env_object(t, ctx_map, &host) {
                Ok(values) => env.extend(values),
                Err(e) => return self.step_error(state, job_id, step, vm, started, &e),
            }
        }
        env.extend(leg.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        ctx_map.insert("env".into(), string_map_value(&env));
        ctx_map.insert("job".into(), context::job_value(leg.status));

        let name = match &step.name {
            Some(t) => eval_string(t, ctx_map, &host).unwrap_or_else(|_| step.display_name()),
            None => step.display_name(),
        };
        let id = step.id.as_ref().map(|s| s.value.clone());
        info!("Executing step {}/{total_steps}: {name}", step.index + 1);
        state.events.emit(EventKind::StepStarted {
            job: job_id.to_owned(),
            step: step.index,
            id: id.clone(),
            name: name.clone(),
            vm: vm.id().to_owned(),
        });

        let run_it = match &step.if_cond {
            Some(cond) => eval_condition(cond, ctx_map, &host),
            None => Ok(leg.status == JobStatus::Success),
        };
        let run_it = match run_it {
            Ok(r) => r,
            Err(e) => return self.finish_failed(state, job_id, step, &name, vm, leg, started, e),
        };
        if !run_it {
            let report = StepReport {
                name: name.clone(),
                outcome: Conclusion::Skipped,
                conclusion: Conclusion::Skipped,
                exit_code: None,
                duration: Duration::ZERO,
                error: None,
                restored: false,
            };
            self.record_step(state, job_id, step, vm, leg, &report, IndexMap::new());
            return report;
        }

        // The step's own env sees the env context above.
        for (k, t) in &step.env {
            match eval_string(t, ctx_map, &host) {
                Ok(v) => {
                    env.insert(k.clone(), v);
                }
                Err(e) => {
                    return self.finish_failed(state, job_id, step, &name, vm, leg, started, e);
                }
            }
        }
        if let Some(t) = &step.env_expr {
            match eval_env_object(t, ctx_map, &host) {
                Ok(values) => env.extend(values),
                Err(e) => {
                    return self.finish_failed(state, job_id, step, &name, vm, leg, started, e);
                }
            }
        }
        ctx_map.insert("env".into(), string_map_value(&env));

        let cx = StepCx {
            state,
            job_id,
            step,
            vm,
            prepared,
            cancel,
            timeout: step_timeout_of(step, ctx_map, &host, deadline),
        };
        let done = match &step.action {
            StepAction::Uses { uses, with } if actions::is_checkout(&uses.value) => {
                self.checkout(&cx, leg, with, ctx_map, &host).await
            }
            StepAction::Uses { uses, with } => {
                let call = actions::ActionCall {
                    uses,
                    with,
                    env: &env,
                    depth: 0,
                };
                self.run_action(&cx, leg, &call, ctx_map, &host).await
            }
            _ => match self.step_command(state, job, step, ctx_map, &host, layout) {
                Ok(StepCommand::Exec { command, cwd }) => {
                    self.exec_process(&cx, leg, command, cwd, &env).await.into()
                }
                Err(e) => {
                    return self.finish_failed(state, job_id, step, &name, vm, leg, started, e);
                }
            },
        };
        let StepDone {
            outcome,
            exit_code,
            error,
            outputs,
        } = done;
        if let Some(message) = &error {
            state.events.emit(EventKind::Log {
                job: job_id.to_owned(),
                step: Some(step.index),
                stream: LogStream::Stderr,
                line: format!("Error: {}", leg.masker.mask(message)),
            });
        }
        let conclusion = if outcome == Conclusion::Failure
            && eval_bool(&step.continue_on_error, ctx_map, &host).unwrap_or(false)
        {
            Conclusion::Success
        } else {
            outcome
        };
        let report = StepReport {
            name,
            outcome,
            conclusion,
            exit_code,
            duration: started.elapsed(),
            error,
            restored: false,
        };
        self.record_step(state, job_id, step, vm, leg, &report, outputs);
        report
    }

    /// Runs one process for a step (a `run:` script, an action's script) with fresh
    /// file-command files, streams and masks its output, and reads the file commands back:
    /// `GITHUB_ENV` and `GITHUB_PATH` change the job leg; outputs and state are returned.
    async fn exec_process(
        &self,
        cx: &StepCx<'_, '_>,
        leg: &mut LegState,
        command: kiln_vm::Command,
        cwd: String,
        env: &IndexMap<String, String>,
    ) -> ProcessResult {
        let vm = cx.vm;
        let layout = &cx.prepared.layout;
        cx.prepared.touch_workspace();
        let files = FileCommandPaths::new(layout, cx.step.index);
        for path in files.all() {
            if let Err(e) = vm.write_file(path, b"").await {
                return ProcessResult::failed(e.to_string());
            }
        }
        let mut exec_env = context::default_env(
            &cx.state.options.context,
            cx.state.workflow,
            cx.job_id,
            cx.step,
            layout,
            vm.id(),
        );
        exec_env.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
        exec_env.insert("GITHUB_ENV".into(), files.env.clone());
        exec_env.insert("GITHUB_OUTPUT".into(), files.output.clone());
        exec_env.insert("GITHUB_PATH".into(), files.path.clone());
        exec_env.insert("GITHUB_STATE".into(), files.state.clone());
        exec_env.insert("GITHUB_STEP_SUMMARY".into(), files.summary.clone());
        if !leg.path.is_empty() {
            let mut path: Vec<&str> = leg.path.iter().rev().map(String::as_str).collect();
            path.push(&cx.prepared.base_path);
            exec_env.insert("PATH".into(), path.join(":"));
        }
        let timeout = cx.timeout;
        leg.last_exec = Some((exec_env.clone(), cwd.clone()));
        let request = ExecRequest {
            command,
            env: exec_env.into_iter().collect(),
            cwd: Some(cwd),
            timeout: Some(timeout),
            user: kiln_vm::ExecUser::Runner,
        };

        let (tx, rx) = mpsc::unbounded_channel();
        let pump = tokio::spawn(pump_output(
            rx,
            cx.state.events.clone(),
            cx.job_id.to_owned(),
            cx.step.index,
            leg.masker.clone(),
            cx.state.options.context.step_debug(),
        ));
        let exec = vm.exec(request, tx);
        // A step that starts after cancellation (an `always()` step) runs to its end; only a
        // hard stop (dropping the run) interrupts it.
        let interruptible = !cx.cancel.is_cancelled();
        let result = tokio::select! {
            r = exec => Some(r),
            () = cx.cancel.cancelled(), if interruptible => None,
        };
        let pumped = pump.await.unwrap_or_default();
        leg.masker = pumped.masker;
        leg.annotations.extend(pumped.annotations);

        let (outcome, exit_code, error) = match result {
            None => (Conclusion::Cancelled, None, Some("cancelled".to_owned())),
            Some(Err(e)) => (Conclusion::Failure, None, Some(e.to_string())),
            Some(Ok(o)) => match o.status {
                ExitStatus::Exited(0) => (Conclusion::Success, Some(0), None),
                ExitStatus::Exited(code) => (
                    Conclusion::Failure,
                    Some(code),
                    Some(format!("Process completed with exit code {code}.")),
                ),
                ExitStatus::Signaled(sig) => (
                    Conclusion::Failure,
                    None,
                    Some(format!("Process was killed by signal {sig}.")),
                ),
                ExitStatus::TimedOut => {
                    let minutes = timeout.as_secs_f64() / 60.0;
                    (
                        Conclusion::Failure,
                        None,
                        Some(format!(
                            "The step exceeded its time limit of {minutes:.1} minutes and was killed."
                        )),
                    )
                }
            },
        };

        // File commands are read back even after a failure, as GitHub does.
        let mut outputs = pumped.outputs;
        let mut state = pumped.state;
        let mut file_error = None;
        if outcome != Conclusion::Cancelled {
            match read_file_commands(&**vm, &files).await {
                Ok(fc) => {
                    for (k, v) in fc.env {
                        leg.env.insert(k, v);
                    }
                    leg.path.extend(fc.path);
                    outputs.extend(fc.outputs);
                    state.extend(fc.state);
                    leg.summary.push_str(&leg.masker.mask(&fc.summary));
                }
                Err(e) => file_error = Some(e),
            }
        }
        let file_error = file_error.or(pumped.disabled);
        let (outcome, error) = match (outcome, file_error) {
            (Conclusion::Success, Some(e)) => (Conclusion::Failure, Some(e)),
            (o, fe) => (o, error.or(fe)),
        };
        ProcessResult {
            outcome,
            exit_code,
            error,
            outputs,
            state,
        }
    }

    fn step_command(
        &self,
        state: &RunState<'_>,
        job: &Job,
        step: &Step,
        ctx: &IndexMap<String, Value>,
        host: &StaticHost,
        layout: &Layout,
    ) -> Result<StepCommand, String> {
        match &step.action {
            StepAction::Run {
                script,
                shell,
                working_directory,
            } => {
                let script = eval_string(script, ctx, host)?;
                let shell = shell
                    .as_ref()
                    .map(|s| s.value.as_str())
                    .or(job.defaults.run.shell.as_ref().map(|s| s.value.as_str()))
                    .or(state
                        .workflow
                        .defaults
                        .run
                        .shell
                        .as_ref()
                        .map(|s| s.value.as_str()));
                let dir = match working_directory
                    .as_ref()
                    .or(job.defaults.run.working_directory.as_ref())
                    .or(state.workflow.defaults.run.working_directory.as_ref())
                {
                    Some(t) => Some(eval_string(t, ctx, host)?),
                    None => None,
                };
                let command = shell::command(shell, script)?;
                Ok(StepCommand::Exec {
                    command,
                    cwd: resolve_dir(&layout.workspace, dir.as_deref()),
                })
            }
            StepAction::Uses { uses, .. } => Err(format!(
                "`uses: {}` is run as an action, not a command",
                uses.value
            )),
            other => Err(unsupported_step(other).unwrap_or_default()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn finish_failed(
        &self,
        state: &RunState<'_>,
        job_id: &str,
        step: &Step,
        name: &str,
        vm: &Arc<dyn Vm>,
        leg: &mut LegState,
        started: Instant,
        message: impl Into<String>,
    ) -> StepReport {
        let message = message.into();
        state.events.emit(EventKind::Log {
            job: job_id.to_owned(),
            step: Some(step.index),
            stream: LogStream::Stderr,
            line: format!("Error: {}", leg.masker.mask(&message)),
        });
        let report = StepReport {
            name: name.to_owned(),
            outcome: Conclusion::Failure,
            conclusion: Conclusion::Failure,
            exit_code: None,
            duration: started.elapsed(),
            error: Some(message),
            restored: false,
        };
        self.record_step(state, job_id, step, vm, leg, &report, IndexMap::new());
        report
    }

    fn step_error(
        &self,
        state: &RunState<'_>,
        job_id: &str,
        step: &Step,
        vm: &Arc<dyn Vm>,
        started: Instant,
        message: &str,
    ) -> StepReport {
        let name = step.display_name();
        state.events.emit(EventKind::StepStarted {
            job: job_id.to_owned(),
            step: step.index,
            id: step.id.as_ref().map(|s| s.value.clone()),
            name: name.clone(),
            vm: vm.id().to_owned(),
        });
        let mut leg = LegState::new(JobStatus::Failure);
        self.finish_failed(state, job_id, step, &name, vm, &mut leg, started, message)
    }

    #[allow(clippy::too_many_arguments)]
    fn record_step(
        &self,
        state: &RunState<'_>,
        job_id: &str,
        step: &Step,
        vm: &Arc<dyn Vm>,
        leg: &mut LegState,
        report: &StepReport,
        outputs: IndexMap<String, String>,
    ) {
        if let Some(id) = &step.id {
            leg.steps.insert(
                id.value.clone(),
                context::step_value(&outputs, report.outcome, report.conclusion),
            );
        }
        state.events.emit(EventKind::StepFinished {
            job: job_id.to_owned(),
            step: step.index,
            id: step.id.as_ref().map(|s| s.value.clone()),
            name: report.name.clone(),
            vm: vm.id().to_owned(),
            outcome: report.outcome,
            conclusion: report.conclusion,
            exit_code: report.exit_code,
            outputs,
            duration_ms: millis(report.duration),
        });
    }
}

impl WorkflowExecutor {
    /// After a step: a snapshot of the leg's VM, when the step succeeded (and nothing failed
    /// before it), or the failure state when it is the run's first failed step.
    #[allow(clippy::too_many_arguments)]
    async fn snapshot_step(
        &self,
        state: &RunState<'_>,
        snapshots: &StepSnapshots,
        (job_id, leg, job): (&str, usize, &Job),
        step: &Step,
        report: &StepReport,
        leg_state: &LegState,
        (vm, prepared): (&Arc<dyn Vm>, &Prepared),
    ) {
        let kind = match (report.outcome, report.conclusion) {
            (Conclusion::Skipped | Conclusion::Cancelled, _) => return,
            (_, Conclusion::Success) if leg_state.status == JobStatus::Success => {
                SnapshotKind::AfterStep
            }
            (_, Conclusion::Failure) if !snapshots.has_failure() => SnapshotKind::Failure,
            _ => return,
        };
        let (mut env, cwd) = leg_state
            .last_exec
            .clone()
            .unwrap_or_else(|| (IndexMap::new(), prepared.layout.workspace.clone()));
        env.extend(leg_state.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        if !leg_state.path.is_empty() {
            let mut path: Vec<&str> = leg_state.path.iter().rev().map(String::as_str).collect();
            path.push(&prepared.base_path);
            env.insert("PATH".into(), path.join(":"));
        }
        let leg_record = LegRecord {
            env: leg_state.env.clone(),
            path: leg_state.path.clone(),
            steps: leg_state
                .steps
                .iter()
                .map(|(k, v)| (k.clone(), v.to_json()))
                .collect(),
            summary: leg_state.summary.clone(),
        };
        prepared.guard.touch();
        snapshots
            .take(
                &**self.sessions.provider(),
                &**vm,
                state.events,
                Taking {
                    job: job_id,
                    leg,
                    step: step.index,
                    name: &report.name,
                    kind,
                    env,
                    cwd,
                    leg_state: leg_record,
                    fingerprints: job.steps[..=step.index.min(job.steps.len() - 1)]
                        .iter()
                        .map(snapshots::fingerprint)
                        .collect(),
                },
            )
            .await;
        prepared.guard.touch();
    }

    /// The resumed leg's first steps, restored from the snapshot: its state as recorded, and a
    /// `step_restored` event and a restored report for each.
    fn restore_leg(
        &self,
        state: &RunState<'_>,
        job_id: &str,
        plan: &ResumePlan,
        leg_state: &mut LegState,
    ) -> Vec<StepReport> {
        leg_state.env = plan.leg_state.env.clone();
        leg_state.path = plan.leg_state.path.clone();
        leg_state.summary = plan.leg_state.summary.clone();
        leg_state.steps = plan
            .leg_state
            .steps
            .iter()
            .map(|(k, v)| (k.clone(), Value::from_json(v.clone())))
            .collect();
        plan.restored_steps
            .iter()
            .enumerate()
            .map(|(index, name)| {
                state.events.emit(EventKind::StepRestored {
                    job: job_id.to_owned(),
                    step: index,
                    name: name.clone(),
                    from_run: plan.from_run.clone(),
                });
                restored_step(name)
            })
            .collect()
    }

    /// A job leg that finished before the resumed one: reported as recorded, not run.
    fn restored_job(&self, state: &RunState<'_>, record: &JobRecord) -> JobReport {
        let from_run = state.resume.map(|p| p.from_run.clone()).unwrap_or_default();
        if let Some(snapshots) = state.snapshots {
            snapshots.update(|m| m.jobs.push(record.clone()));
        }
        state.events.emit(EventKind::JobStarted {
            job: record.id.clone(),
            name: record.name.clone(),
        });
        let steps = record
            .steps
            .iter()
            .enumerate()
            .map(|(index, name)| {
                state.events.emit(EventKind::StepRestored {
                    job: record.id.clone(),
                    step: index,
                    name: name.clone(),
                    from_run: from_run.clone(),
                });
                restored_step(name)
            })
            .collect();
        let result = match record.result.as_str() {
            "success" => Conclusion::Success,
            "skipped" => Conclusion::Skipped,
            "cancelled" => Conclusion::Cancelled,
            _ => Conclusion::Failure,
        };
        state.events.emit(EventKind::JobFinished {
            job: record.id.clone(),
            name: record.name.clone(),
            result,
            outputs: record.outputs.clone(),
            summary: String::new(),
            annotations: Vec::new(),
        });
        JobReport {
            id: record.id.clone(),
            name: record.name.clone(),
            result,
            duration: Duration::ZERO,
            steps,
            outputs: record.outputs.clone(),
            summary: String::new(),
            annotations: Vec::new(),
        }
    }
}

/// A step whose effects came from a snapshot.
fn restored_step(name: &str) -> StepReport {
    StepReport {
        name: name.to_owned(),
        outcome: Conclusion::Success,
        conclusion: Conclusion::Success,
        exit_code: None,
        duration: Duration::ZERO,
        error: None,
        restored: true,
    }
}

/// What one step needs to run processes: where, for whom, and until when.
struct StepCx<'a, 'r> {
    state: &'a RunState<'r>,
    job_id: &'a str,
    /// The job's step this work belongs to (events and `GITHUB_ACTION` name it).
    step: &'a Step,
    vm: &'a Arc<dyn Vm>,
    prepared: &'a Prepared,
    cancel: &'a CancellationToken,
    /// Time left for the step: its `timeout-minutes`, bounded by the job's deadline.
    timeout: Duration,
}

/// A step's result before `continue-on-error`.
struct StepDone {
    outcome: Conclusion,
    exit_code: Option<i32>,
    error: Option<String>,
    outputs: IndexMap<String, String>,
}

impl StepDone {
    fn failed(message: impl Into<String>) -> StepDone {
        StepDone {
            outcome: Conclusion::Failure,
            exit_code: None,
            error: Some(message.into()),
            outputs: IndexMap::new(),
        }
    }

    fn skipped() -> StepDone {
        StepDone {
            outcome: Conclusion::Skipped,
            exit_code: None,
            error: None,
            outputs: IndexMap::new(),
        }
    }

    fn success(outputs: IndexMap<String, String>) -> StepDone {
        StepDone {
            outcome: Conclusion::Success,
            exit_code: None,
            error: None,
            outputs,
        }
    }
}

/// One process's result: outcome, outputs and what it saved with `GITHUB_STATE`.
struct ProcessResult {
    outcome: Conclusion,
    exit_code: Option<i32>,
    error: Option<String>,
    outputs: IndexMap<String, String>,
    state: IndexMap<String, String>,
}

impl ProcessResult {
    fn failed(message: String) -> ProcessResult {
        ProcessResult {
            outcome: Conclusion::Failure,
            exit_code: None,
            error: Some(message),
            outputs: IndexMap::new(),
            state: IndexMap::new(),
        }
    }
}

impl From<ProcessResult> for StepDone {
    fn from(p: ProcessResult) -> StepDone {
        StepDone {
            outcome: p.outcome,
            exit_code: p.exit_code,
            error: p.error,
            outputs: p.outputs,
        }
    }
}

/// The step's time limit: its `timeout-minutes`, bounded by what is left of the job's.
fn step_timeout_of(
    step: &Step,
    ctx: &IndexMap<String, Value>,
    host: &StaticHost,
    deadline: tokio::time::Instant,
) -> Duration {
    let step_timeout = step
        .timeout_minutes
        .as_ref()
        .and_then(|t| eval_minutes(t, ctx, host));
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    step_timeout.map_or(left, |t| t.min(left))
}

enum StepCommand {
    Exec {
        command: kiln_vm::Command,
        cwd: String,
    },
}

/// Refuses, before any VM exists, what kiln cannot run yet.
fn check_supported(workflow: &Workflow, only_jobs: &[String]) -> Result<(), ExecError> {
    let mut problems = Vec::new();
    for job_id in only_jobs {
        if !workflow.jobs.contains_key(job_id) {
            let known: Vec<&str> = workflow.jobs.keys().map(String::as_str).collect();
            problems.push(format!(
                "{}: no job `{job_id}` (jobs: {})",
                workflow.file,
                known.join(", ")
            ));
        }
    }
    for (id, job) in &workflow.jobs {
        if !selected(id, only_jobs) {
            continue;
        }
        if let Some(uses) = &job.uses
            && job.strategy.as_ref().is_some_and(|s| s.matrix.is_some())
        {
            problems.push(format!(
                "{}: job `{id}` calls the reusable workflow `{}` with a matrix, which kiln does \
                 not run yet",
                uses.span, uses.value
            ));
        }
        if let Some(container) = &job.container {
            problems.push(format!(
                "{}: job `{id}` asks for a `container:`, which kiln does not run yet",
                container.span
            ));
        }
        if let Some(snapshot) = &job.snapshot {
            problems.push(format!(
                "{}: job `{id}` asks for a runner-image `snapshot:`, which kiln does not make yet",
                snapshot.span
            ));
        }
        if let Some(services) = &job.services {
            problems.push(format!(
                "{}: job `{id}` asks for `services:`, which kiln does not run yet",
                services.span
            ));
        }
        for step in &job.steps {
            if step.background {
                problems.push(format!(
                    "{}: step `{}` of job `{id}`: `background:` steps are not supported yet",
                    step.span,
                    step.display_name()
                ));
            }
            if let Some(what) = unsupported_step(&step.action) {
                problems.push(format!(
                    "{}: step `{}` of job `{id}`: {what}",
                    step.span,
                    step.display_name()
                ));
            }
            if let StepAction::Run {
                shell: Some(shell), ..
            } = &step.action
                && let Err(e) = shell::command(Some(&shell.value), String::new())
            {
                problems.push(format!("{}: {e}", shell.span));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(ExecError::Unsupported {
            workflow: workflow.file.to_string(),
            problems,
        })
    }
}

/// Background-step keys (`wait`, `wait-all`, `cancel`, `parallel`) are parsed but not run yet.
fn unsupported_step(action: &StepAction) -> Option<String> {
    let key = match action {
        StepAction::Run { .. } | StepAction::Uses { .. } => return None,
        StepAction::Wait { .. } => "wait",
        StepAction::WaitAll => "wait-all",
        StepAction::Cancel { .. } => "cancel",
        StepAction::Parallel { .. } => "parallel",
    };
    Some(format!("`{key}:` steps are not supported yet"))
}

fn selected(job_id: &str, only: &[String]) -> bool {
    only.is_empty() || only.iter().any(|j| j == job_id)
}

/// A needed job's result as later jobs see it.
#[derive(Debug, Clone)]
pub(crate) struct NeedResult {
    result: Conclusion,
    outputs: IndexMap<String, String>,
}

impl NeedResult {
    fn from_legs(legs: &[JobReport]) -> NeedResult {
        let result = if legs.iter().any(|l| l.result == Conclusion::Failure) {
            Conclusion::Failure
        } else if legs.iter().any(|l| l.result == Conclusion::Cancelled) {
            Conclusion::Cancelled
        } else if !legs.is_empty() && legs.iter().all(|l| l.result == Conclusion::Skipped) {
            Conclusion::Skipped
        } else {
            Conclusion::Success
        };
        // As on GitHub, with a matrix the last leg to set an output wins.
        let mut outputs = IndexMap::new();
        for leg in legs {
            for (k, v) in &leg.outputs {
                if !v.is_empty() || !outputs.contains_key(k) {
                    outputs.insert(k.clone(), v.clone());
                }
            }
        }
        NeedResult { result, outputs }
    }
}

/// The status `success()`/`failure()` see in a job's `if:`: its needs' results.
fn needs_status(job: &Job, needs: &HashMap<String, NeedResult>, cancelled: bool) -> JobStatus {
    if cancelled {
        return JobStatus::Cancelled;
    }
    let mut status = JobStatus::Success;
    for need in &job.needs {
        match needs.get(&need.value).map(|n| n.result) {
            Some(Conclusion::Failure) => return JobStatus::Failure,
            Some(Conclusion::Cancelled) => status = JobStatus::Cancelled,
            // A skipped need makes `success()` false too; GitHub reports that as failure-free
            // but not successful. `failure()` stays false.
            Some(Conclusion::Skipped) if status == JobStatus::Success => {
                status = JobStatus::Cancelled;
            }
            _ => {}
        }
    }
    status
}

fn run_result(jobs: &[JobReport], cancelled: bool) -> Conclusion {
    if jobs.iter().any(|j| j.result == Conclusion::Failure) {
        Conclusion::Failure
    } else if cancelled || jobs.iter().any(|j| j.result == Conclusion::Cancelled) {
        Conclusion::Cancelled
    } else {
        Conclusion::Success
    }
}

fn job_display_name(
    job_id: &str,
    job: &Job,
    leg: &MatrixLeg,
    ctx: &IndexMap<String, Value>,
    host: &StaticHost,
) -> String {
    match &job.name {
        // GitHub appends the matrix suffix only when the name does not use the matrix.
        Some(t) => {
            let name = eval_string(t, ctx, host).unwrap_or_else(|_| t.source().to_owned());
            if t.source().contains("matrix.") || leg.values.is_empty() {
                name
            } else {
                format!("{name} {}", leg.suffix())
            }
        }
        None if leg.values.is_empty() => job_id.to_owned(),
        None => format!("{job_id} {}", leg.suffix()),
    }
}

/// Whether any expression of `step` may call `hashFiles`.
fn mentions_hash_files(step: &Step) -> bool {
    let mut sources: Vec<&str> = Vec::new();
    sources.extend(step.name.as_ref().map(Template::source));
    sources.extend(step.if_cond.as_ref().map(Condition::source));
    sources.extend(step.env.values().map(Template::source));
    match &step.action {
        StepAction::Run {
            script,
            working_directory,
            ..
        } => {
            sources.push(script.source());
            sources.extend(working_directory.as_ref().map(Template::source));
        }
        StepAction::Uses { with, .. } => sources.extend(with.values().map(Template::source)),
        _ => {}
    }
    sources
        .iter()
        .any(|s| s.to_ascii_lowercase().contains("hashfiles"))
}

/// `success()` and friends for one evaluation; `hashFiles` against a workspace the host reads.
struct StaticHost {
    status: JobStatus,
    workspace: Option<PathBuf>,
}

impl StaticHost {
    fn new(status: JobStatus) -> StaticHost {
        StaticHost {
            status,
            workspace: None,
        }
    }

    /// The host for one step's expressions. `hashFiles` reads the workspace as it is now: the
    /// host reads it in place on the local backend; in a VM, a step that calls `hashFiles`
    /// gets a copy of the guest workspace taken just before it runs (kept alive by the
    /// returned directory).
    async fn for_step(
        status: JobStatus,
        vm: &dyn Vm,
        layout: &Layout,
        step: &Step,
    ) -> (StaticHost, Option<tempfile::TempDir>) {
        let mut host = StaticHost::new(status);
        if vm.backend() == "local" {
            host.workspace = Some(PathBuf::from(&layout.workspace));
            return (host, None);
        }
        if !mentions_hash_files(step) {
            return (host, None);
        }
        let copy = match tempfile::Builder::new().prefix("kiln-hashfiles-").tempdir() {
            Ok(dir) => dir,
            Err(_) => return (host, None),
        };
        let target = copy.path().join("workspace");
        match vm.copy_out(&layout.workspace, &target).await {
            Ok(()) => host.workspace = Some(target),
            Err(e) => tracing::warn!(
                vm = vm.id(),
                "copying the workspace for hashFiles failed: {e}"
            ),
        }
        (host, Some(copy))
    }
}

impl kiln_workflow::Host for StaticHost {
    fn job_status(&self) -> JobStatus {
        self.status
    }

    fn hash_files(&self, patterns: &[String]) -> Result<String, String> {
        match &self.workspace {
            Some(dir) => hash::hash_files(dir, patterns),
            None => Err("hashFiles() is only available in steps".into()),
        }
    }
}

fn eval_condition(
    cond: &Condition,
    ctx: &IndexMap<String, Value>,
    host: &StaticHost,
) -> Result<bool, String> {
    cond.eval(&EvalContext {
        contexts: ctx,
        host,
    })
    .map_err(|e| format!("if: {}: {e}", cond.source()))
}

fn eval_string(
    t: &Template,
    ctx: &IndexMap<String, Value>,
    host: &StaticHost,
) -> Result<String, String> {
    t.eval(&EvalContext {
        contexts: ctx,
        host,
    })
    .map_err(|e| format!("{}: {e}", t.span()))
}

fn eval_value(
    t: &Template,
    ctx: &IndexMap<String, Value>,
    host: &StaticHost,
) -> Result<Value, String> {
    t.eval_value(&EvalContext {
        contexts: ctx,
        host,
    })
    .map_err(|e| format!("{}: {e}", t.span()))
}

/// `env: ${{ expr }}`: the expression must give an object; its values become strings.
fn eval_env_object(
    t: &Template,
    ctx: &IndexMap<String, Value>,
    host: &StaticHost,
) -> Result<IndexMap<String, String>, String> {
    let value = eval_value(t, ctx, host)?;
    match value {
        Value::Object(map) => Ok(map
            .into_iter()
            .map(|(k, v)| (k, v.to_display_string()))
            .collect()),
        other => Err(format!(
            "{}: `env:` must evaluate to an object, not {}",
            t.span(),
            other.kind().name()
        )),
    }
}

fn eval_bool(
    v: &BoolOrExpr,
    ctx: &IndexMap<String, Value>,
    host: &StaticHost,
) -> Result<bool, String> {
    match v {
        BoolOrExpr::Bool(b) => Ok(*b),
        BoolOrExpr::Expr(t) => eval_value(t, ctx, host).map(|v| v.is_truthy()),
    }
}

fn eval_minutes(
    v: &NumberOrExpr,
    ctx: &IndexMap<String, Value>,
    host: &StaticHost,
) -> Option<Duration> {
    let minutes = match v {
        NumberOrExpr::Number(n) => *n,
        NumberOrExpr::Expr(t) => eval_value(t, ctx, host).ok()?.to_number(),
    };
    (minutes.is_finite() && minutes > 0.0).then(|| Duration::from_secs_f64(minutes * 60.0))
}

fn string_map_value(map: &IndexMap<String, String>) -> Value {
    Value::Object(
        map.iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect(),
    )
}

fn resolve_dir(workspace: &str, dir: Option<&str>) -> String {
    match dir {
        None | Some("") => workspace.to_owned(),
        Some(d) if d.starts_with('/') => d.to_owned(),
        Some(d) => format!("{workspace}/{d}"),
    }
}

/// Cancels `cancel` after `limit`, saying so in the run's log; aborted when dropped.
fn arm_time_limit(limit: Duration, events: EventSink, cancel: CancellationToken) -> AbortOnDrop {
    AbortOnDrop(tokio::spawn(async move {
        tokio::time::sleep(limit).await;
        let minutes = limit.as_secs_f64() / 60.0;
        tracing::warn!("run over its time limit of {minutes} min; cancelling it");
        events.emit(EventKind::Log {
            job: String::new(),
            step: None,
            stream: LogStream::Stderr,
            line: format!("The run is over its time limit of {minutes} min; cancelling it"),
        });
        cancel.cancel();
    }))
}

/// A task that is aborted when this is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Runs the futures concurrently and returns their outputs in order.
async fn futures_join_all<F: std::future::Future>(
    futures: impl IntoIterator<Item = F>,
) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.into_iter().map(Box::pin).collect();
    let mut results: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (fut, slot) in pinned.iter_mut().zip(results.iter_mut()) {
            if slot.is_none() {
                match fut.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => *slot = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

/// Creates the runner's directories in a fresh VM, copies the workspace in and writes the
/// event payload. Returns the VM's base `PATH`.
async fn setup(vm: &dyn Vm, layout: &Layout, context: &RunContext) -> Result<String, VmError> {
    if let Some(src) = &context.workspace {
        vm.copy_in(src, &layout.workspace).await?;
    }
    for dir in [
        &layout.temp,
        &layout.tool_cache,
        &layout.home,
        &layout.workspace,
    ] {
        vm.write_file(&format!("{dir}/.kiln-keep"), b"").await?;
    }
    let payload = serde_json::to_vec_pretty(&context.event_payload).unwrap_or_default();
    vm.write_file(&layout.event_path, &payload).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let outcome = vm
        .exec(
            ExecRequest {
                command: kiln_vm::Command::Argv(vec![
                    "sh".into(),
                    "-c".into(),
                    "rm -f \"$1\"/.kiln-keep \"$2\"/.kiln-keep \"$3\"/.kiln-keep \"$4\"/.kiln-keep; printf %s \"$PATH\"".into(),
                    "sh".into(),
                    layout.temp.clone(),
                    layout.tool_cache.clone(),
                    layout.home.clone(),
                    layout.workspace.clone(),
                ]),
                env: Vec::new(),
                cwd: None,
                timeout: Some(Duration::from_secs(60)),
                user: kiln_vm::ExecUser::Runner,
            },
            tx,
        )
        .await?;
    let mut path = Vec::new();
    while let Ok(chunk) = rx.try_recv() {
        if chunk.stream == Stream::Stdout {
            path.extend_from_slice(&chunk.data);
        }
    }
    if !outcome.status.success() {
        return Err(VmError::Guest {
            vm: vm.id().to_owned(),
            message: format!(
                "preparing the runner directories ended with {}",
                outcome.status
            ),
        });
    }
    Ok(String::from_utf8_lossy(&path).into_owned())
}

/// The per-step file-command paths.
struct FileCommandPaths {
    env: String,
    output: String,
    path: String,
    state: String,
    summary: String,
}

impl FileCommandPaths {
    fn new(layout: &Layout, step: usize) -> FileCommandPaths {
        let id = uuid::Uuid::new_v4().simple().to_string();
        let file = |kind: &str| format!("{}/{kind}_{step}_{id}", layout.file_commands);
        FileCommandPaths {
            env: file("set_env"),
            output: file("set_output"),
            path: file("add_path"),
            state: file("save_state"),
            summary: file("step_summary"),
        }
    }

    fn all(&self) -> [&String; 5] {
        [
            &self.env,
            &self.output,
            &self.path,
            &self.state,
            &self.summary,
        ]
    }
}

/// What a step wrote to its file commands.
#[derive(Debug, Default)]
struct FileCommands {
    env: IndexMap<String, String>,
    outputs: IndexMap<String, String>,
    state: IndexMap<String, String>,
    path: Vec<String>,
    summary: String,
}

async fn read_file_commands(vm: &dyn Vm, files: &FileCommandPaths) -> Result<FileCommands, String> {
    let read = |path: String| async move {
        vm.read_file(&path)
            .await
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .map_err(|e| e.to_string())
    };
    let env = parse_key_values("GITHUB_ENV", &read(files.env.clone()).await?)
        .map_err(|e| e.to_string())?;
    let outputs = parse_key_values("GITHUB_OUTPUT", &read(files.output.clone()).await?)
        .map_err(|e| e.to_string())?;
    // GITHUB_STATE: an action's pre/main steps hand values to its later steps (`STATE_*`).
    let state = parse_key_values("GITHUB_STATE", &read(files.state.clone()).await?)
        .map_err(|e| e.to_string())?;
    let path = parse_path_file(&read(files.path.clone()).await?);
    let summary = read(files.summary.clone()).await?;
    Ok(FileCommands {
        env,
        outputs,
        state,
        path,
        summary,
    })
}

/// What the output pump learned from workflow commands.
#[derive(Default)]
struct Pumped {
    masker: Masker,
    outputs: IndexMap<String, String>,
    /// `::save-state name=..::` (the deprecated stdout form of `GITHUB_STATE`).
    state: IndexMap<String, String>,
    annotations: Vec<Annotation>,
    /// A disabled command (`set-env`, `add-path`) was used: the step fails, as on GitHub.
    disabled: Option<String>,
}

/// Splits output into lines, acts on workflow commands, masks secrets, emits `log` events.
async fn pump_output(
    mut rx: mpsc::UnboundedReceiver<Output>,
    events: EventSink,
    job: String,
    step: usize,
    masker: Masker,
    debug: bool,
) -> Pumped {
    let mut pumped = Pumped {
        masker,
        outputs: IndexMap::new(),
        state: IndexMap::new(),
        annotations: Vec::new(),
        disabled: None,
    };
    let mut buffers: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let mut stop_token: Option<String> = None;
    let mut emit_line = |stream: Stream, raw: &[u8], pumped: &mut Pumped| {
        let text = String::from_utf8_lossy(raw);
        let line = text.strip_suffix('\r').unwrap_or(&text);
        if stream == Stream::Stdout {
            if let Some(token) = &stop_token {
                if line.trim() == format!("::{token}::") {
                    stop_token = None;
                }
            } else if let Some(cmd) = parse_workflow_command(line) {
                match cmd.name.as_str() {
                    "add-mask" => {
                        pumped.masker.add(&cmd.message);
                        return;
                    }
                    "set-output" | "save-state" => {
                        if cmd.name == "set-output"
                            && let Some(name) = cmd.properties.get("name")
                        {
                            pumped.outputs.insert(name.clone(), cmd.message.clone());
                        }
                        if cmd.name == "save-state"
                            && let Some(name) = cmd.properties.get("name")
                        {
                            pumped.state.insert(name.clone(), cmd.message.clone());
                        }
                        events.emit(EventKind::Log {
                            job: job.clone(),
                            step: Some(step),
                            stream: LogStream::Stderr,
                            line: format!(
                                "Warning: The `{}` command is deprecated and will be disabled \
                                 soon. Please upgrade to using Environment Files.",
                                cmd.name
                            ),
                        });
                        return;
                    }
                    "set-env" | "add-path" => {
                        let message = format!(
                            "The `{}` command is disabled. Please upgrade to using Environment \
                             Files or opt into unsecure command execution by setting the \
                             `ACTIONS_ALLOW_UNSECURE_COMMANDS` environment variable to `true`.",
                            cmd.name
                        );
                        pumped.disabled.get_or_insert(message);
                        return;
                    }
                    "debug" if !debug => return,
                    "error" | "warning" | "notice" => pumped.annotations.push(Annotation {
                        level: cmd.name.clone(),
                        message: pumped.masker.mask(&cmd.message),
                        file: cmd.properties.get("file").cloned(),
                        line: cmd.properties.get("line").and_then(|v| v.parse().ok()),
                        col: cmd.properties.get("col").and_then(|v| v.parse().ok()),
                        title: cmd.properties.get("title").cloned(),
                        step,
                    }),
                    "stop-commands" => stop_token = Some(cmd.message.clone()),
                    _ => {}
                }
            }
        }
        events.emit(EventKind::Log {
            job: job.clone(),
            step: Some(step),
            stream: match stream {
                Stream::Stdout => LogStream::Stdout,
                Stream::Stderr => LogStream::Stderr,
            },
            line: pumped.masker.mask(line),
        });
    };
    while let Some(chunk) = rx.recv().await {
        let index = usize::from(chunk.stream == Stream::Stderr);
        let buffer = &mut buffers[index];
        buffer.extend_from_slice(&chunk.data);
        while let Some(pos) = buffer.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=pos).collect();
            emit_line(chunk.stream, &line[..line.len() - 1], &mut pumped);
        }
    }
    for (index, stream) in [Stream::Stdout, Stream::Stderr].into_iter().enumerate() {
        if !buffers[index].is_empty() {
            let rest = std::mem::take(&mut buffers[index]);
            emit_line(stream, &rest, &mut pumped);
        }
    }
    pumped
}
