//! The seed's verification tests and the executor's guarantees, on real execution: every step
//! really runs on the local backend. `Recording` only counts allocations (and, for the panic
//! test, panics on request); it delegates everything else to the real provider.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use kiln_runner::event::{Conclusion, EventKind, EventSink, RunEvent};
use kiln_runner::executor::{
    ExecError, GitInfo, Isolation, RunContext, RunOptions, RunReport, WorkflowExecutor,
};
use kiln_runner::session::{OnLimit, SessionConfig, SessionError, SessionManager};
use kiln_vm::local::LocalProvider;
use kiln_vm::{Allocation, ExecOutcome, ExecRequest, OutputSink, Vm, VmError, VmProvider, VmSpec};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Counts allocations and releases of the real local provider; optionally makes the VM's
/// `panic_on_exec`-th exec panic (to prove release on a panic inside the executor).
struct Recording {
    inner: LocalProvider,
    allocations: AtomicUsize,
    releases: AtomicUsize,
    vms: Mutex<Vec<String>>,
    panic_on_exec: Option<usize>,
}

impl Recording {
    fn new(runtime: &Path) -> Arc<Recording> {
        Arc::new(Recording {
            inner: LocalProvider::new(runtime.to_path_buf()),
            allocations: AtomicUsize::new(0),
            releases: AtomicUsize::new(0),
            vms: Mutex::new(Vec::new()),
            panic_on_exec: None,
        })
    }
}

#[async_trait]
impl VmProvider for Recording {
    fn name(&self) -> &'static str {
        "local"
    }

    fn isolates(&self) -> bool {
        false
    }

    async fn allocate(&self, spec: &VmSpec) -> Result<Allocation, VmError> {
        self.allocations.fetch_add(1, Ordering::SeqCst);
        let mut allocation = self.inner.allocate(spec).await?;
        self.vms
            .lock()
            .expect("lock")
            .push(allocation.vm.id().to_owned());
        if let Some(n) = self.panic_on_exec {
            allocation.vm = Arc::new(PanickyVm {
                inner: allocation.vm,
                execs: AtomicUsize::new(0),
                panic_on: n,
            });
        }
        Ok(allocation)
    }

    async fn release(&self, vm: &dyn Vm) -> Result<(), VmError> {
        self.releases.fetch_add(1, Ordering::SeqCst);
        vm.release().await
    }
}

/// A real local VM whose n-th exec panics inside the executor's call.
#[derive(Debug)]
struct PanickyVm {
    inner: Arc<dyn Vm>,
    execs: AtomicUsize,
    panic_on: usize,
}

#[async_trait]
impl Vm for PanickyVm {
    fn id(&self) -> &str {
        self.inner.id()
    }
    fn backend(&self) -> &'static str {
        "local"
    }
    fn work_root(&self) -> &str {
        self.inner.work_root()
    }
    async fn exec(&self, r: ExecRequest, o: OutputSink) -> Result<ExecOutcome, VmError> {
        let n = self.execs.fetch_add(1, Ordering::SeqCst) + 1;
        assert!(n != self.panic_on, "injected panic on exec {n}");
        self.inner.exec(r, o).await
    }
    async fn kill_all(&self) -> Result<(), VmError> {
        self.inner.kill_all().await
    }
    async fn copy_in(&self, h: &Path, g: &str) -> Result<(), VmError> {
        self.inner.copy_in(h, g).await
    }
    async fn copy_out(&self, g: &str, h: &Path) -> Result<(), VmError> {
        self.inner.copy_out(g, h).await
    }
    async fn write_file(&self, g: &str, c: &[u8]) -> Result<(), VmError> {
        self.inner.write_file(g, c).await
    }
    async fn read_file(&self, g: &str) -> Result<Vec<u8>, VmError> {
        self.inner.read_file(g).await
    }
    async fn release(&self) -> Result<(), VmError> {
        self.inner.release().await
    }
}

