//! The seed's invariants on real VMs: whole workflow runs through the executor on the QEMU
//! backend (TCG here, KVM where it works). A handful of boots in all.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_runner::event::{Conclusion, EventKind, EventSink, RunEvent};
use kiln_runner::executor::{GitInfo, Isolation, RunContext, RunOptions, WorkflowExecutor};
use kiln_runner::session::{OnLimit, SessionConfig, SessionManager};
use kiln_runner::vm_types::{VmType, VmTypes};
use kiln_vm::{BackendConfig, BackendKind, VmSpec, select_backend};
use tokio_util::sync::CancellationToken;

struct Fixture {
    runtime: tempfile::TempDir,
    workspace: tempfile::TempDir,
    executor: WorkflowExecutor,
}

async fn fixture() -> Option<Fixture> {
    if kiln_test_support::skip_vm_tests() {
        return None;
    }
    let image = tokio::task::spawn_blocking(kiln_test_support::default_image)
        .await
        .expect("image builder");
    let runtime = tempfile::tempdir().expect("tempdir");
    let workspace = tempfile::tempdir().expect("tempdir");
    std::fs::write(workspace.path().join("README"), "from the host\n").expect("write");
    let data_dir = image
        .dir
        .parent()
        .and_then(Path::parent)
        .expect("images live in <data>/images/<name>")
        .to_path_buf();
    let config = BackendConfig::new(runtime.path().to_path_buf(), data_dir);
    let selection = select_backend(BackendKind::Qemu, &config)
        .await
        .expect("the QEMU backend is usable");
    let sessions = SessionManager::new(
        selection.provider,
        SessionConfig {
            max_sessions: 2,
            on_limit: OnLimit::Wait,
            ..SessionConfig::default()
        },
    );
    Some(Fixture {
        runtime,
        workspace,
        executor: WorkflowExecutor::new(sessions),
    })
}

impl Fixture {
    async fn run(&self, yaml: &str) -> (Conclusion, Vec<RunEvent>, usize) {
        self.run_with(yaml, Isolation::Workflow, None).await
    }

    async fn run_with(
        &self,
        yaml: &str,
        isolation: Isolation,
        vm_types: Option<Arc<VmTypes>>,
    ) -> (Conclusion, Vec<RunEvent>, usize) {
        let workflow = kiln_workflow::parse_workflow("vm.yml", yaml).expect("valid");
        let options = RunOptions {
            run_id: format!("vm-{}", uuid::Uuid::new_v4().simple()),
            isolation,
            spec: VmSpec {
                memory_mib: 512,
                vcpus: 1,
                ..VmSpec::default()
            },
            vm_types,
            context: RunContext::new(
                "push",
                Some(self.workspace.path().to_path_buf()),
                GitInfo::discover(self.workspace.path()),
            ),
            only_jobs: Vec::new(),
            matrix_filter: Vec::new(),
        };
        let (sink, mut rx) = EventSink::channel(options.run_id.clone());
        let report = self
            .executor
            .execute(&workflow, &options, &sink, &CancellationToken::new())
            .await
            .expect("run");
        drop(sink);
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            events.push(e);
        }
        (report.result, events, report.vm_allocations)
    }

    fn leftovers(&self) -> Vec<std::path::PathBuf> {
        std::fs::read_dir(self.runtime.path())
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default()
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

fn qemu_processes_for(vm: &str) -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    std::fs::read(e.path().join("cmdline"))
                        .is_ok_and(|c| String::from_utf8_lossy(&c).contains(vm))
                })
                .count()
        })
        .unwrap_or(0)
}

