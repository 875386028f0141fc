//! What kiln adds on top of running the commands itself, measured as ratios against a baseline
//! taken in the same run (these machines are shared and noisy, so absolute times mean little).
//!
//! `cargo bench -p kiln-runner --bench overhead` prints, for each measurement, the median of N
//! samples and its ratio to the baseline: spawning `true` with `std::process::Command`.
//!
//! - local allocate + release: a session's VM on the local backend;
//! - local exec `true`: one command through the `Vm` trait (process group, pipes, wait);
//! - 5-step workflow: a whole run through the executor (session, setup, file commands,
//!   events, cleanup, release) — divided by 5 it is the per-step overhead;
//! - with `KILN_BENCH_QEMU=1` and a built image: a cold QEMU VM (boot to agent ready) plus one
//!   command and release, and one command through the guest agent;
//! - with `KILN_BENCH_QEMU=1` too: a session's VM allocation three ways, p50 and p95, as ratios
//!   to the cold boot's median in the same run: cold boot, restore of the ready snapshot
//!   (`source: snapshot`), and a hand-out from a warm pool (`source: pool`, the pool refilled
//!   between samples as it is between sessions). `KILN_BENCH_ALLOC_N` sets the samples of each
//!   (default 7 with `--bench`, 2 without).
//! - with `KILN_BENCH_QEMU=1` too: the cost of `--snapshots steps`. The same 6-step workflow
//!   (3 trivial steps, 3 that write 32 MiB and hash it) runs with snapshots off and on, in VMs
//!   restored from the ready snapshot. Printed: each snapshot's time (p50, p95) and size, its
//!   ratio to the step's own run time (trivial and working steps apart), and the whole run's
//!   wall time on against off, per step.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_runner::event::EventSink;
use kiln_runner::executor::{GitInfo, Isolation, RunContext, RunOptions, WorkflowExecutor};
use kiln_runner::session::{OnLimit, SessionConfig, SessionManager};
use kiln_vm::local::LocalProvider;
use kiln_vm::{
    BackendConfig, BackendKind, Command, ExecRequest, VmProvider, VmSpec, select_backend,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const FIVE_STEPS: &str = r#"
name: bench
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - run: "true"
      - run: echo "x=1" >> "$GITHUB_ENV"
      - run: test "$x" = 1
      - id: o
        run: echo "v=2" >> "$GITHUB_OUTPUT"
      - run: test "${{ steps.o.outputs.v }}" = 2
"#;

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

fn report(name: &str, samples: Vec<Duration>, baseline: Duration) -> Duration {
    let m = median(samples);
    println!(
        "{name:<42} {:>10.3} ms   {:>8.1}x baseline",
        m.as_secs_f64() * 1e3,
        m.as_secs_f64() / baseline.as_secs_f64()
    );
    m
}

fn true_request() -> ExecRequest {
    ExecRequest {
        command: Command::Argv(vec!["true".into()]),
        env: Vec::new(),
        cwd: None,
        timeout: Some(Duration::from_secs(30)),
        user: kiln_vm::ExecUser::Runner,
    }
}

#[tokio::main]
async fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` passes nothing and wants it quick.
    let full = std::env::args().any(|a| a == "--bench");
    let n = if full { 50 } else { 3 };
    let runtime = tempfile::tempdir().expect("tempdir");

    let baseline = median(
        (0..n)
            .map(|_| {
                let t = Instant::now();
                let status = std::process::Command::new("true").status().expect("spawn");
                assert!(status.success());
                t.elapsed()
            })
            .collect(),
    );
    println!(
        "{:<42} {:>10.3} ms   (baseline)",
        "std::process::Command `true`",
        baseline.as_secs_f64() * 1e3
    );

    let local = LocalProvider::new(runtime.path().to_path_buf());
    let mut samples = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let allocation = local.allocate(&VmSpec::default()).await.expect("allocate");
        local.release(&*allocation.vm).await.expect("release");
        samples.push(t.elapsed());
    }
    report("local allocate + release", samples, baseline);

    let vm = local
        .allocate(&VmSpec::default())
        .await
        .expect("allocate")
        .vm;
    let mut samples = Vec::new();
    for _ in 0..n {
        let (tx, _rx) = mpsc::unbounded_channel();
        let t = Instant::now();
        let outcome = vm.exec(true_request(), tx).await.expect("exec");
        assert!(outcome.status.success());
        samples.push(t.elapsed());
    }
    report("local exec `true` through Vm", samples, baseline);
    vm.release().await.expect("release");

    let workflow = kiln_workflow::parse_workflow("bench.yml", FIVE_STEPS).expect("valid");
    let workspace = tempfile::tempdir().expect("tempdir");
    let provider: Arc<dyn VmProvider> = Arc::new(LocalProvider::new(runtime.path().to_path_buf()));
    let executor = WorkflowExecutor::new(SessionManager::new(
        provider,
        SessionConfig {
            max_sessions: 1,
            on_limit: OnLimit::Wait,
            ..SessionConfig::default()
        },
    ));
    let runs = if full { 20 } else { 2 };
    let mut samples = Vec::new();
    for i in 0..runs {
        let options = RunOptions {
            run_id: format!("bench-{i}"),
            isolation: Isolation::Workflow,
            spec: VmSpec::default(),
            vm_types: None,
            context: RunContext::new(
                "push",
                Some(workspace.path().to_path_buf()),
                GitInfo::discover(workspace.path()),
            ),
            only_jobs: Vec::new(),
            matrix_filter: Vec::new(),
        };
        let (sink, _rx) = EventSink::channel(options.run_id.clone());
        let t = Instant::now();
        let report = executor
            .execute(&workflow, &options, &sink, &CancellationToken::new())
            .await
            .expect("run");
        samples.push(t.elapsed());
        assert_eq!(report.result, kiln_runner::event::Conclusion::Success);
    }
    report("5-step workflow run, local backend", samples, baseline);

    if std::env::var_os("KILN_BENCH_QEMU").is_some() {
        qemu(
            baseline,
            runtime.path().to_path_buf(),
            if full { 3 } else { 1 },
        )
        .await;
    }
}

async fn qemu(baseline: Duration, runtime: PathBuf, n: usize) {
    let data = std::env::var_os("KILN_DATA_DIR").map_or_else(
        || PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".local/share/kiln"),
        PathBuf::from,
    );
    let selection =
        match select_backend(BackendKind::Qemu, &BackendConfig::new(runtime, data)).await {
            Ok(s) => s,
            Err(e) => {
                println!("qemu: skipped: {e}");
                return;
            }
        };
    let provider = selection.provider;
    let mut boots = Vec::new();
    let mut execs = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let allocation = provider.allocate(&VmSpec::default()).await.expect("boot");
        boots.push(t.elapsed());
        for _ in 0..5 {
            let (tx, _rx) = mpsc::unbounded_channel();
            let t = Instant::now();
            vm_exec(&*allocation.vm, tx).await;
            execs.push(t.elapsed());
        }
        provider.release(&*allocation.vm).await.expect("release");
    }
    report("qemu cold allocate (boot to agent ready)", boots, baseline);
    report("qemu exec `true` through the agent", execs, baseline);
    let n = std::env::var("KILN_BENCH_ALLOC_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if n > 1 { 7 } else { 2 });
    allocation_sources(provider.clone(), n).await;
    step_snapshots(provider, n).await;
}

const SIX_STEPS: &str = r#"
name: snapbench
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - run: "true"
      - run: head -c 33554432 /dev/urandom > blob1 && sha256sum blob1
      - run: "true"
      - run: head -c 33554432 /dev/urandom > blob2 && sha256sum blob2
      - run: "true"
      - run: head -c 33554432 /dev/urandom > blob3 && sha256sum blob3
"#;

/// `--snapshots steps` against `off` on the same workflow, in the same run.
async fn step_snapshots(backend: Arc<dyn VmProvider>, n: usize) {
    use kiln_runner::event::EventKind;
    use kiln_runner::executor::snapshots::SnapshotConfig;
    use kiln_runner::pool::{PoolSettings, PooledProvider};
    let workflow = kiln_workflow::parse_workflow("snapbench.yml", SIX_STEPS).expect("valid");
    let workspace = tempfile::tempdir().expect("tempdir");
    let records = tempfile::tempdir().expect("tempdir");
    let pooled: Arc<dyn VmProvider> = Arc::new(
        PooledProvider::new(
            backend,
            PoolSettings {
                snapshots: true,
                pools: Vec::new(),
            },
            None,
        )
        .expect("provider"),
    );
    let sessions = SessionManager::new(pooled, SessionConfig::default());
    let off = WorkflowExecutor::new(sessions.clone());
    let on = WorkflowExecutor::new(sessions).with_snapshots(SnapshotConfig {
        root: records.path().to_owned(),
        keep: 2,
        max_bytes: u64::MAX,
    });
    let mut walls: [Vec<Duration>; 2] = [Vec::new(), Vec::new()];
    // Per step kind (trivial, working): the steps' own times and the snapshots' times.
    let mut steps: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut snaps: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut sizes = Vec::new();
    for i in 0..n {
        for (which, executor) in [(0, &off), (1, &on)] {
            let options = RunOptions {
                run_id: format!("snapbench-{i}-{which}"),
                isolation: Isolation::Workflow,
                spec: VmSpec::default(),
                vm_types: None,
                context: RunContext::new(
                    "push",
                    Some(workspace.path().to_path_buf()),
                    GitInfo::discover(workspace.path()),
                ),
                only_jobs: Vec::new(),
                matrix_filter: Vec::new(),
            };
            let (sink, mut rx) = EventSink::channel(options.run_id.clone());
            let report = executor
                .execute(&workflow, &options, &sink, &CancellationToken::new())
                .await
                .expect("run");
            drop(sink);
            assert_eq!(report.result, kiln_runner::event::Conclusion::Success);
            let mut allocation = Duration::ZERO;
            while let Some(event) = rx.recv().await {
                match event.kind {
                    EventKind::SessionAllocated { allocation_ms, .. } => {
                        allocation = Duration::from_millis(allocation_ms);
                    }
                    EventKind::StepFinished {
                        step, duration_ms, ..
                    } if which == 1 => steps[step % 2].push(duration_ms as f64),
                    EventKind::SnapshotTaken {
                        step,
                        duration_ms,
                        size_bytes,
                        ..
                    } => {
                        snaps[step % 2].push(duration_ms as f64);
                        sizes.push(size_bytes);
                    }
                    EventKind::SnapshotFailed { error, .. } => panic!("snapshot failed: {error}"),
                    _ => {}
                }
            }
            walls[which].push(report.duration.saturating_sub(allocation));
        }
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let p95 = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[((0.95 * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1]
    };
    sizes.sort();
    println!("qemu --snapshots steps ({n} runs each way, 6 steps):");
    for (kind, name) in [
        (0, "trivial step (`true`)"),
        (1, "working step (32 MiB + sha256)"),
    ] {
        let (step, snap, snap95) = (
            med(&mut steps[kind]),
            med(&mut snaps[kind]),
            p95(&mut snaps[kind]),
        );
        println!(
            "  {name:<32} step p50 {step:>8.0} ms   snapshot p50 {snap:>6.0} ms p95 {snap95:>6.0} \
             ms   snapshot/step {:>5.2}x",
            snap / step.max(1.0)
        );
    }
    println!(
        "  snapshot size p50 {:.0} MiB (memory state + disk diff)",
        sizes[sizes.len() / 2] as f64 / f64::from(1 << 20)
    );
    let (off, on) = (median(walls[0].clone()), median(walls[1].clone()));
    println!(
        "  run without allocation p50: off {:.0} ms, steps {:.0} ms: {:.2}x, +{:.0} ms per step",
        off.as_secs_f64() * 1e3,
        on.as_secs_f64() * 1e3,
        on.as_secs_f64() / off.as_secs_f64(),
        (on.as_secs_f64() - off.as_secs_f64()) * 1e3 / 6.0
    );
}

/// The p-th percentile (nearest rank) of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Cold boot, snapshot restore and pool hand-out of the default spec, as the session manager
/// sees them (allocate through the provider), each released before the next sample.
async fn allocation_sources(backend: Arc<dyn VmProvider>, n: usize) {
    use kiln_runner::pool::{PoolConfig, PoolSettings, PooledProvider, Strategy};
    let spec = VmSpec::default();
    let one_shot = |snapshots| {
        PooledProvider::new(
            backend.clone(),
            PoolSettings {
                snapshots,
                pools: Vec::new(),
            },
            None,
        )
        .expect("provider")
    };
    let (cold, restore) = (one_shot(false), one_shot(true));
    let t = Instant::now();
    backend.ready_snapshot(&spec).await.expect("ready snapshot");
    println!(
        "qemu ready snapshot found or created in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let pooled = PooledProvider::new(
        backend.clone(),
        PoolSettings {
            snapshots: true,
            pools: vec![(
                spec.clone(),
                PoolConfig {
                    min_idle: 1,
                    max_total: 2,
                    strategy: Strategy::Fifo,
                },
            )],
        },
        None,
    )
    .expect("pool");
    let pool = pooled.pool(&spec.vm_type).expect("pool").clone();
    let mut rows: Vec<(&str, Vec<Duration>)> = Vec::new();
    for (name, provider) in [("cold", &cold), ("snapshot", &restore), ("pool", &pooled)] {
        let mut samples = Vec::new();
        for _ in 0..n {
            if name == "pool" {
                while pool.status().idle == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            let t = Instant::now();
            let allocation = provider.allocate(&spec).await.expect("allocate");
            samples.push(t.elapsed());
            assert_eq!(provider.source_of(allocation.vm.id()).as_str(), name);
            provider.release(&*allocation.vm).await.expect("release");
        }
        samples.sort();
        rows.push((name, samples));
    }
    pooled.shutdown().await;
    let cold_p50 = percentile(&rows[0].1, 0.5).as_secs_f64();
    println!(
        "qemu allocation by source ({n} samples each, {}):",
        if cfg!(debug_assertions) {
            "debug build"
        } else {
            "release build"
        }
    );
    for (name, samples) in &rows {
        let (p50, p95) = (percentile(samples, 0.5), percentile(samples, 0.95));
        println!(
            "  {name:<9} p50 {:>10.3} ms  p95 {:>10.3} ms   cold/{name} at p50: {:>9.1}x",
            p50.as_secs_f64() * 1e3,
            p95.as_secs_f64() * 1e3,
            cold_p50 / p50.as_secs_f64()
        );
    }
}

async fn vm_exec(vm: &dyn kiln_vm::Vm, tx: kiln_vm::OutputSink) {
    let outcome = vm.exec(true_request(), tx).await.expect("exec");
    assert!(outcome.status.success());
}
