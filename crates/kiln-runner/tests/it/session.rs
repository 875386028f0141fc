//! SessionManager against the real local backend.
//!
//! Every VM here is a real `kiln_vm::local` VM (a directory and host processes). The only
//! wrapper, [`Counting`], counts the calls it forwards to the real provider and can hold an
//! allocation back at a gate; it executes and fakes nothing.

use std::collections::HashSet;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kiln_runner::session::{
    OnLimit, SessionConfig, SessionError, SessionGuard, SessionManager, SessionRequest,
    SessionState,
};
use kiln_vm::local::LocalProvider;
use kiln_vm::{Allocation, Command, ExecRequest, ExitStatus, Vm, VmError, VmProvider, VmSpec};
use tokio::sync::Semaphore;

/// Generous: these tests share two cores with other builds.
const PATIENCE: Duration = Duration::from_secs(20);

/// Forwards every call to a real [`LocalProvider`], counting them.
struct Counting {
    real: LocalProvider,
    allocations: AtomicUsize,
    allocate_calls: AtomicUsize,
    releases: AtomicUsize,
    release_calls: AtomicUsize,
    /// VMs allocated and not yet released, and the most that ever existed at once.
    live: Mutex<(HashSet<String>, usize)>,
    /// When set, `allocate` waits for a permit here before forwarding.
    gate: Option<Semaphore>,
    /// When set, `release` waits for a permit here before forwarding.
    release_gate: Option<Semaphore>,
}

impl Counting {
    fn new(runtime_dir: &Path) -> Counting {
        Counting {
            real: LocalProvider::new(runtime_dir.to_path_buf()),
            allocations: AtomicUsize::new(0),
            allocate_calls: AtomicUsize::new(0),
            releases: AtomicUsize::new(0),
            release_calls: AtomicUsize::new(0),
            live: Mutex::new((HashSet::new(), 0)),
            gate: None,
            release_gate: None,
        }
    }

    fn release_gated(runtime_dir: &Path) -> Counting {
        Counting {
            release_gate: Some(Semaphore::new(0)),
            ..Counting::new(runtime_dir)
        }
    }

    fn gated(runtime_dir: &Path) -> Counting {
        Counting {
            gate: Some(Semaphore::new(0)),
            ..Counting::new(runtime_dir)
        }
    }

    fn allocations(&self) -> usize {
        self.allocations.load(Ordering::SeqCst)
    }

    fn releases(&self) -> usize {
        self.releases.load(Ordering::SeqCst)
    }

    fn max_live(&self) -> usize {
        self.live.lock().unwrap().1
    }
}

#[async_trait]
impl VmProvider for Counting {
    fn name(&self) -> &'static str {
        self.real.name()
    }

    fn isolates(&self) -> bool {
        self.real.isolates()
    }

    async fn allocate(&self, spec: &VmSpec) -> Result<Allocation, VmError> {
        self.allocate_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.gate {
            gate.acquire().await.unwrap().forget();
        }
        let allocation = self.real.allocate(spec).await?;
        self.allocations.fetch_add(1, Ordering::SeqCst);
        let mut live = self.live.lock().unwrap();
        live.0.insert(allocation.vm.id().to_owned());
        live.1 = live.1.max(live.0.len());
        Ok(allocation)
    }

    async fn release(&self, vm: &dyn Vm) -> Result<(), VmError> {
        self.release_calls.fetch_add(1, Ordering::SeqCst);
        if let Some(gate) = &self.release_gate {
            gate.acquire().await.unwrap().forget();
        }
        let result = self.real.release(vm).await;
        self.releases.fetch_add(1, Ordering::SeqCst);
        self.live.lock().unwrap().0.remove(vm.id());
        result
    }
}

struct Fixture {
    _tmp: tempfile::TempDir,
    runtime_dir: PathBuf,
    provider: Arc<Counting>,
    manager: SessionManager,
}

fn fixture(config: SessionConfig) -> Fixture {
    fixture_with(config, Counting::new)
}