struct Harness {
    runtime: tempfile::TempDir,
    workspace: tempfile::TempDir,
    provider: Arc<Recording>,
    executor: WorkflowExecutor,
}

fn harness(max_sessions: usize, on_limit: OnLimit) -> Harness {
    harness_with(max_sessions, on_limit, None)
}

fn harness_with(max_sessions: usize, on_limit: OnLimit, panic_on_exec: Option<usize>) -> Harness {
    let runtime = tempfile::tempdir().expect("tempdir");
    let workspace = tempfile::tempdir().expect("tempdir");
    std::fs::write(workspace.path().join("README"), "hello from the repo\n").expect("write");
    let mut provider = Recording::new(runtime.path());
    Arc::get_mut(&mut provider).expect("unique").panic_on_exec = panic_on_exec;
    let sessions = SessionManager::new(
        provider.clone(),
        SessionConfig {
            max_sessions,
            on_limit,
            ..SessionConfig::default()
        },
    );
    Harness {
        runtime,
        workspace,
        provider,
        executor: WorkflowExecutor::new(sessions),
    }
}

impl Harness {
    fn options(&self, isolation: Isolation) -> RunOptions {
        let git = GitInfo::discover(self.workspace.path());
        RunOptions {
            run_id: format!("run-{}", uuid::Uuid::new_v4().simple()),
            isolation,
            spec: VmSpec::default(),
            vm_types: None,
            context: RunContext::new("push", Some(self.workspace.path().to_path_buf()), git),
            only_jobs: Vec::new(),
            matrix_filter: Vec::new(),
        }
    }

    async fn run(&self, yaml: &str) -> (Result<RunReport, ExecError>, Vec<RunEvent>) {
        self.run_with(yaml, Isolation::Workflow, &CancellationToken::new())
            .await
    }

    async fn run_with(
        &self,
        yaml: &str,
        isolation: Isolation,
        cancel: &CancellationToken,
    ) -> (Result<RunReport, ExecError>, Vec<RunEvent>) {
        let workflow = kiln_workflow::parse_workflow("test.yml", yaml).expect("valid workflow");
        let options = self.options(isolation);
        let (sink, mut rx) = EventSink::channel(options.run_id.clone());
        let result = self
            .executor
            .execute(&workflow, &options, &sink, cancel)
            .await;
        drop(sink);
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            events.push(e);
        }
        (result, events)
    }

    fn leftovers(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.runtime.path())
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
    }

    fn allocations(&self) -> usize {
        self.provider.allocations.load(Ordering::SeqCst)
    }
}

fn logs(events: &[RunEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::Log { line, .. } => Some(line.clone()),
            _ => None,
        })
        .collect()
}

fn step_vms(events: &[RunEvent]) -> Vec<String> {
    events
        .iter()
        .filter_map(|e| match &e.kind {
            EventKind::StepStarted { vm, .. } => Some(vm.clone()),
            _ => None,
        })
        .collect()
}

fn pid_alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "))
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

const FIVE_STEPS: &str = r#"
name: five
on: push
jobs:
  build:
    runs-on: ubuntu-latest
    steps:
      - run: echo "vm=$RUNNER_NAME" && echo one > "$RUNNER_TEMP/state"
      - run: echo "vm=$RUNNER_NAME" && cat "$RUNNER_TEMP/state" && echo two >> "$RUNNER_TEMP/state"
      - run: echo "vm=$RUNNER_NAME" && grep -q two "$RUNNER_TEMP/state" && echo three >> "$RUNNER_TEMP/state"
      - run: echo "vm=$RUNNER_NAME" && cat README
      - run: echo "vm=$RUNNER_NAME" && echo "lines=$(wc -l < "$RUNNER_TEMP/state")"
"#;