const STEPS: &str = r#"
name: in-a-vm
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - run: echo "boot=$(cat /proc/sys/kernel/random/boot_id)"; echo "kernel=$(uname -r)"; echo one > "$RUNNER_TEMP/f"
      - run: echo "boot=$(cat /proc/sys/kernel/random/boot_id)"; cat "$RUNNER_TEMP/f"; cat README
      - run: echo "hash=${{ hashFiles('README') }}"
  b:
    needs: a
    runs-on: ubuntu-latest
    steps:
      - run: echo "boot=$(cat /proc/sys/kernel/random/boot_id)"; test -f "$RUNNER_TEMP/f" && echo shared
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_runs_every_step_in_one_real_vm_and_releases_it() {
    let Some(f) = fixture().await else { return };
    let (result, events, allocations) = f.run(STEPS).await;
    assert_eq!(result, Conclusion::Success, "{:?}", logs(&events));
    assert_eq!(allocations, 1);
    let logs = logs(&events);
    let boots: Vec<&String> = logs.iter().filter(|l| l.starts_with("boot=")).collect();
    assert_eq!(boots.len(), 3, "{logs:?}");
    let expected = {
        use sha2::{Digest, Sha256};
        let digest = Sha256::digest(Sha256::digest(b"from the host\n"));
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    assert!(
        logs.contains(&format!("hash={expected}")),
        "hashFiles in the guest: {logs:?}"
    );
    assert!(
        boots.iter().all(|b| *b == boots[0]),
        "one VM for all jobs: {boots:?}"
    );
    let host_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").expect("boot id");
    assert_ne!(
        boots[0].trim_start_matches("boot="),
        host_boot.trim(),
        "a real guest"
    );
    let kernel = logs
        .iter()
        .find(|l| l.starts_with("kernel="))
        .expect("kernel");
    assert!(
        kernel.contains("cloud-amd64"),
        "the guest's own kernel: {kernel}"
    );
    for expected in ["one", "from the host", "shared"] {
        assert!(
            logs.contains(&expected.to_owned()),
            "missing {expected}: {logs:?}"
        );
    }
    let vm = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::SessionAllocated { vm, backend, .. } => {
                assert_eq!(backend, "qemu");
                Some(vm.clone())
            }
            _ => None,
        })
        .expect("allocation");
    kiln_test_support::wait_until("the QEMU process to exit", Duration::from_secs(10), || {
        qemu_processes_for(&vm) == 0
    });
    assert!(f.leftovers().is_empty(), "{:?}", f.leftovers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_parallel_workflows_get_two_distinct_vms() {
    let Some(f) = fixture().await else { return };
    let f = Arc::new(f);
    let yaml = r#"
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - run: echo "boot=$(cat /proc/sys/kernel/random/boot_id)"
"#;
    let runs: Vec<_> = (0..2)
        .map(|_| {
            let f = f.clone();
            tokio::spawn(async move { f.run(yaml).await })
        })
        .collect();
    let mut boots = Vec::new();
    for run in runs {
        let (result, events, allocations) = run.await.expect("join");
        assert_eq!(result, Conclusion::Success);
        assert_eq!(allocations, 1);
        boots.extend(logs(&events).into_iter().filter(|l| l.starts_with("boot=")));
    }
    assert_eq!(boots.len(), 2);
    assert_ne!(boots[0], boots[1]);
    assert!(f.leftovers().is_empty(), "{:?}", f.leftovers());
}

fn vm_type(name: &str, labels: &[&str], vcpus: u32, memory_mib: u32) -> VmType {
    VmType {
        spec: VmSpec {
            vm_type: name.to_owned(),
            vcpus,
            memory_mib,
            ..VmSpec::default()
        },
        labels: labels.iter().map(|l| (*l).to_owned()).collect(),
        timeout: None,
    }
}

/// `runs-on` picks each job's VM type: the guest of each job sees its type's vCPUs and memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_job_gets_the_vcpus_and_memory_of_the_vm_type_its_runs_on_selects() {
    let Some(fx) = fixture().await else {
        return;
    };
    let types = VmTypes::new(vec![
        vm_type("default", &[], 1, 512),
        vm_type("big", &["2-core"], 2, 1024),
    ]);
    let yaml = r#"
on: push
jobs:
  small:
    runs-on: ubuntu-latest
    steps:
      - run: echo "small nproc=$(nproc) mem=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
  large:
    runs-on: [self-hosted, linux, 2-core]
    steps:
      - run: echo "large nproc=$(nproc) mem=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
"#;
    let (result, events, allocations) = fx
        .run_with(yaml, Isolation::Job, Some(Arc::new(types)))
        .await;
    let lines = logs(&events);
    assert_eq!(result, Conclusion::Success, "{lines:?}");
    assert_eq!(allocations, 2);
    let seen = |job: &str| -> (u32, u64) {
        let line = lines
            .iter()
            .find_map(|l| l.strip_prefix(&format!("{job} ")))
            .unwrap_or_else(|| panic!("no line of {job}: {lines:?}"));
        let field = |k: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or_else(|| panic!("{k} in {line}"))
                .to_owned()
        };
        (
            field("nproc=").parse().expect("nproc"),
            field("mem=").parse().expect("MemTotal kB"),
        )
    };
    let in_range = |mem_kib: u64, mib: u64| (mib * 1024 * 8 / 10..=mib * 1024).contains(&mem_kib);
    let (nproc, mem) = seen("small");
    assert_eq!(nproc, 1);
    assert!(in_range(mem, 512), "small: MemTotal {mem} kB");
    let (nproc, mem) = seen("large");
    assert_eq!(nproc, 2);
    assert!(in_range(mem, 1024), "large: MemTotal {mem} kB");
    assert!(fx.leftovers().is_empty(), "{:?}", fx.leftovers());
}