fn fixture_with(config: SessionConfig, provider: fn(&Path) -> Counting) -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let runtime_dir = tmp.path().join("runtime");
    let provider = Arc::new(provider(&runtime_dir));
    let manager = SessionManager::new(provider.clone(), config);
    Fixture {
        _tmp: tmp,
        runtime_dir,
        provider,
        manager,
    }
}

fn limit(max_sessions: usize, on_limit: OnLimit) -> SessionConfig {
    SessionConfig {
        max_sessions,
        on_limit,
        ..SessionConfig::default()
    }
}

fn request(id: &str) -> SessionRequest {
    SessionRequest {
        session_id: id.to_owned(),
        run_id: format!("run-{id}"),
        workflow: "test".to_owned(),
        spec: VmSpec::default(),
    }
}

/// Names in the runtime dir: one per VM that still has host state.
fn leftovers(runtime_dir: &Path) -> Vec<String> {
    match std::fs::read_dir(runtime_dir) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("reading {}: {e}", runtime_dir.display()),
    }
}

async fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs a shell command in the VM and returns its status and stdout.
async fn sh(vm: &Arc<dyn Vm>, script: &str) -> (ExitStatus, String) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let outcome = vm
        .exec(
            ExecRequest {
                command: Command::Argv(vec!["sh".into(), "-c".into(), script.into()]),
                env: Vec::new(),
                cwd: None,
                timeout: Some(PATIENCE),
                user: kiln_vm::ExecUser::Runner,
            },
            tx,
        )
        .await
        .unwrap();
    let mut stdout = Vec::new();
    while let Ok(chunk) = rx.try_recv() {
        if chunk.stream == kiln_vm::Stream::Stdout {
            stdout.extend_from_slice(&chunk.data);
        }
    }
    (outcome.status, String::from_utf8(stdout).unwrap())
}

async fn create(manager: &SessionManager, id: &str) -> SessionGuard {
    tokio::time::timeout(PATIENCE, manager.create_session(request(id)))
        .await
        .expect("create_session timed out")
        .unwrap()
}

#[tokio::test]
async fn one_session_is_one_allocation_for_all_its_commands() {
    let f = fixture(SessionConfig::default());
    let session = create(&f.manager, "s1").await;
    assert_eq!(session.info().state, SessionState::Active);
    assert_eq!(session.info().vm_id.as_deref(), Some(session.vm_id()));

    for step in 1..=5 {
        let (status, out) = sh(
            session.vm(),
            &format!("echo {step} >> steps.txt; wc -l < steps.txt"),
        )
        .await;
        assert!(status.success());
        // Every command sees what the earlier ones wrote: the same VM.
        assert_eq!(out.trim(), step.to_string());
        session.touch();
    }
    assert_eq!(f.provider.allocations(), 1);
    assert_eq!(f.provider.releases(), 0);
    assert_eq!(f.manager.active_count(), 1);

    let info = f.manager.release_session(session).await.unwrap();
    assert_eq!(info.state, SessionState::Released);
    assert!(info.ended_at.is_some());
    assert_eq!(f.provider.allocations(), 1);
    assert_eq!(f.provider.releases(), 1);
    assert_eq!(f.manager.active_count(), 0);
}

#[tokio::test]
async fn three_concurrent_sessions_get_three_distinct_vms() {
    let f = fixture(SessionConfig::default());
    let (a, b, c) = tokio::join!(
        create(&f.manager, "a"),
        create(&f.manager, "b"),
        create(&f.manager, "c")
    );
    let ids: HashSet<&str> = [a.vm_id(), b.vm_id(), c.vm_id()].into_iter().collect();
    assert_eq!(ids.len(), 3, "VM ids must be distinct: {ids:?}");
    let roots: HashSet<&str> = [a.vm().work_root(), b.vm().work_root(), c.vm().work_root()]
        .into_iter()
        .collect();
    assert_eq!(roots.len(), 3);
    assert_eq!(f.provider.allocations(), 3);
    assert_eq!(f.manager.active_count(), 3);

    // No VM sees another's files.
    sh(a.vm(), "echo mine > a.txt").await;
    let (_, seen) = sh(b.vm(), "ls").await;
    assert!(!seen.contains("a.txt"), "b sees a's files: {seen}");

    for guard in [a, b, c] {
        f.manager.release_session(guard).await.unwrap();
    }
    assert_eq!(f.provider.releases(), 3);
    assert_eq!(leftovers(&f.runtime_dir), Vec::<String>::new());
}