#[tokio::test]
async fn seed_one_workflow_with_five_steps_is_one_allocation_and_one_filesystem() {
    let h = harness(4, OnLimit::Fail);
    let (result, events) = h.run(FIVE_STEPS).await;
    let report = result.expect("run");
    assert_eq!(report.result, Conclusion::Success);
    assert_eq!(h.allocations(), 1);
    assert_eq!(report.vm_allocations, 1);
    let vms = step_vms(&events);
    assert_eq!(vms.len(), 5);
    assert!(vms.iter().all(|v| v == &vms[0]), "{vms:?}");
    let logs = logs(&events);
    let seen: Vec<&String> = logs.iter().filter(|l| l.starts_with("vm=")).collect();
    assert_eq!(seen.len(), 5);
    assert!(
        seen.iter().all(|l| **l == format!("vm=kiln-{}", vms[0])),
        "{seen:?}"
    );
    assert!(logs.contains(&"hello from the repo".to_owned()), "{logs:?}");
    assert!(logs.contains(&"lines=3".to_owned()), "{logs:?}");
    // The allocation precedes the first step; the release follows the last.
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match e.kind {
            EventKind::SessionAllocated { .. } => "alloc",
            EventKind::StepStarted { .. } => "step",
            EventKind::SessionReleased { .. } => "release",
            _ => "",
        })
        .filter(|k| !k.is_empty())
        .collect();
    assert_eq!(
        kinds,
        ["alloc", "step", "step", "step", "step", "step", "release"]
    );
    assert!(h.leftovers().is_empty(), "{:?}", h.leftovers());
}

#[tokio::test]
async fn seed_three_parallel_workflows_get_three_distinct_vms() {
    let h = Arc::new(harness(4, OnLimit::Fail));
    let yaml = r#"
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - run: echo "vm=$RUNNER_NAME"; sleep 0.3
      - run: echo "vm=$RUNNER_NAME"
"#;
    let runs = (0..3).map(|_| {
        let h = h.clone();
        tokio::spawn(async move { h.run(yaml).await })
    });
    let mut all_vms = Vec::new();
    for run in runs {
        let (result, events) = run.await.expect("join");
        assert_eq!(result.expect("run").result, Conclusion::Success);
        let vms = step_vms(&events);
        assert!(vms.iter().all(|v| v == &vms[0]));
        all_vms.push(vms[0].clone());
    }
    all_vms.sort();
    all_vms.dedup();
    assert_eq!(all_vms.len(), 3, "{all_vms:?}");
    assert_eq!(h.allocations(), 3);
    assert!(h.leftovers().is_empty());
}

#[tokio::test]
async fn seed_sequential_runs_get_fresh_sessions_and_leave_nothing_behind() {
    let h = harness(1, OnLimit::Fail);
    let yaml = r#"
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - run: test ! -e "$RUNNER_TEMP/marker" && touch "$RUNNER_TEMP/marker" && echo "vm=$RUNNER_NAME"
"#;
    let mut vms = Vec::new();
    for _ in 0..2 {
        let (result, events) = h.run(yaml).await;
        assert_eq!(result.expect("run").result, Conclusion::Success);
        vms.push(step_vms(&events)[0].clone());
        assert!(h.leftovers().is_empty(), "{:?}", h.leftovers());
    }
    assert_ne!(vms[0], vms[1]);
    assert_eq!(h.provider.releases.load(Ordering::SeqCst), 2);
}

fn gated_workflow(gate: &Path) -> String {
    format!(
        r#"
on: push
jobs:
  hold:
    runs-on: ubuntu-latest
    steps:
      - run: while [ ! -e "{}" ]; do sleep 0.05; done
"#,
        gate.display()
    )
}

