//! Snapshots and warm pools on real QEMU VMs (TCG here): restore, isolation between restored
//! VMs, pool allocation and refill, strategies, metrics. Boots are few: one ready snapshot
//! per spec, cached with the image, and every other VM is a restore.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kiln_vm::{
    BackendConfig, BackendKind, Command, ExecRequest, Vm, VmProvider, VmSpec, select_backend,
};

/// The spec every test here uses (small, so restores are fast and several VMs fit).
pub fn spec() -> VmSpec {
    VmSpec {
        memory_mib: 512,
        vcpus: 1,
        ..VmSpec::default()
    }
}

/// The QEMU provider over the cached default image, or `None` when VM tests are opted out.
pub async fn provider() -> Option<(Arc<dyn VmProvider>, tempfile::TempDir)> {
    if kiln_test_support::skip_vm_tests() {
        return None;
    }
    let image = tokio::task::spawn_blocking(kiln_test_support::default_image)
        .await
        .expect("image builder");
    let runtime = tempfile::tempdir().expect("tempdir");
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
    Some((selection.provider, runtime))
}

/// Runs a shell command in `vm` and returns its stdout (asserting success).
pub async fn sh(vm: &dyn Vm, script: &str) -> String {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let outcome = vm
        .exec(
            ExecRequest {
                command: Command::Argv(vec!["/bin/sh".into(), "-c".into(), script.into()]),
                env: Vec::new(),
                cwd: None,
                timeout: Some(Duration::from_secs(60)),
                user: kiln_vm::ExecUser::Runner,
            },
            tx,
        )
        .await
        .expect("exec");
    let mut out = Vec::new();
    while let Ok(chunk) = rx.try_recv() {
        if chunk.stream == kiln_vm::Stream::Stdout {
            out.extend_from_slice(&chunk.data);
        }
    }
    assert!(
        outcome.status.success(),
        "`{script}` failed: {}",
        outcome.status
    );
    String::from_utf8_lossy(&out).trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restored_vms_get_their_own_identity_clock_and_disk() {
    let Some((provider, _runtime)) = provider().await else {
        return;
    };
    let snapshot = provider
        .ready_snapshot(&spec())
        .await
        .expect("ready snapshot");
    eprintln!(
        "ready snapshot {} ({} MiB)",
        snapshot.dir.display(),
        snapshot.size_bytes >> 20
    );
    let a = provider.restore(&snapshot).await.expect("restore a");
    let b = provider.restore(&snapshot).await.expect("restore b");
    eprintln!(
        "restores took {} ms and {} ms",
        a.elapsed.as_millis(),
        b.elapsed.as_millis()
    );
    assert_ne!(a.vm.id(), b.vm.id());
    assert_eq!(sh(&*a.vm, "hostname").await, a.vm.id());
    assert_eq!(sh(&*b.vm, "hostname").await, b.vm.id());
    // The restored guest has the snapshot's size, which is the spec's.
    assert_eq!(sh(&*a.vm, "nproc").await, spec().vcpus.to_string());
    let mem_kib: u64 = sh(&*a.vm, "awk '/^MemTotal:/ {print $2}' /proc/meminfo")
        .await
        .parse()
        .expect("a number");
    let mib = u64::from(spec().memory_mib);
    assert!(
        (mib * 1024 * 8 / 10..=mib * 1024).contains(&mem_kib),
        "MemTotal {mem_kib} kB for {mib} MiB"
    );
    let host_now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs() as i64;
    let guest_now: i64 = sh(&*a.vm, "date +%s").await.parse().expect("a number");
    assert!(
        (guest_now - host_now).abs() <= 5,
        "guest clock {guest_now}, host {host_now}"
    );
    let root = a.vm.work_root().to_owned();
    sh(&*a.vm, &format!("echo secret > {root}/marker && sync")).await;
    assert_eq!(
        sh(
            &*b.vm,
            &format!("cat {root}/marker 2>/dev/null || echo absent")
        )
        .await,
        "absent"
    );
    provider.release(&*a.vm).await.expect("release a");
    let c = provider.restore(&snapshot).await.expect("restore c");
    assert_eq!(
        sh(
            &*c.vm,
            &format!("cat {root}/marker 2>/dev/null || echo absent")
        )
        .await,
        "absent"
    );
    provider.release(&*b.vm).await.expect("release b");
    provider.release(&*c.vm).await.expect("release c");
    assert!(snapshot.dir.join("snapshot.json").exists());
}

mod strategies {
    //! Hand-out order per strategy, on pools of real local-backend VMs (the local backend has
    //! no snapshots, so the pool boots them: the order logic is the same).

    use std::sync::Arc;
    use std::time::Duration;

    use kiln_runner::pool::{PoolConfig, PoolLease, Strategy, VmPool};
    use kiln_vm::VmSpec;
    use kiln_vm::local::LocalProvider;

    async fn pool(strategy: Strategy, dir: &std::path::Path) -> VmPool {
        let provider = Arc::new(LocalProvider::new(dir.to_path_buf()));
        let config = PoolConfig {
            min_idle: 3,
            max_total: 3,
            strategy,
        };
        let pool = VmPool::start(provider, VmSpec::default(), config, None).expect("valid");
        idle(&pool, 3).await;
        pool
    }

    /// Waits until `n` VMs are idle.
    async fn idle(pool: &VmPool, n: usize) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while pool.status().idle != n {
            assert!(
                tokio::time::Instant::now() < deadline,
                "pool never had {n} idle VMs: {:?}",
                pool.status()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn give(pool: &VmPool, lease: PoolLease) {
        pool.give_back(&*lease.vm).await.expect("give back");
    }

    /// The scenario that tells LRU and round-robin apart: hold slot 0 while slots 1 and 2
    /// cycle, then free slot 0 and take once more.
    async fn scenario(strategy: Strategy) -> Vec<usize> {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = pool(strategy, dir.path()).await;
        let mut order = Vec::new();
        let a = pool.take().await.expect("a");
        order.push(a.slot);
        let b = pool.take().await.expect("b");
        order.push(b.slot);
        give(&pool, b).await;
        idle(&pool, 2).await;
        let c = pool.take().await.expect("c");
        order.push(c.slot);
        give(&pool, c).await;
        idle(&pool, 2).await;
        let d = pool.take().await.expect("d");
        order.push(d.slot);
        give(&pool, a).await;
        idle(&pool, 2).await;
        let e = pool.take().await.expect("e");
        order.push(e.slot);
        give(&pool, d).await;
        give(&pool, e).await;
        pool.shutdown().await;
        order
    }

    #[tokio::test]
    async fn round_robin_takes_slots_in_turn() {
        assert_eq!(scenario(Strategy::RoundRobin).await, [0, 1, 2, 1, 2]);
    }

    #[tokio::test]
    async fn lru_takes_the_slot_handed_out_longest_ago() {
        assert_eq!(scenario(Strategy::Lru).await, [0, 1, 2, 1, 0]);
    }

    #[tokio::test]
    async fn fifo_takes_the_vm_that_became_ready_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = pool(Strategy::Fifo, dir.path()).await;
        let x = pool.take().await.expect("x");
        let y = pool.take().await.expect("y");
        let z = pool.take().await.expect("z");
        let expected = [z.slot, x.slot, y.slot];
        let mut ids = std::collections::HashSet::new();
        for (lease, n) in [(z, 1), (x, 2), (y, 3)] {
            ids.insert(lease.vm.id().to_owned());
            give(&pool, lease).await;
            idle(&pool, n).await;
        }
        let mut order = Vec::new();
        let mut held = Vec::new();
        for _ in 0..3 {
            let lease = pool.take().await.expect("take");
            assert!(
                !ids.contains(lease.vm.id()),
                "a VM was handed out twice: {}",
                lease.vm.id()
            );
            order.push(lease.slot);
            held.push(lease);
        }
        assert_eq!(order, expected);
        for lease in held {
            give(&pool, lease).await;
        }
        let status = pool.status();
        assert_eq!((status.served, status.failed), (6, 0), "{status:?}");
        pool.shutdown().await;
    }
}

mod warm {
    //! Pools and one-shot restores through sessions and the executor, on real QEMU VMs.

    use std::sync::Arc;
    use std::time::Duration;

    use kiln_runner::event::{Conclusion, EventKind, EventSink, RunEvent};
    use kiln_runner::executor::{GitInfo, Isolation, RunContext, RunOptions, WorkflowExecutor};
    use kiln_runner::metrics::{self, Metrics};
    use kiln_runner::pool::{AllocationSource, PoolConfig, PoolSettings, PooledProvider, Strategy};
    use kiln_runner::session::{SessionConfig, SessionManager, SessionRequest};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_util::sync::CancellationToken;

    use super::{provider, spec};

    async fn scrape(addr: std::net::SocketAddr) -> String {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: kiln\r\n\r\n")
            .await
            .expect("write");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
        assert!(response.contains(metrics::CONTENT_TYPE), "{response}");
        response
    }

    /// The value of the sample line starting with `series ` (exact name and labels).
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    async fn run(
        executor: &WorkflowExecutor,
        yaml: &str,
        metrics: &Metrics,
    ) -> (Conclusion, Vec<RunEvent>) {
        let workflow = kiln_workflow::parse_workflow("pool.yml", yaml).expect("valid");
        let workspace = tempfile::tempdir().expect("tempdir");
        let options = RunOptions {
            run_id: format!("pool-{}", uuid::Uuid::new_v4().simple()),
            isolation: Isolation::Workflow,
            spec: spec(),
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
        let mut events = Vec::new();
        while let Some(e) = rx.recv().await {
            metrics.observe("qemu", &e);
            events.push(e);
        }
        (report.result, events)
    }

    fn source(events: &[RunEvent]) -> String {
        events
            .iter()
            .find_map(|e| match &e.kind {
                EventKind::SessionAllocated { source, .. } => Some(source.clone()),
                _ => None,
            })
            .expect("a session_allocated event")
    }

    const WRITE: &str = r#"
name: writes
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - run: echo "marker-$RANDOM" > /var/tmp/kiln-marker && echo "$HOSTNAME" > /var/tmp/host && sync && sleep 4
"#;

    const CHECK: &str = r#"
name: checks
on: push
jobs:
  a:
    runs-on: ubuntu-latest
    steps:
      - run: test ! -e /var/tmp/kiln-marker && test ! -e /var/tmp/host && test "$(hostname)" != localhost
"#;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pool_serves_clean_vms_refills_and_is_scraped() {
        let Some((qemu, _runtime)) = provider().await else {
            return;
        };
        let metrics = Arc::new(Metrics::new());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(metrics::serve(listener, metrics.clone()));
        let settings = PoolSettings {
            snapshots: true,
            pools: vec![(
                spec(),
                PoolConfig {
                    min_idle: 2,
                    max_total: 3,
                    strategy: Strategy::Fifo,
                },
            )],
        };
        let pooled =
            Arc::new(PooledProvider::new(qemu, settings, Some(metrics.clone())).expect("pools"));
        let pool = pooled.pool("default").expect("the default pool").clone();
        let wait_idle = |n: usize| {
            let pool = pool.clone();
            async move {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(300);
                while pool.status().idle < n {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "the pool never had {n} idle VMs: {:?}",
                        pool.status()
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        wait_idle(2).await;
        let sessions = SessionManager::with_pools(
            pooled.clone(),
            SessionConfig {
                max_sessions: 2,
                ..SessionConfig::default()
            },
        );
        let executor = WorkflowExecutor::new(sessions.clone());

        // Run 1, scraped while its step runs.
        let first = {
            let executor = executor.clone();
            let metrics = metrics.clone();
            tokio::spawn(async move { run(&executor, WRITE, &metrics).await })
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let text = scrape(addr).await;
            if sample(&text, "vm_active_sessions{backend=\"qemu\"}") == Some(1.0) {
                let busy = "vm_pool_vms{backend=\"qemu\",vm_type=\"default\",state=\"busy\"}";
                assert_eq!(sample(&text, busy), Some(1.0), "{text}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "never active: {text}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (result, events) = first.await.expect("run 1");
        assert_eq!(result, Conclusion::Success, "{events:#?}");
        assert_eq!(source(&events), "pool");

        // Run 2 gets another pool VM, which cannot see run 1's files.
        let (result, events) = run(&executor, CHECK, &metrics).await;
        assert_eq!(
            result,
            Conclusion::Success,
            "a dirty VM was handed out: {events:#?}"
        );
        assert_eq!(source(&events), "pool");

        wait_idle(2).await;
        let status = pool.status();
        assert_eq!(
            (status.served, status.busy, status.failed),
            (2, 0, 0),
            "{status:?}"
        );

        let text = scrape(addr).await;
        let pool_allocations = "vm_allocation_total{backend=\"qemu\",vm_type=\"default\",source=\"pool\",result=\"success\"}";
        assert_eq!(sample(&text, pool_allocations), Some(2.0), "{text}");
        assert_eq!(
            sample(&text, "vm_active_sessions{backend=\"qemu\"}"),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                "workflow_runs_total{backend=\"qemu\",result=\"success\"}"
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "step_executions_total{backend=\"qemu\",result=\"success\"}"
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "job_executions_total{backend=\"qemu\",result=\"success\"}"
            ),
            Some(2.0),
            "{text}"
        );
        assert_eq!(
            sample(
                &text,
                "vm_pool_utilization{backend=\"qemu\",vm_type=\"default\"}"
            ),
            Some(0.0),
            "{text}"
        );
        for family in [
            "# TYPE vm_allocation_duration_seconds histogram",
            "# TYPE vm_allocation counter",
            "# TYPE vm_active_sessions gauge",
            "# TYPE vm_pool_utilization gauge",
            "# TYPE vm_snapshot_duration_seconds histogram",
            "# TYPE workflow_execution_duration_seconds histogram",
        ] {
            assert!(text.contains(family), "missing {family}:\n{text}");
        }
        let pool_count = "vm_allocation_duration_seconds_count{backend=\"qemu\",vm_type=\"default\",source=\"pool\"}";
        assert_eq!(sample(&text, pool_count), Some(2.0), "{text}");
        let restores = "vm_snapshot_duration_seconds_count{backend=\"qemu\",operation=\"restore\"}";
        assert!(sample(&text, restores).is_some_and(|n| n >= 4.0), "{text}");
        pooled.shutdown().await;
        assert_eq!(pool.status().idle, 0);
        server.abort();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_shot_sessions_restore_the_ready_snapshot_unless_cold() {
        let Some((qemu, _runtime)) = provider().await else {
            return;
        };
        for (snapshots, expected) in [
            (true, AllocationSource::Snapshot),
            (false, AllocationSource::Cold),
        ] {
            let settings = PoolSettings {
                snapshots,
                pools: Vec::new(),
            };
            let pooled =
                Arc::new(PooledProvider::new(qemu.clone(), settings, None).expect("provider"));
            let sessions = SessionManager::with_pools(pooled, SessionConfig::default());
            let guard = sessions
                .create_session(SessionRequest {
                    session_id: "one-shot".into(),
                    run_id: "one-shot".into(),
                    workflow: "w".into(),
                    spec: spec(),
                })
                .await
                .expect("session");
            assert_eq!(guard.source(), expected);
            eprintln!(
                "{expected}: allocated in {} ms",
                guard.allocation_time().as_millis()
            );
            assert_eq!(super::sh(&**guard.vm(), "hostname").await, guard.vm_id());
            sessions.release_session(guard).await.expect("release");
        }
    }
}