#[tokio::test]
async fn a_released_session_leaves_nothing_behind_and_the_next_is_fresh() {
    let f = fixture(SessionConfig::default());
    let first = create(&f.manager, "first").await;
    let first_vm = first.vm_id().to_owned();
    let dir = PathBuf::from(first.vm().work_root());
    let (_, _) = sh(first.vm(), "echo dirty > left.txt; (sleep 300 &)").await;
    assert!(dir.join("left.txt").exists());

    f.manager.release_session(first).await.unwrap();
    assert!(!dir.exists(), "VM dir {} survived release", dir.display());
    assert_eq!(leftovers(&f.runtime_dir), Vec::<String>::new());

    let second = create(&f.manager, "second").await;
    assert_ne!(second.vm_id(), first_vm);
    let (status, _) = sh(second.vm(), "test ! -e left.txt").await;
    assert!(status.success(), "the second session saw the first's file");
    f.manager.release_session(second).await.unwrap();
    assert_eq!((f.provider.allocations(), f.provider.releases()), (2, 2));
}

#[tokio::test]
async fn allocation_is_logged_with_vm_time_and_session() {
    use std::io::Write;
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);
    impl Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }
    let buffer = Buffer::default();
    let writer = buffer.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    // #[tokio::test] runs every task on this thread, so the thread's default subscriber sees
    // the allocation task too. tracing caches each callsite's interest process-wide: with only
    // one dispatcher registered, a parallel test's thread (no subscriber) would cache the
    // allocation line as "never". A global default keeps a second dispatcher registered, and
    // the rebuild re-asks every callsite with the capture in place.
    let _ = tracing::subscriber::set_global_default(tracing_subscriber::registry());
    let _default = tracing::subscriber::set_default(subscriber);
    tracing::callsite::rebuild_interest_cache();

    let f = fixture(SessionConfig::default());
    let session = create(&f.manager, "logged").await;
    let vm = session.vm_id().to_owned();
    f.manager.release_session(session).await.unwrap();

    let logs = String::from_utf8(buffer.0.lock().unwrap().clone()).unwrap();
    let line = logs
        .lines()
        .find(|line| line.contains("Allocated VM"))
        .unwrap_or_else(|| panic!("no allocation line in:\n{logs}"));
    assert!(line.contains(" INFO "), "not at info level: {line}");
    let message = &line[line.find("Allocated VM").unwrap()..];
    let ms = message
        .strip_prefix(&format!("Allocated VM {vm} in "))
        .and_then(|rest| rest.strip_suffix(" ms for session logged"))
        .unwrap_or_else(|| panic!("unexpected allocation line: {message}"));
    assert!(ms.parse::<u128>().is_ok(), "not a millisecond count: {ms}");
}