#[tokio::test]
async fn seed_limit_of_two_fails_the_third_in_fail_mode() {
    let h = Arc::new(harness(2, OnLimit::Fail));
    let gate_dir = tempfile::tempdir().expect("tempdir");
    let gate = gate_dir.path().join("open");
    let yaml = gated_workflow(&gate);
    let held: Vec<_> = (0..2)
        .map(|_| {
            let (h, yaml) = (h.clone(), yaml.clone());
            tokio::spawn(async move { h.run(&yaml).await })
        })
        .collect();
    wait_until("two active sessions", || {
        h.executor.sessions().active_count() == 2
    })
    .await;
    let (third, _) = h.run(&yaml).await;
    let err = third.expect_err("third run must fail");
    assert!(
        matches!(&err, ExecError::Session { source, .. }
            if matches!(**source, SessionError::LimitReached { limit: 2 })),
        "{err:?}"
    );
    assert!(err.is_user_error());
    let message = format!("{}", std::error::Error::source(&err).expect("source"));
    assert!(message.contains("2 of 2"), "{message}");
    // The active sessions were not disturbed.
    std::fs::write(&gate, "").expect("open gate");
    for run in held {
        let (result, _) = run.await.expect("join");
        assert_eq!(result.expect("run").result, Conclusion::Success);
    }
    assert_eq!(h.allocations(), 2);
    assert!(h.leftovers().is_empty());
}

