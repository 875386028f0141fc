//! Step-snapshot bookkeeping that does not need a VM: a snapshot that fails is reported and
//! never changes the run's result. (Snapshots that work are proved on real QEMU VMs in the
//! kiln-vm and kiln-cli tests.)

use std::sync::Arc;

use async_trait::async_trait;
use kiln_runner::event::{Conclusion, EventKind, EventSink};
use kiln_runner::executor::snapshots::{RunManifest, SnapshotConfig};
use kiln_runner::executor::{GitInfo, Isolation, RunContext, RunOptions, WorkflowExecutor};
use kiln_runner::session::{SessionConfig, SessionManager};
use kiln_vm::local::LocalProvider;
use kiln_vm::{Allocation, Vm, VmError, VmProvider, VmSpec};
use tokio_util::sync::CancellationToken;

/// The real local backend, except that it claims live snapshots: its VMs' `checkpoint` then
/// fails as the local backend's does, after every step, which is what is tested.
struct ClaimsCheckpoints(LocalProvider);

#[async_trait]
impl VmProvider for ClaimsCheckpoints {
    fn name(&self) -> &'static str {
        "local"
    }
    fn isolates(&self) -> bool {
        false
    }
    fn supports_checkpoints(&self) -> bool {
        true
    }
    async fn allocate(&self, spec: &VmSpec) -> Result<Allocation, VmError> {
        self.0.allocate(spec).await
    }
    async fn release(&self, vm: &dyn Vm) -> Result<(), VmError> {
        vm.release().await
    }
}

#[tokio::test]
async fn failed_snapshots_are_reported_and_never_change_the_result() {
    let runtime = tempfile::tempdir().unwrap();
    let data = tempfile::tempdir().unwrap();
    let workspace = tempfile::tempdir().unwrap();
    let provider = Arc::new(ClaimsCheckpoints(LocalProvider::new(
        runtime.path().to_owned(),
    )));
    let executor = WorkflowExecutor::new(SessionManager::new(provider, SessionConfig::default()))
        .with_snapshots(SnapshotConfig {
            root: data.path().to_owned(),
            keep: 2,
            max_bytes: u64::MAX,
        });
    for (yaml, result, failed) in [
        (
            "on: push\njobs:\n  b:\n    runs-on: x\n    steps:\n      - run: echo one\n      - run: echo two\n",
            Conclusion::Success,
            None,
        ),
        (
            "on: push\njobs:\n  b:\n    runs-on: x\n    steps:\n      - run: echo one\n      - run: exit 3\n      - run: echo never\n",
            Conclusion::Failure,
            Some(1),
        ),
    ] {
        let workflow = kiln_workflow::parse_workflow("t.yml", yaml).unwrap();
        let options = RunOptions {
            run_id: format!("r{}", uuid::Uuid::new_v4().simple()),
            isolation: Isolation::Workflow,
            spec: VmSpec::default(),
            vm_types: None,
            context: RunContext::new(
                "push",
                Some(workspace.path().to_owned()),
                GitInfo::discover(workspace.path()),
            ),
            only_jobs: Vec::new(),
            matrix_filter: Vec::new(),
        };
        let (sink, mut rx) = EventSink::channel(options.run_id.clone());
        let report = executor
            .execute(&workflow, &options, &sink, &CancellationToken::new())
            .await
            .expect("the run is carried out");
        drop(sink);
        assert_eq!(report.result, result);
        let mut reported = Vec::new();
        while let Some(event) = rx.recv().await {
            match event.kind {
                EventKind::SnapshotFailed { step, error, .. } => reported.push((step, error)),
                EventKind::SnapshotTaken { .. } => panic!("no snapshot can be taken here"),
                _ => {}
            }
        }
        // After each successful step, and the failure state.
        let expected: Vec<usize> = match failed {
            None => vec![0, 1],
            Some(step) => (0..=step).collect(),
        };
        assert_eq!(
            reported.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
            expected
        );
        assert!(
            reported[0].1.contains("not supported by the local backend"),
            "{}",
            reported[0].1
        );
        let manifest = RunManifest::load(data.path(), &options.run_id).unwrap();
        assert!(manifest.snapshots.is_empty());
        assert_eq!(manifest.failed.map(|f| f.step), failed);
        assert_eq!(manifest.result.as_deref(), Some(result.as_str()));
        assert_eq!(manifest.jobs.len(), 1);
    }
}