#[tokio::test]
async fn fail_mode_rejects_the_request_past_the_limit() {
    let f = fixture(limit(2, OnLimit::Fail));
    let a = create(&f.manager, "a").await;
    let b = create(&f.manager, "b").await;

    let err = f.manager.create_session(request("c")).await.unwrap_err();
    assert!(matches!(err, SessionError::LimitReached { limit: 2 }));
    assert_eq!(
        err.to_string(),
        "Session limit reached: 2 of 2 sessions are active (on_limit = fail)"
    );
    assert_eq!(
        f.provider.allocations(),
        2,
        "the rejected request allocated"
    );
    // The active sessions are not disturbed.
    assert!(sh(a.vm(), "true").await.0.success());
    assert!(sh(b.vm(), "true").await.0.success());
    assert_eq!(f.manager.active_count(), 2);

    f.manager.release_session(a).await.unwrap();
    let c = create(&f.manager, "c").await;
    assert_eq!(f.manager.active_count(), 2);
    f.manager.release_session(b).await.unwrap();
    f.manager.release_session(c).await.unwrap();
    assert_eq!(f.provider.max_live(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_both_take_the_last_slot() {
    let f = fixture(limit(2, OnLimit::Fail));
    let start = Arc::new(tokio::sync::Barrier::new(10));
    let requests: Vec<_> = (0..10)
        .map(|i| {
            let (manager, start) = (f.manager.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                manager.create_session(request(&format!("r{i}"))).await
            })
        })
        .collect();
    let mut granted = Vec::new();
    let mut refused = 0;
    for request in requests {
        match request.await.unwrap() {
            Ok(guard) => granted.push(guard),
            Err(SessionError::LimitReached { limit: 2 }) => refused += 1,
            Err(other) => panic!("unexpected error: {other}"),
        }
    }
    assert_eq!((granted.len(), refused), (2, 8));
    assert_eq!(f.provider.allocations(), 2);
    assert_eq!(f.provider.max_live(), 2);
    for guard in granted {
        f.manager.release_session(guard).await.unwrap();
    }
    assert_eq!(leftovers(&f.runtime_dir), Vec::<String>::new());
}

/// Records the largest `active_count` and `available_slots` use seen while it runs.
fn sample_active(manager: &SessionManager) -> (tokio::task::JoinHandle<()>, Arc<AtomicUsize>) {
    let max = Arc::new(AtomicUsize::new(0));
    let (manager, seen) = (manager.clone(), max.clone());
    let sampler = tokio::spawn(async move {
        loop {
            seen.fetch_max(manager.active_count(), Ordering::SeqCst);
            tokio::task::yield_now().await;
        }
    });
    (sampler, max)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_mode_queues_the_request_past_the_limit_until_a_release() {
    let f = fixture(limit(2, OnLimit::Wait));
    let (sampler, max_active) = sample_active(&f.manager);
    let a = create(&f.manager, "a").await;
    let b = create(&f.manager, "b").await;

    let manager = f.manager.clone();
    let mut third = tokio::spawn(async move { manager.create_session(request("c")).await });
    // The third request is waiting, not allocating.
    wait_until("no slot is left", || f.manager.available_slots() == 0).await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut third)
            .await
            .is_err(),
        "the third session was created while two were active"
    );
    assert_eq!(f.provider.allocations(), 2);

    let released_vm = a.vm_id().to_owned();
    f.manager.release_session(a).await.unwrap();
    let c = tokio::time::timeout(PATIENCE, third)
        .await
        .expect("the waiting request was not served after a release")
        .unwrap()
        .unwrap();
    assert_ne!(c.vm_id(), released_vm, "a released VM was handed out again");
    assert_eq!(f.provider.allocations(), 3);

    f.manager.release_session(b).await.unwrap();
    f.manager.release_session(c).await.unwrap();
    sampler.abort();
    assert_eq!(max_active.load(Ordering::SeqCst), 2);
    assert_eq!(f.provider.max_live(), 2, "more than 2 VMs existed at once");
    assert_eq!(leftovers(&f.runtime_dir), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_mode_never_has_more_than_the_limit_active_under_load() {
    let f = fixture(limit(2, OnLimit::Wait));
    let (sampler, max_active) = sample_active(&f.manager);
    let runs: Vec<_> = (0..6)
        .map(|i| {
            let manager = f.manager.clone();
            tokio::spawn(async move {
                let session = manager.create_session(request(&format!("r{i}"))).await?;
                let (status, _) = sh(session.vm(), "sleep 0.1").await;
                assert!(status.success());
                manager.release_session(session).await
            })
        })
        .collect();
    for run in runs {
        let info = tokio::time::timeout(PATIENCE, run)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(info.state, SessionState::Released);
    }
    sampler.abort();
    assert_eq!(f.provider.allocations(), 6);
    assert_eq!(f.provider.releases(), 6);
    assert!(max_active.load(Ordering::SeqCst) <= 2);
    assert!(
        f.provider.max_live() <= 2,
        "{} VMs at once",
        f.provider.max_live()
    );
    assert_eq!(f.manager.available_slots(), 2);
    assert_eq!(leftovers(&f.runtime_dir), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_returns_only_after_its_vm_is_released() {
    let f = fixture_with(limit(1, OnLimit::Wait), Counting::release_gated);
    let first = create(&f.manager, "first").await;
    let first_dir = PathBuf::from(first.vm().work_root());
    let manager = f.manager.clone();
    let mut waiting = tokio::spawn(async move { manager.create_session(request("next")).await });
    let manager = f.manager.clone();
    let releasing = tokio::spawn(async move { manager.release_session(first).await });

    // The backend is in the middle of releasing the first VM: it still exists, so the slot
    // must still be taken.
    wait_until("release is called", || {
        f.provider.release_calls.load(Ordering::SeqCst) == 1
    })
    .await;
    assert!(first_dir.exists());
    assert_eq!(f.manager.available_slots(), 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), &mut waiting)
            .await
            .is_err(),
        "a new session started before the old VM was released"
    );
    assert_eq!(f.provider.allocations(), 1);

    f.provider.release_gate.as_ref().unwrap().add_permits(1);
    let info = releasing.await.unwrap().unwrap();
    assert_eq!(info.state, SessionState::Released);
    assert!(!first_dir.exists());
    let next = tokio::time::timeout(PATIENCE, waiting)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(f.provider.max_live(), 1);
    f.provider.release_gate.as_ref().unwrap().add_permits(1);
    f.manager.release_session(next).await.unwrap();
}

#[tokio::test]
async fn a_cancelled_waiting_request_leaks_no_slot() {
    let f = fixture(limit(1, OnLimit::Wait));
    let holder = create(&f.manager, "holder").await;

    // Cancelled by a timeout, and by aborting its task.
    let waited = tokio::time::timeout(
        Duration::from_millis(100),
        f.manager.create_session(request("timed-out")),
    )
    .await;
    assert!(waited.is_err(), "the request did not wait");
    let manager = f.manager.clone();
    let aborted = tokio::spawn(async move { manager.create_session(request("aborted")).await });
    tokio::task::yield_now().await;
    aborted.abort();
    assert!(aborted.await.unwrap_err().is_cancelled());

    f.manager.release_session(holder).await.unwrap();
    assert_eq!(f.manager.available_slots(), 1);
    assert_eq!(f.manager.active_count(), 0);
    assert_eq!(f.provider.allocations(), 1);

    // The slot really is free: a request under fail mode semantics would pass, so this one
    // does not wait.
    let next = tokio::time::timeout(PATIENCE, f.manager.create_session(request("next")))
        .await
        .unwrap()
        .unwrap();
    f.manager.release_session(next).await.unwrap();
    let ids: Vec<String> = f.manager.sessions().into_iter().map(|s| s.id).collect();
    assert_eq!(ids, ["holder", "next"], "cancelled requests left sessions");
}

#[tokio::test]
async fn a_request_cancelled_during_allocation_releases_its_vm() {
    let f = fixture_with(limit(1, OnLimit::Wait), Counting::gated);
    let manager = f.manager.clone();
    let creating = tokio::spawn(async move { manager.create_session(request("gone")).await });
    wait_until("allocate is called", || {
        f.provider.allocate_calls.load(Ordering::SeqCst) == 1
    })
    .await;
    creating.abort();
    assert!(creating.await.unwrap_err().is_cancelled());
    assert_eq!(f.manager.active_count(), 1, "the allocation must go on");

    // Let the allocation finish; nobody is waiting for the session any more.
    f.provider.gate.as_ref().unwrap().add_permits(1);
    wait_until("the orphaned VM is released", || f.provider.releases() == 1).await;
    wait_until("the slot is back", || f.manager.available_slots() == 1).await;
    assert_eq!(f.provider.allocations(), 1);
    assert_eq!(f.manager.active_count(), 0);
    assert_eq!(leftovers(&f.runtime_dir), Vec::<String>::new());
    let states: Vec<SessionState> = f.manager.sessions().iter().map(|s| s.state).collect();
    assert_eq!(states, [SessionState::Released]);
}

#[tokio::test]
async fn a_guard_dropped_in_a_panicking_task_releases_its_vm() {
    let f = fixture(limit(1, OnLimit::Wait));
    let dir = Arc::new(Mutex::new(None));
    let manager = f.manager.clone();
    let seen = dir.clone();
    let run = tokio::spawn(async move {
        let session = manager.create_session(request("doomed")).await.unwrap();
        sh(session.vm(), "echo x > file; (sleep 300 &)").await;
        *seen.lock().unwrap() = Some(PathBuf::from(session.vm().work_root()));
        panic!("the executor panicked mid-run");
    });
    assert!(run.await.unwrap_err().is_panic());
    let dir = dir.lock().unwrap().clone().unwrap();

    wait_until("the VM is released", || f.provider.releases() == 1).await;
    wait_until("the slot is back", || f.manager.available_slots() == 1).await;
    assert!(!dir.exists(), "VM dir {} survived the panic", dir.display());
    assert_eq!(f.manager.active_count(), 0);
    let info = &f.manager.sessions()[0];
    assert_eq!(
        (info.id.as_str(), info.state),
        ("doomed", SessionState::Released)
    );
}

#[test]
fn a_guard_dropped_outside_any_runtime_still_cleans_up() {
    let f = fixture(limit(1, OnLimit::Fail));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let session = runtime.block_on(async {
        let session = f.manager.create_session(request("orphan")).await.unwrap();
        sh(session.vm(), "echo x > file").await;
        session
    });
    drop(runtime);
    let dir = PathBuf::from(session.vm().work_root());
    assert!(dir.exists());
    assert_eq!(f.manager.available_slots(), 0);

    drop(session);
    assert!(!dir.exists(), "VM dir {} survived the drop", dir.display());
    assert_eq!(f.manager.available_slots(), 1);
    assert_eq!(f.manager.active_count(), 0);
    assert_eq!(f.manager.sessions()[0].state, SessionState::Released);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_expires_an_idle_session_and_kills_what_runs_in_it() {
    let f = fixture(SessionConfig {
        max_sessions: 1,
        idle_timeout: Some(Duration::from_millis(300)),
        reaper_interval: Duration::from_millis(50),
        ..SessionConfig::default()
    });
    let reaper = f.manager.spawn_reaper();
    let session = create(&f.manager, "idle").await;
    let dir = PathBuf::from(session.vm().work_root());

    // A long command, started like a step would be; its pid arrives on stdout.
    let vm = session.vm().clone();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let running = tokio::spawn(async move {
        vm.exec(
            ExecRequest {
                command: Command::Argv(vec![
                    "sh".into(),
                    "-c".into(),
                    "echo $$; exec sleep 300".into(),
                ]),
                env: Vec::new(),
                cwd: None,
                timeout: None,
                user: kiln_vm::ExecUser::Runner,
            },
            tx,
        )
        .await
    });
    let chunk = tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .unwrap()
        .unwrap();
    let pid: u32 = String::from_utf8_lossy(&chunk.data).trim().parse().unwrap();
    assert!(Path::new(&format!("/proc/{pid}")).exists());

    wait_until("the session expires", || {
        session.info().state == SessionState::Expired
    })
    .await;
    let outcome = tokio::time::timeout(PATIENCE, running)
        .await
        .expect("the sleep survived expiry")
        .unwrap()
        .unwrap();
    assert_eq!(outcome.status, ExitStatus::Signaled(9));
    assert!(!Path::new(&format!("/proc/{pid}")).exists());
    assert!(!dir.exists(), "the expired VM's dir survived");
    assert_eq!(f.provider.releases(), 1);
    // The expired session's slot is free again although its guard still exists.
    assert_eq!(f.manager.available_slots(), 1);
    assert!(matches!(
        session.ensure_active(),
        Err(SessionError::Expired { .. })
    ));

    // The guard's own release is a no-op that reports the expiry.
    let info = f.manager.release_session(session).await.unwrap();
    assert_eq!(info.state, SessionState::Expired);
    assert_eq!(f.provider.releases(), 1);
    assert_eq!(leftovers(&f.runtime_dir), Vec::<String>::new());

    drop(f.manager);
    tokio::time::timeout(PATIENCE, reaper)
        .await
        .expect("the reaper outlived its manager")
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reaper_spares_a_touched_session_and_expires_by_max_lifetime() {
    let f = fixture(SessionConfig {
        idle_timeout: Some(Duration::from_millis(400)),
        reaper_interval: Duration::from_millis(50),
        ..SessionConfig::default()
    });
    let _reaper = f.manager.spawn_reaper();
    let busy = create(&f.manager, "busy").await;
    let idle = create(&f.manager, "idle").await;
    let deadline = Instant::now() + PATIENCE;
    while idle.info().state != SessionState::Expired {
        assert!(Instant::now() < deadline, "the idle session never expired");
        busy.touch();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(busy.info().state, SessionState::Active);
    assert!(sh(busy.vm(), "true").await.0.success());
    f.manager.release_session(busy).await.unwrap();
    f.manager.release_session(idle).await.unwrap();

    let g = fixture(SessionConfig {
        max_lifetime: Some(Duration::from_millis(300)),
        reaper_interval: Duration::from_millis(50),
        ..SessionConfig::default()
    });
    let _reaper = g.manager.spawn_reaper();
    let old = create(&g.manager, "old").await;
    let deadline = Instant::now() + PATIENCE;
    while old.info().state != SessionState::Expired {
        assert!(Instant::now() < deadline, "the old session never expired");
        old.touch(); // Activity does not extend a lifetime.
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(g.provider.releases(), 1);
    drop(old);
    wait_until("the guard retires the session", || {
        g.manager.sessions()[0].ended_at.is_some() && g.manager.active_count() == 0
    })
    .await;
    assert_eq!(g.provider.releases(), 1, "expired VM released twice");
}

#[tokio::test]
async fn a_failed_allocation_marks_the_session_failed_and_frees_its_slot() {
    let tmp = tempfile::tempdir().unwrap();
    // The runtime "dir" is a file, so the real backend cannot create VM dirs under it.
    let not_a_dir = tmp.path().join("file");
    std::fs::write(&not_a_dir, b"").unwrap();
    let provider = Arc::new(Counting::new(&not_a_dir));
    let manager = SessionManager::new(provider.clone(), limit(1, OnLimit::Fail));

    let err = manager.create_session(request("broken")).await.unwrap_err();
    assert!(matches!(err, SessionError::Allocation { ref session, .. } if session == "broken"));
    assert!(std::error::Error::source(&err).is_some());
    assert_eq!(manager.available_slots(), 1);
    assert_eq!(manager.active_count(), 0);
    let info = &manager.sessions()[0];
    assert_eq!(
        (info.state, info.vm_id.as_deref()),
        (SessionState::Failed, None)
    );
    assert_eq!(provider.releases(), 0);
}

#[tokio::test]
async fn a_live_session_id_cannot_be_reused_until_it_ends() {
    let f = fixture(SessionConfig::default());
    let first = create(&f.manager, "same").await;
    let err = f.manager.create_session(request("same")).await.unwrap_err();
    assert!(matches!(err, SessionError::Duplicate { .. }), "{err}");
    assert_eq!(
        f.manager.available_slots(),
        3,
        "the rejected request kept a slot"
    );
    f.manager.release_session(first).await.unwrap();
    let again = create(&f.manager, "same").await;
    f.manager.release_session(again).await.unwrap();
    assert_eq!(f.provider.allocations(), 2);
}