#[tokio::test]
async fn seed_limit_of_two_makes_the_third_wait_in_wait_mode() {
    let h = Arc::new(harness(2, OnLimit::Wait));
    let gate_dir = tempfile::tempdir().expect("tempdir");
    let gate = gate_dir.path().join("open");
    let yaml = gated_workflow(&gate);
    let max_active = Arc::new(AtomicUsize::new(0));
    let sampler = {
        let (h, max_active) = (h.clone(), max_active.clone());
        tokio::spawn(async move {
            loop {
                let n = h.executor.sessions().active_count();
                max_active.fetch_max(n, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    let runs: Vec<_> = (0..3)
        .map(|_| {
            let (h, yaml) = (h.clone(), yaml.clone());
            tokio::spawn(async move { h.run(&yaml).await })
        })
        .collect();
    wait_until("two active sessions", || {
        h.executor.sessions().active_count() == 2
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The third is still waiting: only two VMs were ever allocated.
    assert_eq!(h.allocations(), 2);
    std::fs::write(&gate, "").expect("open gate");
    for run in runs {
        let (result, _) = run.await.expect("join");
        assert_eq!(result.expect("run").result, Conclusion::Success);
    }
    sampler.abort();
    assert_eq!(h.allocations(), 3);
    assert!(max_active.load(Ordering::SeqCst) <= 2);
    assert!(h.leftovers().is_empty());
}

#[tokio::test]
async fn release_on_step_failure() {
    let h = harness(4, OnLimit::Fail);
    let (result, events) = h
        .run(
            r#"
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - run: exit 7
      - run: echo never
"#,
        )
        .await;
    let report = result.expect("run");
    assert_eq!(report.result, Conclusion::Failure);
    let steps = &report.jobs[0].steps;
    assert_eq!(steps[0].exit_code, Some(7));
    assert_eq!(steps[1].conclusion, Conclusion::Skipped);
    assert!(!logs(&events).contains(&"never".to_owned()));
    assert!(
        events
            .iter()
            .any(|e| matches!(e.kind, EventKind::SessionReleased { .. }))
    );
    assert!(h.leftovers().is_empty());
}

#[tokio::test]
async fn release_on_timeout_kills_the_step() {
    let h = harness(4, OnLimit::Fail);
    let (result, events) = h
        .run(
            r#"
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - timeout-minutes: 0.01
        run: echo "pid=$$"; sleep 30
"#,
        )
        .await;
    let report = result.expect("run");
    assert_eq!(report.result, Conclusion::Failure);
    let step = &report.jobs[0].steps[0];
    assert_eq!(step.exit_code, None);
    assert!(
        step.error.as_deref().unwrap_or("").contains("time limit"),
        "{step:?}"
    );
    assert!(step.duration < Duration::from_secs(10));
    let pid: i32 = logs(&events)
        .iter()
        .find_map(|l| l.strip_prefix("pid=").map(|p| p.parse().expect("pid")))
        .expect("pid line");
    wait_until("the step's shell to die", || !pid_alive(pid)).await;
    assert!(h.leftovers().is_empty());
}

#[tokio::test]
async fn release_on_cancellation_runs_always_steps() {
    let h = Arc::new(harness(4, OnLimit::Fail));
    let cancel = CancellationToken::new();
    let yaml = r#"
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - run: echo started; sleep 30
      - run: echo skipped-after-cancel
      - if: always()
        run: echo cleanup-ran
"#;
    let task = {
        let (h, cancel) = (h.clone(), cancel.clone());
        tokio::spawn(async move { h.run_with(yaml, Isolation::Workflow, &cancel).await })
    };
    wait_until("a session", || h.executor.sessions().active_count() == 1).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cancel.cancel();
    let (result, events) = tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("cancellation is prompt")
        .expect("join");
    let report = result.expect("run");
    assert_eq!(report.result, Conclusion::Cancelled);
    let logs = logs(&events);
    assert!(logs.contains(&"cleanup-ran".to_owned()), "{logs:?}");
    assert!(!logs.contains(&"skipped-after-cancel".to_owned()));
    assert_eq!(report.jobs[0].steps[0].outcome, Conclusion::Cancelled);
    assert!(h.leftovers().is_empty());
}

#[tokio::test]
async fn release_on_a_panic_inside_the_executor() {
    // Exec 1 prepares the runner dirs; exec 2 is the first step: it panics.
    let h = Arc::new(harness_with(4, OnLimit::Fail, Some(3)));
    let task = {
        let h = h.clone();
        tokio::spawn(async move {
            h.run(
                r#"
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - run: sleep 60 & echo first
      - run: echo second
"#,
            )
            .await
        })
    };
    let joined = task.await;
    assert!(joined.expect_err("the run panicked").is_panic());
    wait_until("the VM and its session to be released", || {
        h.provider.releases.load(Ordering::SeqCst) == 1
            && h.leftovers().is_empty()
            && h.executor.sessions().active_count() == 0
    })
    .await;
}

#[tokio::test]
async fn file_commands_env_output_path_summary() {
    let h = harness(4, OnLimit::Fail);
    let (result, events) = h
        .run(
            r#"
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    outputs:
      greeting: ${{ steps.out.outputs.greeting }}
    steps:
      - run: |
          echo "PLAIN=value with = sign" >> "$GITHUB_ENV"
          printf 'MULTI<<EOF\nline 1\nline 2\nEOF\n' >> "$GITHUB_ENV"
          mkdir -p "$RUNNER_TEMP/bin"
          printf '#!/bin/sh\necho tool-ran\n' > "$RUNNER_TEMP/bin/mytool"
          chmod +x "$RUNNER_TEMP/bin/mytool"
          echo "$RUNNER_TEMP/bin" >> "$GITHUB_PATH"
          echo '### Hello summary' >> "$GITHUB_STEP_SUMMARY"
          echo "k=v" >> "$GITHUB_STATE"
      - id: out
        run: |
          echo "plain=$PLAIN"
          echo "multi=$(echo "$MULTI" | tr '\n' '|')"
          mytool
          echo "greeting=hi there" >> "$GITHUB_OUTPUT"
          test ! -s "$GITHUB_ENV" && echo fresh-file
      - run: echo "from-steps=${{ steps.out.outputs.greeting }}"
"#,
        )
        .await;
    let report = result.expect("run");
    assert_eq!(report.result, Conclusion::Success, "{report:#?}");
    let logs = logs(&events);
    for expected in [
        "plain=value with = sign",
        "multi=line 1|line 2|",
        "tool-ran",
        "fresh-file",
        "from-steps=hi there",
    ] {
        assert!(
            logs.contains(&expected.to_owned()),
            "missing {expected}: {logs:?}"
        );
    }
    assert_eq!(report.jobs[0].outputs["greeting"], "hi there");
    assert!(report.jobs[0].summary.contains("### Hello summary"));
}

#[tokio::test]
async fn malformed_file_command_fails_the_step() {
    let h = harness(4, OnLimit::Fail);
    let (result, _) = h
        .run(
            r#"
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - run: printf 'X<<END\nno end\n' >> "$GITHUB_ENV"
"#,
        )
        .await;
    let report = result.expect("run");
    let step = &report.jobs[0].steps[0];
    assert_eq!(step.outcome, Conclusion::Failure);
    assert!(
        step.error
            .as_deref()
            .unwrap_or("")
            .contains("no closing delimiter")
    );
}

#[tokio::test]
async fn status_functions_and_continue_on_error() {
    let h = harness(4, OnLimit::Fail);
    let (result, events) = h
        .run(
            r#"
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - id: soft
        continue-on-error: true
        run: exit 3
      - if: steps.soft.outcome == 'failure' && steps.soft.conclusion == 'success'
        run: echo soft-failure-seen
      - run: echo still-success
      - run: exit 1
      - run: echo not-after-failure
      - if: failure()
        run: echo on-failure
      - if: success()
        run: echo not-on-success
      - if: always()
        run: echo always
      - if: cancelled()
        run: echo not-cancelled
"#,
        )
        .await;
    let report = result.expect("run");
    assert_eq!(report.result, Conclusion::Failure);
    let logs = logs(&events);
    assert_eq!(
        logs.iter()
            .filter(|l| !l.starts_with("Error:"))
            .cloned()
            .collect::<Vec<_>>(),
        ["soft-failure-seen", "still-success", "on-failure", "always"]
    );
    let steps = &report.jobs[0].steps;
    assert_eq!(steps[0].outcome, Conclusion::Failure);
    assert_eq!(steps[0].conclusion, Conclusion::Success);
}

#[tokio::test]
async fn needs_order_outputs_and_skips() {
    let h = harness(4, OnLimit::Fail);
    let (result, events) = h
        .run(
            r#"
on: push
jobs:
  last:
    needs: [middle, first]
    runs-on: ubuntu-latest
    steps:
      - run: echo "last got ${{ needs.first.outputs.v }}"
  middle:
    needs: first
    runs-on: ubuntu-latest
    steps:
      - run: echo middle; exit 1
  first:
    runs-on: ubuntu-latest
    outputs:
      v: ${{ steps.s.outputs.v }}
    steps:
      - id: s
        run: echo "v=42" >> "$GITHUB_OUTPUT"
  after-failure:
    needs: middle
    if: failure()
    runs-on: ubuntu-latest
    steps:
      - run: echo "middle was ${{ needs.middle.result }}"
"#,
        )
        .await;
    let report = result.expect("run");
    let order: Vec<(&str, Conclusion)> = report
        .jobs
        .iter()
        .map(|j| (j.id.as_str(), j.result))
        .collect();
    assert_eq!(
        order,
        [
            ("first", Conclusion::Success),
            ("middle", Conclusion::Failure),
            ("last", Conclusion::Skipped),
            ("after-failure", Conclusion::Success),
        ]
    );
    let logs = logs(&events);
    assert!(logs.contains(&"middle was failure".to_owned()), "{logs:?}");
    assert!(!logs.iter().any(|l| l.starts_with("last got")));
    assert_eq!(h.allocations(), 1);
}

#[tokio::test]
async fn job_isolation_gives_each_job_its_own_vm() {
    let h = harness(4, OnLimit::Wait);
    let (result, events) = h
        .run_with(
            r#"
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - run: echo a
  b:
    runs-on: ubuntu-latest
    strategy:
      matrix:
        n: [1, 2]
    steps:
      - run: echo b${{ matrix.n }}
"#,
            Isolation::Job,
            &CancellationToken::new(),
        )
        .await;
    let report = result.expect("run");
    assert_eq!(report.result, Conclusion::Success);
    assert_eq!(report.vm_allocations, 3);
    let mut vms = step_vms(&events);
    vms.sort();
    vms.dedup();
    assert_eq!(vms.len(), 3);
    assert!(h.leftovers().is_empty());
}

#[tokio::test]
async fn secrets_are_masked_in_logs() {
    let h = harness(4, OnLimit::Fail);
    let workflow = kiln_workflow::parse_workflow(
        "test.yml",
        r#"
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - run: |
          echo "token is ${{ secrets.TOKEN }}"
          echo "::add-mask::runtime-value"
          echo "later runtime-value"
"#,
    )
    .expect("valid");
    let mut options = h.options(Isolation::Workflow);
    options
        .context
        .secrets
        .insert("TOKEN".into(), "s3cr3t-value".into());
    let (sink, mut rx) = EventSink::channel(options.run_id.clone());
    let report = h
        .executor
        .execute(&workflow, &options, &sink, &CancellationToken::new())
        .await
        .expect("run");
    drop(sink);
    assert_eq!(report.result, Conclusion::Success);
    let mut events = Vec::new();
    while let Some(e) = rx.recv().await {
        events.push(e);
    }
    let logs = logs(&events);
    assert_eq!(logs, ["token is ***", "later ***"]);
}

#[tokio::test]
async fn unsupported_features_fail_before_any_vm_is_allocated() {
    let h = harness(4, OnLimit::Fail);
    let (result, _) = h
        .run(
            r#"
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - uses: docker://alpine:3
"#,
        )
        .await;
    let err = result.expect_err("unsupported");
    assert!(err.is_user_error());
    let text = err.to_string();
    assert!(text.contains("test.yml:7:"), "{text}");
    assert!(text.contains("docker://alpine:3"), "{text}");
    assert_eq!(h.allocations(), 0);
}

#[tokio::test]
async fn json_event_fields_match_the_contract() {
    let h = harness(4, OnLimit::Fail);
    let (result, events) = h.run(FIVE_STEPS).await;
    result.expect("run");
    let required: &[(&str, &[&str])] = &[
        (
            "session_allocated",
            &["session", "vm", "backend", "allocation_ms", "workflow"],
        ),
        ("session_released", &["session", "vm"]),
        ("job_started", &["job", "name"]),
        ("job_finished", &["job", "name", "result", "outputs"]),
        ("step_started", &["job", "step", "id", "name", "vm"]),
        (
            "step_finished",
            &[
                "job",
                "step",
                "id",
                "name",
                "vm",
                "outcome",
                "conclusion",
                "exit_code",
                "outputs",
                "duration_ms",
            ],
        ),
        ("log", &["job", "step", "stream", "line"]),
        (
            "run_finished",
            &["workflow", "result", "duration_ms", "vm_allocations"],
        ),
    ];
    let json: Vec<serde_json::Value> = events
        .iter()
        .map(|e| serde_json::to_value(e).expect("serialize"))
        .collect();
    for (kind, fields) in required {
        let line = json
            .iter()
            .find(|j| j["type"] == *kind)
            .unwrap_or_else(|| panic!("no {kind} event"));
        for field in ["type", "ts", "run"].iter().chain(fields.iter()) {
            assert!(line.get(field).is_some(), "{kind} lacks {field}: {line}");
        }
        let ts = line["ts"].as_str().expect("ts string");
        assert!(ts.parse::<jiff::Timestamp>().is_ok(), "{ts}");
    }
    let finished = json
        .iter()
        .find(|j| j["type"] == "run_finished")
        .expect("run_finished");
    assert_eq!(finished["vm_allocations"], 1);
    assert_eq!(finished["result"], "success");
}

#[tokio::test]
async fn events_go_to_one_receiver_for_several_runs() {
    let h = harness(4, OnLimit::Fail);
    let (tx, mut rx) = mpsc::unbounded_channel();
    let workflow = kiln_workflow::parse_workflow("test.yml", FIVE_STEPS).expect("valid");
    for _ in 0..2 {
        let options = h.options(Isolation::Workflow);
        let sink = EventSink::new(options.run_id.clone(), tx.clone());
        h.executor
            .execute(&workflow, &options, &sink, &CancellationToken::new())
            .await
            .expect("run");
    }
    drop(tx);
    let mut runs = std::collections::HashSet::new();
    while let Some(e) = rx.recv().await {
        runs.insert(e.run);
    }
    assert_eq!(runs.len(), 2);
}

#[tokio::test]
async fn hash_files_hashes_the_workspace_as_the_step_sees_it() {
    let h = harness(4, OnLimit::Fail);
    let (result, events) = h
        .run(
            r#"
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - run: echo "before=${{ hashFiles('**/README') }}"
      - run: echo changed > README
      - run: echo "after=${{ hashFiles('**/README') }}"
      - run: echo "none=${{ hashFiles('*.nothing') }}"
"#,
        )
        .await;
    assert_eq!(result.expect("run").result, Conclusion::Success);
    let digest = |content: &[u8]| {
        use sha2::{Digest, Sha256};
        Sha256::digest(Sha256::digest(content))
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    let logs = logs(&events);
    assert!(
        logs.contains(&format!("before={}", digest(b"hello from the repo\n"))),
        "{logs:?}"
    );
    assert!(
        logs.contains(&format!("after={}", digest(b"changed\n"))),
        "{logs:?}"
    );
    assert!(logs.contains(&"none=".to_owned()), "{logs:?}");
}

#[tokio::test]
async fn env_written_as_one_expression() {
    let h = harness(4, OnLimit::Fail);
    let (result, events) = h
        .run(
            r#"
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    env: ${{ fromJSON('{"FROM_JOB":"j","N":3}') }}
    steps:
      - env: ${{ fromJSON('{"FROM_STEP":"s"}') }}
        run: echo "$FROM_JOB $N $FROM_STEP"
"#,
        )
        .await;
    assert_eq!(result.expect("run").result, Conclusion::Success);
    assert_eq!(logs(&events), ["j 3 s"]);
}

#[tokio::test]
async fn max_parallel_bounds_concurrent_legs_and_fail_fast_cancels_the_rest() {
    let h = harness(4, OnLimit::Wait);
    let log_dir = tempfile::tempdir().expect("tempdir");
    let log = log_dir.path().join("order");
    let yaml = format!(
        r#"
on: push
jobs:
  m:
    runs-on: ubuntu-latest
    strategy:
      max-parallel: 1
      matrix:
        n: [1, 2, 3]
    steps:
      - run: echo "start ${{{{ matrix.n }}}}" >> {log}; sleep 0.2; echo "end ${{{{ matrix.n }}}}" >> {log}
"#,
        log = log.display()
    );
    let (result, _) = h
        .run_with(&yaml, Isolation::Job, &CancellationToken::new())
        .await;
    assert_eq!(result.expect("run").result, Conclusion::Success);
    let order = std::fs::read_to_string(&log).expect("log");
    let lines: Vec<&str> = order.lines().collect();
    assert_eq!(lines.len(), 6, "{order}");
    for pair in lines.chunks(2) {
        assert!(
            pair[0].starts_with("start") && pair[1].starts_with("end"),
            "{order}"
        );
        assert_eq!(pair[0][6..], pair[1][4..], "legs overlapped: {order}");
    }

    let failing = r#"
on: push
jobs:
  m:
    runs-on: ubuntu-latest
    strategy:
      max-parallel: 1
      matrix:
        n: [1, 2, 3]
    steps:
      - run: exit 1
"#;
    let (result, _) = h
        .run_with(failing, Isolation::Job, &CancellationToken::new())
        .await;
    let report = result.expect("run");
    let results: Vec<Conclusion> = report.jobs.iter().map(|j| j.result).collect();
    assert_eq!(
        results,
        [
            Conclusion::Failure,
            Conclusion::Cancelled,
            Conclusion::Cancelled
        ]
    );
    assert_eq!(report.vm_allocations, 1, "cancelled legs get no VM");
}