/// A run over its VM type's time limit is cancelled: the running step is killed, `always()`
/// steps still run, and the session is released.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_over_its_time_limit_is_cancelled_and_its_vm_released() {
    let Some(fx) = fixture().await else {
        return;
    };
    let mut limited = vm_type("default", &[], 1, 512);
    limited.timeout = Some(Duration::from_secs(60));
    let yaml = r#"
on: push
jobs:
  slow:
    runs-on: ubuntu-latest
    steps:
      - run: echo step-started; sleep 900; echo step-finished
      - if: always()
        run: echo cleanup-ran
"#;
    let (result, events, _) = fx
        .run_with(
            yaml,
            Isolation::Workflow,
            Some(Arc::new(VmTypes::new(vec![limited]))),
        )
        .await;
    let lines = logs(&events);
    assert_eq!(result, Conclusion::Cancelled, "{lines:?}");
    assert!(
        lines
            .iter()
            .any(|l| l.contains("over its time limit of 1 min")),
        "{lines:?}"
    );
    assert!(!lines.iter().any(|l| l == "step-finished"), "{lines:?}");
    assert!(lines.iter().any(|l| l == "cleanup-ran"), "{lines:?}");
    let vm = events
        .iter()
        .find_map(|e| match &e.kind {
            EventKind::SessionReleased { vm, .. } => Some(vm.clone()),
            _ => None,
        })
        .expect("the session is released");
    assert_eq!(qemu_processes_for(&vm), 0, "QEMU of {vm} still runs");
    assert!(fx.leftovers().is_empty(), "{:?}", fx.leftovers());
}

/// Steps run as `runner` with passwordless sudo, like GitHub's hosted runners, and can write
/// everything kiln laid out for them: the workspace and the file-command files.
const AS_RUNNER: &str = r#"
name: as-runner
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    outputs:
      who: ${{ steps.who.outputs.user }}
    steps:
      - id: who
        run: |
          echo "whoami=$(id -un) sudo=$(sudo -n id -u) home-owner=$(stat -c %U "$HOME")"
          echo "user=$(id -un)" >> "$GITHUB_OUTPUT"
          echo "FROM_ENV=set-by-step" >> "$GITHUB_ENV"
          echo "/opt/from-path" >> "$GITHUB_PATH"
          echo "summary line" >> "$GITHUB_STEP_SUMMARY"
          echo "made in the guest" > new-file
          echo "appended" >> README
          mkdir -p sub/dir && touch sub/dir/x "$RUNNER_TEMP/t" "$RUNNER_TOOL_CACHE/c"
      - run: |
          echo "env=$FROM_ENV output=${{ steps.who.outputs.user }} path=${PATH%%:*}"
          cat new-file
          echo "owner=$(stat -c %U "$GITHUB_WORKSPACE") pwd=$( [ "$(pwd)" = "$GITHUB_WORKSPACE" ] && echo workspace)"
          tail -1 README
  b:
    needs: a
    runs-on: ubuntu-latest
    steps:
      - run: echo "job-output=${{ needs.a.outputs.who }}"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_run_as_runner_with_sudo_and_write_the_workspace_and_file_commands() {
    let Some(f) = fixture().await else { return };
    let (result, events, _) = f.run(AS_RUNNER).await;
    let logs = logs(&events);
    assert_eq!(result, Conclusion::Success, "{logs:?}");
    for expected in [
        "whoami=runner sudo=0 home-owner=runner",
        "env=set-by-step output=runner path=/opt/from-path",
        "made in the guest",
        "owner=runner pwd=workspace",
        "appended",
        "job-output=runner",
    ] {
        assert!(
            logs.iter().any(|l| l == expected),
            "missing {expected:?}: {logs:?}"
        );
    }
    assert!(f.leftovers().is_empty(), "{:?}", f.leftovers());
}
