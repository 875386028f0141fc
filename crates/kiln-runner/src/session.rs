//! Sessions: one VM per workflow run, from allocation to release.
//!
//! A *session* binds one VM to one workflow run (or one job, with `isolation = "job"`). The
//! [`SessionManager`] hands out sessions, enforces the limit on how many exist at once, expires
//! idle or too old ones, and guarantees that every VM it allocated is released again.
//!
//! # Lifecycle
//!
//! ```text
//!  create_session
//!        │ takes a slot (on_limit = wait: queue for one; fail: SessionError::LimitReached)
//!        ▼
//!  ┌────────────┐  allocate failed                              ┌────────┐
//!  │ Allocating │──────────────────────────────────────────────▶│ Failed │
//!  └────────────┘                                               └────────┘
//!        │ VmProvider::allocate ok                                   ▲
//!        │ "Allocated VM <vm> in <ms> ms for session <session>"      │ release failed
//!        ▼                                                           │
//!  ┌────────────┐ release_session / guard dropped  ┌───────────┐     │     ┌──────────┐
//!  │   Active   │─────────────────────────────────▶│ Releasing │─────┴────▶│ Released │
//!  └────────────┘                                  └───────────┘           └──────────┘
//!    ▲  │                                              ▲   │ (started by the reaper)
//!    │  │ reaper: idle_timeout or max_lifetime passed  │   │                ┌─────────┐
//!    │  └──────────────────────────────────────────────┘   └───────────────▶│ Expired │
//!  touch()                                                                  └─────────┘
//! ```
//!
//! `Released`, `Expired` and `Failed` are final. Releasing is idempotent: a second release, or
//! the guard's release after the reaper expired the session, changes nothing and returns the
//! final [`SessionInfo`].
//!
//! An expired session keeps its table entry (state `Expired`, no VM, no slot) until its guard
//! is released or dropped, so the run that owns it can still ask [`SessionGuard::info`] or
//! [`SessionGuard::ensure_active`] what happened; commands on its VM fail with
//! [`VmError::Released`]. A failed release also ends in `Failed` and returns the slot, so a
//! broken backend cannot wedge the limit; the error is returned and logged.
//!
//! # Ownership
//!
//! - **The session table** has one owner, the manager's `Inner`: a `std::sync::Mutex` over a
//!   map of live sessions plus a short history of ended ones. It is held only to read or flip a
//!   state, never across an `.await`, and no other lock is taken while it is held.
//! - **The limit** is a [`tokio::sync::Semaphore`] with `max_sessions` permits. A session takes
//!   its [`OwnedSemaphorePermit`] *before* it allocates (`acquire_owned` in wait mode,
//!   `try_acquire_owned` in fail mode), so two callers can never both pass the last slot. The
//!   permit is stored with the session's table entry and is dropped only *after* the session's
//!   VM has been released, so the limit counts VMs that still exist. Keeping it in the entry
//!   rather than in the guard lets the reaper hand the slot back when it expires a session whose
//!   run is stuck.
//! - **Release is guaranteed by ownership.** [`create_session`](SessionManager::create_session)
//!   returns a [`SessionGuard`]. [`release_session`](SessionManager::release_session) consumes
//!   it; if it is dropped instead (a failed run, a cancelled task, a panic unwinding), its `Drop`
//!   spawns the release on the current tokio runtime. Without a runtime it releases
//!   best-effort and synchronously by dropping every handle to the VM (backends kill and clean up
//!   in their `Drop`) before the permit returns.
//!
//! # Cancellation
//!
//! Every `.await` a caller can be cancelled at is safe:
//! - waiting for a slot: tokio's semaphore forgets a dropped waiter, so nothing is taken;
//! - allocating: the allocation runs in its own task. If the caller is gone when it finishes,
//!   the new session's guard is dropped at once, which releases the VM;
//! - releasing: the release runs in its own task and finishes even if the caller goes away.
//!
//! A panic inside a backend's `allocate` marks the session `Failed` and returns its slot.
//!
//! # Where VMs come from
//! A manager made [`with_pools`](SessionManager::with_pools) allocates through a
//! [`PooledProvider`]: a warm pool, the ready snapshot, or a cold boot, and
//! [`SessionGuard::source`] says which (the `session_allocated` event's `source`). Releasing
//! goes through it too, so a pool VM is destroyed and its slot refilled, never reused.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant, SystemTime};

use kiln_vm::{Vm, VmError, VmProvider, VmSpec};
use tokio::runtime::Handle;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, oneshot, watch};
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::pool::{AllocationSource, PooledProvider};

/// How many ended sessions [`SessionManager::sessions`] still reports.
const ENDED_HISTORY: usize = 256;

/// Settings of a [`SessionManager`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionConfig {
    /// How many sessions (and so VMs) may exist at once. `0` is treated as `1`.
    pub max_sessions: usize,
    /// What a request past the limit does.
    pub on_limit: OnLimit,
    /// Expire a session whose last activity ([`SessionGuard::touch`]) is older than this.
    pub idle_timeout: Option<Duration>,
    /// Expire a session that has existed longer than this.
    pub max_lifetime: Option<Duration>,
    /// How often the reaper looks for sessions to expire.
    pub reaper_interval: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            max_sessions: 4,
            on_limit: OnLimit::Wait,
            idle_timeout: None,
            max_lifetime: None,
            reaper_interval: Duration::from_secs(1),
        }
    }
}

/// What [`SessionManager::create_session`] does when `max_sessions` sessions already exist.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OnLimit {
    /// Wait until a session is released.
    #[default]
    Wait,
    /// Fail at once with [`SessionError::LimitReached`].
    Fail,
}

impl FromStr for OnLimit {
    type Err = SessionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "wait" => Ok(OnLimit::Wait),
            "fail" => Ok(OnLimit::Fail),
            other => Err(SessionError::InvalidOnLimit {
                value: other.to_owned(),
            }),
        }
    }
}

impl fmt::Display for OnLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OnLimit::Wait => "wait",
            OnLimit::Fail => "fail",
        })
    }
}

/// Where a session is in its lifecycle (see the module docs for the state machine).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SessionState {
    /// A slot is taken and the backend is allocating the VM.
    Allocating,
    /// The VM is ready and bound to the session.
    Active,
    /// The VM is being released.
    Releasing,
    /// The VM was released. Final.
    Released,
    /// Allocation or release failed. Final.
    Failed,
    /// The reaper released the VM because the session was idle or too old. Final.
    Expired,
}

impl SessionState {
    /// Whether the session has ended (`Released`, `Failed` or `Expired`).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            SessionState::Released | SessionState::Failed | SessionState::Expired
        )
    }
}

impl fmt::Display for SessionState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SessionState::Allocating => "allocating",
            SessionState::Active => "active",
            SessionState::Releasing => "releasing",
            SessionState::Released => "released",
            SessionState::Failed => "failed",
            SessionState::Expired => "expired",
        })
    }
}

/// A request for a session.
#[derive(Debug, Clone)]
pub struct SessionRequest {
    /// The session's id; unique among the sessions that have not ended.
    pub session_id: String,
    /// The run the session belongs to.
    pub run_id: String,
    /// The workflow's name, for logs and listings.
    pub workflow: String,
    /// What VM to allocate.
    pub spec: VmSpec,
}

/// A snapshot of one session.
#[derive(Clone, Debug)]
pub struct SessionInfo {
    /// The session's id.
    pub id: String,
    /// The run it belongs to.
    pub run_id: String,
    /// The workflow's name.
    pub workflow: String,
    /// The VM's id, once allocated.
    pub vm_id: Option<String>,
    /// The backend's name.
    pub backend: &'static str,
    /// The lifecycle state.
    pub state: SessionState,
    /// When the session was requested (after its slot was granted).
    pub started_at: SystemTime,
    /// The last sign of activity: allocation or [`SessionGuard::touch`].
    pub last_activity: SystemTime,
    /// How long the backend took to allocate the VM.
    pub allocation_time: Option<Duration>,
    /// When the session reached a final state.
    pub ended_at: Option<SystemTime>,
}

/// Errors of the session manager.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// `on_limit = fail` and every slot is taken.
    #[error("Session limit reached: {limit} of {limit} sessions are active (on_limit = fail)")]
    LimitReached {
        /// `max_sessions`.
        limit: usize,
    },
    /// A session with this id has not ended yet.
    #[error("Session {session} already exists")]
    Duplicate {
        /// The session id.
        session: String,
    },
    /// The backend could not allocate a VM.
    #[error("Could not allocate a VM for session {session}")]
    Allocation {
        /// The session id.
        session: String,
        /// The backend's error.
        #[source]
        source: VmError,
    },
    /// The allocation task ended without an answer (the backend panicked, or the runtime is
    /// shutting down).
    #[error("Allocation of a VM for session {session} was aborted")]
    AllocationAborted {
        /// The session id.
        session: String,
    },
    /// The backend could not release the VM; the session is `Failed`.
    #[error("Could not release VM {vm} of session {session}")]
    Release {
        /// The session id.
        session: String,
        /// The VM id.
        vm: String,
        /// The backend's error.
        #[source]
        source: VmError,
    },
    /// The release task ended without an answer (the runtime is shutting down).
    #[error("Release of session {session} was aborted")]
    ReleaseAborted {
        /// The session id.
        session: String,
    },
    /// The reaper expired the session and released its VM.
    #[error("Session {session} expired and its VM was released")]
    Expired {
        /// The session id.
        session: String,
    },
    /// The session is not active.
    #[error("Session {session} is {state}, not active")]
    NotActive {
        /// The session id.
        session: String,
        /// Its state.
        state: SessionState,
    },
    /// `on_limit` is neither `wait` nor `fail`.
    #[error("Invalid on_limit value `{value}` (expected wait or fail)")]
    InvalidOnLimit {
        /// What was given.
        value: String,
    },
}

/// Hands out sessions (one VM each), enforces the session limit and expires stale sessions.
///
/// Cheap to clone; clones share one table and one limit.
#[derive(Clone)]
pub struct SessionManager {
    inner: Arc<Inner>,
    /// Only [`SessionManager`] handles hold this; the reaper stops once it is gone.
    handles: Arc<()>,
}

impl fmt::Debug for SessionManager {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionManager")
            .field("backend", &self.inner.provider.name())
            .field("config", &self.inner.config)
            .field("active", &self.active_count())
            .finish()
    }
}

impl SessionManager {
    /// A manager allocating VMs from `provider`; every allocation reports source `cold`.
    pub fn new(provider: Arc<dyn VmProvider>, config: SessionConfig) -> SessionManager {
        SessionManager::build(provider, None, config)
    }

    /// A manager allocating VMs from pools, the ready snapshot or cold boots (see
    /// [`crate::pool`]); [`SessionGuard::source`] says which.
    pub fn with_pools(pooled: Arc<PooledProvider>, config: SessionConfig) -> SessionManager {
        SessionManager::build(pooled.clone(), Some(pooled), config)
    }

    fn build(
        provider: Arc<dyn VmProvider>,
        pooled: Option<Arc<PooledProvider>>,
        config: SessionConfig,
    ) -> SessionManager {
        let mut config = config;
        let limit = config.max_sessions.clamp(1, Semaphore::MAX_PERMITS);
        if limit != config.max_sessions {
            warn!(
                "max_sessions = {} is out of range; using {limit}",
                config.max_sessions
            );
            config.max_sessions = limit;
        }
        SessionManager {
            inner: Arc::new(Inner {
                provider,
                pooled,
                limit: Arc::new(Semaphore::new(limit)),
                config,
                table: Mutex::new(Table::default()),
                next_serial: AtomicU64::new(1),
            }),
            handles: Arc::new(()),
        }
    }

    /// The backend sessions are allocated from.
    pub fn provider(&self) -> &Arc<dyn VmProvider> {
        &self.inner.provider
    }

    /// The pools, when the manager was made [`with_pools`](SessionManager::with_pools).
    pub fn pooled(&self) -> Option<&Arc<PooledProvider>> {
        self.inner.pooled.as_ref()
    }

    /// The settings in effect (`max_sessions` clamped to at least 1).
    pub fn config(&self) -> &SessionConfig {
        &self.inner.config
    }

    /// Takes a slot, allocates one VM and binds it to a new session.
    ///
    /// At the limit this waits for a slot or fails with [`SessionError::LimitReached`], as
    /// `on_limit` says. Cancelling the returned future leaks neither a slot nor a VM.
    pub async fn create_session(
        &self,
        request: SessionRequest,
    ) -> Result<SessionGuard, SessionError> {
        self.create(request, None).await
    }

    /// As [`create_session`](Self::create_session), but the session's VM is restored from
    /// `snapshot` (a fresh VM in the saved state) instead of allocated for the request's spec.
    /// Its `source` is `snapshot`.
    pub async fn create_session_from(
        &self,
        request: SessionRequest,
        snapshot: kiln_vm::VmSnapshot,
    ) -> Result<SessionGuard, SessionError> {
        self.create(request, Some(snapshot)).await
    }

    async fn create(
        &self,
        request: SessionRequest,
        restore: Option<kiln_vm::VmSnapshot>,
    ) -> Result<SessionGuard, SessionError> {
        let inner = &self.inner;
        let limit = inner.config.max_sessions;
        // Checked again under the lock below; this only spares a duplicate the wait for a slot.
        if inner.lock().live.contains_key(&request.session_id) {
            return Err(SessionError::Duplicate {
                session: request.session_id,
            });
        }
        let permit = match inner.config.on_limit {
            OnLimit::Fail => inner
                .limit
                .clone()
                .try_acquire_owned()
                .map_err(|_| SessionError::LimitReached { limit })?,
            OnLimit::Wait => {
                if inner.limit.available_permits() == 0 {
                    info!(
                        "Session {} waits for a free slot ({limit} of {limit} sessions are active)",
                        request.session_id
                    );
                }
                // The semaphore is never closed, so this only returns once a slot is free.
                inner
                    .limit
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|_| SessionError::LimitReached { limit })?
            }
        };

        let serial = inner.next_serial.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now();
        let info = SessionInfo {
            id: request.session_id.clone(),
            run_id: request.run_id.clone(),
            workflow: request.workflow.clone(),
            vm_id: None,
            backend: inner.provider.name(),
            state: SessionState::Allocating,
            started_at: now,
            last_activity: now,
            allocation_time: None,
            ended_at: None,
        };
        {
            let mut table = inner.lock();
            if table.live.contains_key(&request.session_id) {
                return Err(SessionError::Duplicate {
                    session: request.session_id,
                });
            }
            let started = Instant::now();
            table.live.insert(
                request.session_id.clone(),
                Entry {
                    info,
                    serial,
                    vm: None,
                    permit: Some(permit),
                    done: watch::Sender::new(false),
                    started,
                    touched: started,
                },
            );
        }

        let session = request.session_id.clone();
        let span = info_span!("session", session = %request.session_id, run = %request.run_id);
        let registration = Registration {
            inner: Arc::clone(inner),
            id: request.session_id,
            serial,
            armed: true,
        };
        let work = Inner::allocate(registration, request.spec, restore);
        match Handle::try_current() {
            Ok(handle) => {
                let (tx, rx) = oneshot::channel();
                handle.spawn(
                    async move {
                        if let Err(Ok(guard)) = tx.send(work.await) {
                            debug!("The caller stopped waiting; releasing the new session");
                            drop(guard);
                        }
                    }
                    .instrument(span),
                );
                match rx.await {
                    Ok(result) => result,
                    Err(_) => {
                        // The task is gone (the backend panicked). Its registration cleans up
                        // as it drops; doing it here too makes the slot's return visible now.
                        inner.fail_allocation(&session, serial);
                        Err(SessionError::AllocationAborted { session })
                    }
                }
            }
            Err(_) => work.instrument(span).await,
        }
    }

    /// Releases the session's VM and returns the session's final state.
    ///
    /// Idempotent: if the reaper already expired the session, nothing is done and the
    /// `Expired` info is returned. The release finishes even if this future is dropped.
    pub async fn release_session(
        &self,
        mut guard: SessionGuard,
    ) -> Result<SessionInfo, SessionError> {
        let session = guard.id.clone();
        let pending = guard.take_release(SessionState::Released);
        match Handle::try_current() {
            Ok(handle) => handle
                .spawn(pending.run())
                .await
                .unwrap_or(Err(SessionError::ReleaseAborted { session })),
            Err(_) => pending.run().await,
        }
    }

    /// A snapshot of the live sessions and the most recently ended ones, oldest first.
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let table = self.inner.lock();
        let mut all: Vec<SessionInfo> = table
            .live
            .values()
            .map(|entry| entry.info.clone())
            .chain(table.ended.iter().cloned())
            .collect();
        drop(table);
        all.sort_by_key(|info| info.started_at);
        all
    }

    /// How many sessions hold a slot (allocating, active or releasing).
    pub fn active_count(&self) -> usize {
        self.inner
            .lock()
            .live
            .values()
            .filter(|entry| !entry.info.state.is_final())
            .count()
    }

    /// How many more sessions could start now without waiting.
    pub fn available_slots(&self) -> usize {
        self.inner.limit.available_permits()
    }

    /// Starts the task that expires sessions idle for longer than `idle_timeout` or older than
    /// `max_lifetime`, every `reaper_interval`. Expiring releases the VM (killing what runs in
    /// it) and marks the session `Expired`.
    ///
    /// The task ends once every [`SessionManager`] handle is dropped, or at once if neither
    /// timeout is set.
    ///
    /// # Panics
    /// Outside a tokio runtime, as [`tokio::spawn`] does.
    pub fn spawn_reaper(&self) -> tokio::task::JoinHandle<()> {
        let handles = Arc::downgrade(&self.handles);
        let inner: Weak<Inner> = Arc::downgrade(&self.inner);
        let config = self.inner.config.clone();
        tokio::spawn(async move {
            if config.idle_timeout.is_none() && config.max_lifetime.is_none() {
                debug!("Session reaper not started: no idle_timeout or max_lifetime");
                return;
            }
            let period = config.reaper_interval.max(Duration::from_millis(1));
            let mut ticker = tokio::time::interval(period);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticker.tick().await;
                if handles.strong_count() == 0 {
                    break;
                }
                let Some(inner) = inner.upgrade() else { break };
                inner.reap().await;
            }
            debug!("Session reaper stopped: the session manager is gone");
        })
    }
}

/// A live session. Holds its VM; dropping the guard releases the VM.
///
/// Prefer [`SessionManager::release_session`], which reports the outcome; `Drop` releases in
/// the background (or, without a tokio runtime, by dropping every handle to the VM).
#[must_use = "dropping a SessionGuard releases its VM at once"]
pub struct SessionGuard {
    inner: Arc<Inner>,
    id: String,
    serial: u64,
    /// `Some` until the guard is released or dropped.
    vm: Option<Arc<dyn Vm>>,
    vm_id: String,
    allocation_time: Duration,
    source: AllocationSource,
    /// The info as of allocation, for [`SessionGuard::info`] should the table lose it.
    snapshot: SessionInfo,
}

impl fmt::Debug for SessionGuard {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionGuard")
            .field("id", &self.id)
            .field("vm", &self.vm_id)
            .finish()
    }
}

impl SessionGuard {
    /// The session's id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The VM bound to this session.
    pub fn vm(&self) -> &Arc<dyn Vm> {
        self.vm
            .as_ref()
            .expect("a SessionGuard holds its VM until it is released or dropped")
    }

    /// The VM's id.
    pub fn vm_id(&self) -> &str {
        &self.vm_id
    }

    /// How long the backend took to allocate the VM.
    pub fn allocation_time(&self) -> Duration {
        self.allocation_time
    }

    /// How the VM came: from a pool, restored from a snapshot, or booted.
    pub fn source(&self) -> AllocationSource {
        self.source
    }

    /// Records activity now, which keeps the reaper's `idle_timeout` away. The executor calls
    /// it at least once per step.
    pub fn touch(&self) {
        let mut table = self.inner.lock();
        if let Some(entry) = table.entry_mut(&self.id, self.serial)
            && entry.info.state == SessionState::Active
        {
            entry.info.last_activity = SystemTime::now();
            entry.touched = Instant::now();
        }
    }

    /// The session's current state and times.
    pub fn info(&self) -> SessionInfo {
        let mut table = self.inner.lock();
        match table.entry_mut(&self.id, self.serial) {
            Some(entry) => entry.info.clone(),
            None => self.snapshot.clone(),
        }
    }

    /// `Ok` while the session is active; [`SessionError::Expired`] once the reaper expired it.
    pub fn ensure_active(&self) -> Result<(), SessionError> {
        match self.info().state {
            SessionState::Active => Ok(()),
            SessionState::Expired => Err(SessionError::Expired {
                session: self.id.clone(),
            }),
            state => Err(SessionError::NotActive {
                session: self.id.clone(),
                state,
            }),
        }
    }

    /// Turns the guard into the work of releasing it; the guard's `Drop` then does nothing.
    fn take_release(&mut self, target: SessionState) -> PendingRelease {
        PendingRelease {
            inner: Arc::clone(&self.inner),
            id: self.id.clone(),
            serial: self.serial,
            target,
            vm: self.vm.take(),
            completed: false,
        }
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        if self.vm.is_none() {
            return; // Released through release_session.
        }
        let pending = self.take_release(SessionState::Released);
        match Handle::try_current() {
            Ok(handle) => {
                debug!(session = %self.id, "Session guard dropped; releasing its VM");
                // If the runtime is shutting down the task is dropped unrun, and
                // PendingRelease's own Drop releases synchronously instead.
                drop(
                    handle.spawn(
                        async move {
                            if let Err(err) = pending.run().await {
                                error!("{}", ErrorChain(&err));
                            }
                        }
                        .instrument(info_span!("session", session = %self.id)),
                    ),
                );
            }
            Err(_) => {
                warn!(
                    session = %self.id,
                    "Session guard dropped outside a tokio runtime; releasing its VM by dropping it"
                );
                drop(pending);
            }
        }
    }
}

/// Shared state of a [`SessionManager`] and its guards.
struct Inner {
    provider: Arc<dyn VmProvider>,
    /// The same provider as `provider` when it is a [`PooledProvider`], for sources.
    pooled: Option<Arc<PooledProvider>>,
    config: SessionConfig,
    limit: Arc<Semaphore>,
    table: Mutex<Table>,
    next_serial: AtomicU64,
}

#[derive(Default)]
struct Table {
    /// Sessions not yet ended, and ended ones whose guard still exists.
    live: HashMap<String, Entry>,
    /// The most recently ended sessions whose guard is gone, oldest first.
    ended: VecDeque<SessionInfo>,
}

impl Table {
    fn entry_mut(&mut self, id: &str, serial: u64) -> Option<&mut Entry> {
        self.live.get_mut(id).filter(|entry| entry.serial == serial)
    }

    /// Moves an entry to the history. Returns its VM handle and permit, so that the caller
    /// drops them after unlocking (VM first, then permit).
    fn retire(&mut self, id: &str) -> (Option<Arc<dyn Vm>>, Option<OwnedSemaphorePermit>) {
        let Some(mut entry) = self.live.remove(id) else {
            return (None, None);
        };
        if entry.info.ended_at.is_none() {
            entry.info.ended_at = Some(SystemTime::now());
        }
        entry.done.send_replace(true);
        if self.ended.len() == ENDED_HISTORY {
            self.ended.pop_front();
        }
        self.ended.push_back(entry.info);
        (entry.vm, entry.permit)
    }

    fn ended_info(&self, id: &str) -> Option<SessionInfo> {
        self.ended.iter().rev().find(|info| info.id == id).cloned()
    }
}

struct Entry {
    info: SessionInfo,
    /// Tells apart sessions that reuse an id after an earlier one ended.
    serial: u64,
    vm: Option<Arc<dyn Vm>>,
    /// The session's slot; dropped only after its VM is released.
    permit: Option<OwnedSemaphorePermit>,
    /// Becomes `true` when the session reaches a final state.
    done: watch::Sender<bool>,
    started: Instant,
    touched: Instant,
}

/// What [`Inner::finish`] found under the lock.
enum Step {
    Release(Arc<dyn Vm>),
    Wait(watch::Receiver<bool>),
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Table> {
        // A panic while holding the lock cannot leave the table half-updated (every update is
        // a few field writes), so a poisoned lock is still consistent.
        self.table
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Allocates the VM of a registered (`Allocating`) session.
    async fn allocate(
        mut registration: Registration,
        spec: VmSpec,
        restore: Option<kiln_vm::VmSnapshot>,
    ) -> Result<SessionGuard, SessionError> {
        let inner = Arc::clone(&registration.inner);
        let id = registration.id.clone();
        let serial = registration.serial;
        let restoring = restore.is_some();
        let allocated = match &restore {
            Some(snapshot) => inner.provider.restore(snapshot).await,
            None => inner.provider.allocate(&spec).await,
        };
        match allocated {
            Ok(allocation) => {
                let vm = allocation.vm;
                let vm_id = vm.id().to_owned();
                let snapshot = {
                    let mut table = inner.lock();
                    table.entry_mut(&id, serial).map(|entry| {
                        entry.info.state = SessionState::Active;
                        entry.info.vm_id = Some(vm_id.clone());
                        entry.info.allocation_time = Some(allocation.elapsed);
                        entry.info.last_activity = SystemTime::now();
                        entry.touched = Instant::now();
                        entry.vm = Some(Arc::clone(&vm));
                        entry.info.clone()
                    })
                };
                registration.armed = false;
                let Some(snapshot) = snapshot else {
                    // Only this task retires an allocating session, so this does not happen;
                    // should it, the VM must not outlive the failed session.
                    let _ = inner.provider.release(&*vm).await;
                    return Err(SessionError::AllocationAborted { session: id });
                };
                info!(
                    "Allocated VM {vm_id} in {} ms for session {id}",
                    allocation.elapsed.as_millis()
                );
                let source = if restoring {
                    AllocationSource::Snapshot
                } else {
                    inner
                        .pooled
                        .as_ref()
                        .map_or(AllocationSource::Cold, |p| p.source_of(&vm_id))
                };
                Ok(SessionGuard {
                    inner,
                    id,
                    serial,
                    vm: Some(vm),
                    vm_id,
                    allocation_time: allocation.elapsed,
                    source,
                    snapshot,
                })
            }
            Err(source) => {
                registration.armed = false;
                let (_, permit) = {
                    let mut table = inner.lock();
                    if let Some(entry) = table.entry_mut(&id, serial) {
                        entry.info.state = SessionState::Failed;
                    }
                    table.retire(&id)
                };
                drop(permit);
                let err = SessionError::Allocation {
                    session: id,
                    source,
                };
                error!("{}", ErrorChain(&err));
                Err(err)
            }
        }
    }

    /// Brings session `id` to a final state, releasing its VM if it is active.
    ///
    /// `target` is the final state on success (`Released`, or `Expired` for the reaper). With
    /// `retire` (the guard's own release) the entry moves to the history; the reaper leaves it
    /// for the guard to retire.
    async fn finish(
        &self,
        id: &str,
        serial: u64,
        target: SessionState,
        retire: bool,
    ) -> Result<SessionInfo, SessionError> {
        loop {
            let step = {
                let mut table = self.lock();
                let Some(entry) = table.entry_mut(id, serial) else {
                    return table.ended_info(id).ok_or(SessionError::NotActive {
                        session: id.to_owned(),
                        state: SessionState::Released,
                    });
                };
                match entry.info.state {
                    SessionState::Active => match entry.vm.clone() {
                        Some(vm) => {
                            entry.info.state = SessionState::Releasing;
                            Step::Release(vm)
                        }
                        None => {
                            // An active entry always has its VM; treat a missing one as gone.
                            entry.info.state = target;
                            continue;
                        }
                    },
                    SessionState::Allocating | SessionState::Releasing => {
                        Step::Wait(entry.done.subscribe())
                    }
                    SessionState::Released | SessionState::Failed | SessionState::Expired => {
                        let info = entry.info.clone();
                        let (vm, permit) = if retire {
                            table.retire(id)
                        } else {
                            (None, None)
                        };
                        drop(table);
                        drop(vm);
                        drop(permit);
                        return Ok(info);
                    }
                }
            };
            match step {
                Step::Wait(mut done) => {
                    // An error means the entry is gone; the next round finds it in the history.
                    let _ = done.wait_for(|done| *done).await;
                }
                Step::Release(vm) => return self.release_vm(id, serial, vm, target, retire).await,
            }
        }
    }

    /// The `Releasing` step of [`Inner::finish`], for the one caller that flipped the state.
    async fn release_vm(
        &self,
        id: &str,
        serial: u64,
        vm: Arc<dyn Vm>,
        target: SessionState,
        retire: bool,
    ) -> Result<SessionInfo, SessionError> {
        let result = self.provider.release(&*vm).await;
        let state = if result.is_ok() {
            target
        } else {
            SessionState::Failed
        };
        let (info, entry_vm, permit) = {
            let mut table = self.lock();
            let Some(entry) = table.entry_mut(id, serial) else {
                // Abandoned meanwhile (its guard's release task was dropped); already retired.
                drop(table);
                return result
                    .map(|()| self.fallback_info(id, &vm, state))
                    .map_err(|source| SessionError::Release {
                        session: id.to_owned(),
                        vm: vm.id().to_owned(),
                        source,
                    });
            };
            entry.info.state = state;
            entry.info.ended_at = Some(SystemTime::now());
            entry.done.send_replace(true);
            let info = entry.info.clone();
            if retire {
                let (entry_vm, permit) = table.retire(id);
                (info, entry_vm, permit)
            } else {
                (info, entry.vm.take(), entry.permit.take())
            }
        };
        // The VM is gone now; only then may the slot go to someone else.
        drop(entry_vm);
        drop(permit);
        match result {
            Ok(()) => {
                match state {
                    SessionState::Expired => info!("Expired session {id}; released VM {}", vm.id()),
                    _ => info!("Released VM {} of session {id}", vm.id()),
                }
                Ok(info)
            }
            Err(source) => Err(SessionError::Release {
                session: id.to_owned(),
                vm: vm.id().to_owned(),
                source,
            }),
        }
    }

    fn fallback_info(&self, id: &str, vm: &Arc<dyn Vm>, state: SessionState) -> SessionInfo {
        self.lock().ended_info(id).unwrap_or_else(|| {
            let now = SystemTime::now();
            SessionInfo {
                id: id.to_owned(),
                run_id: String::new(),
                workflow: String::new(),
                vm_id: Some(vm.id().to_owned()),
                backend: self.provider.name(),
                state,
                started_at: now,
                last_activity: now,
                allocation_time: None,
                ended_at: Some(now),
            }
        })
    }

    /// Marks a session whose allocation was aborted `Failed` and returns its slot. Does
    /// nothing if it is no longer allocating.
    fn fail_allocation(&self, id: &str, serial: u64) {
        let (vm, permit) = {
            let mut table = self.lock();
            match table.entry_mut(id, serial) {
                Some(entry) if entry.info.state == SessionState::Allocating => {
                    entry.info.state = SessionState::Failed;
                    table.retire(id)
                }
                _ => (None, None),
            }
        };
        drop(vm);
        drop(permit);
    }

    /// Synchronous last resort: retires the session and drops every handle to its VM, then
    /// its permit. Backends kill and clean up in their `Drop`.
    fn abandon(&self, id: &str, serial: u64) {
        let (vm, permit) = {
            let mut table = self.lock();
            match table.entry_mut(id, serial) {
                Some(entry) => {
                    if !entry.info.state.is_final() {
                        entry.info.state = SessionState::Released;
                    }
                    table.retire(id)
                }
                None => (None, None),
            }
        };
        drop(vm);
        drop(permit);
    }

    /// One reaper round: expires every active session past `idle_timeout` or `max_lifetime`.
    async fn reap(&self) {
        let now = Instant::now();
        let due: Vec<(String, u64, String)> = {
            let table = self.lock();
            table
                .live
                .iter()
                .filter(|(_, entry)| entry.info.state == SessionState::Active)
                .filter_map(|(id, entry)| {
                    let idle = now.saturating_duration_since(entry.touched);
                    let age = now.saturating_duration_since(entry.started);
                    let reason = match (self.config.idle_timeout, self.config.max_lifetime) {
                        (Some(limit), _) if idle >= limit => {
                            format!("idle for {} ms", idle.as_millis())
                        }
                        (_, Some(limit)) if age >= limit => {
                            format!("older than {} ms", limit.as_millis())
                        }
                        _ => return None,
                    };
                    Some((id.clone(), entry.serial, reason))
                })
                .collect()
        };
        for (id, serial, reason) in due {
            info!("Session {id} expires: {reason}");
            if let Err(err) = self
                .finish(&id, serial, SessionState::Expired, false)
                .instrument(info_span!("session", session = %id))
                .await
            {
                error!("{}", ErrorChain(&err));
            }
        }
    }
}

/// A session registered as `Allocating`. Dropped while armed (a panicking backend, a runtime
/// shutting down), it marks the session `Failed` and returns its slot.
struct Registration {
    inner: Arc<Inner>,
    id: String,
    serial: u64,
    armed: bool,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        warn!(session = %self.id, "Allocation aborted; the session failed");
        self.inner.fail_allocation(&self.id, self.serial);
    }
}

/// The release of one session, taken out of its guard. Runs as a task; if the task is
/// dropped before it completes, `Drop` falls back to [`Inner::abandon`].
struct PendingRelease {
    inner: Arc<Inner>,
    id: String,
    serial: u64,
    target: SessionState,
    /// The guard's handle to the VM, dropped once the release is over.
    vm: Option<Arc<dyn Vm>>,
    completed: bool,
}

impl PendingRelease {
    async fn run(mut self) -> Result<SessionInfo, SessionError> {
        let result = self
            .inner
            .finish(&self.id, self.serial, self.target, true)
            .await;
        self.completed = true;
        result
    }
}

impl Drop for PendingRelease {
    fn drop(&mut self) {
        if self.completed {
            return;
        }
        // Drop the guard's VM handle first so that, once the table's is gone too, the VM's own
        // Drop runs before the permit returns.
        drop(self.vm.take());
        self.inner.abandon(&self.id, self.serial);
    }
}

/// Formats an error with its sources, `outer: inner: innermost`, for log lines.
struct ErrorChain<'a>(&'a (dyn std::error::Error + 'static));

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::path::Path;

    use async_trait::async_trait;
    use kiln_vm::{Allocation, ExecOutcome, ExecRequest, OutputSink};

    /// A bookkeeping-only backend: its VMs run nothing. It exists to drive the manager into
    /// the failure paths a real backend rarely takes (a panicking allocate, a failing release).
    #[derive(Default)]
    struct Fake {
        panic_on_allocate: bool,
        fail_release: bool,
        released: std::sync::atomic::AtomicUsize,
    }

    #[derive(Debug)]
    struct FakeVm(String);

    #[async_trait]
    impl VmProvider for Fake {
        fn name(&self) -> &'static str {
            "fake"
        }
        fn isolates(&self) -> bool {
            false
        }
        async fn allocate(&self, _spec: &VmSpec) -> Result<Allocation, VmError> {
            assert!(!self.panic_on_allocate, "backend bug");
            Ok(Allocation {
                vm: Arc::new(FakeVm("fake-1".into())),
                elapsed: Duration::from_millis(7),
            })
        }
        async fn release(&self, vm: &dyn Vm) -> Result<(), VmError> {
            self.released.fetch_add(1, Ordering::SeqCst);
            if self.fail_release {
                return Err(VmError::Io {
                    vm: vm.id().to_owned(),
                    op: "removing /run/fake".into(),
                    source: std::io::Error::other("device busy"),
                });
            }
            Ok(())
        }
    }

    #[async_trait]
    impl Vm for FakeVm {
        fn id(&self) -> &str {
            &self.0
        }
        fn backend(&self) -> &'static str {
            "fake"
        }
        fn work_root(&self) -> &str {
            "/nowhere"
        }
        async fn exec(&self, _: ExecRequest, _: OutputSink) -> Result<ExecOutcome, VmError> {
            Err(self.unsupported())
        }
        async fn kill_all(&self) -> Result<(), VmError> {
            Ok(())
        }
        async fn copy_in(&self, _: &Path, _: &str) -> Result<(), VmError> {
            Err(self.unsupported())
        }
        async fn copy_out(&self, _: &str, _: &Path) -> Result<(), VmError> {
            Err(self.unsupported())
        }
        async fn write_file(&self, _: &str, _: &[u8]) -> Result<(), VmError> {
            Err(self.unsupported())
        }
        async fn read_file(&self, _: &str) -> Result<Vec<u8>, VmError> {
            Err(self.unsupported())
        }
        async fn release(&self) -> Result<(), VmError> {
            Ok(())
        }
    }

    impl FakeVm {
        fn unsupported(&self) -> VmError {
            VmError::Unsupported {
                backend: "fake",
                what: "running anything".into(),
            }
        }
    }

    fn request(id: &str) -> SessionRequest {
        SessionRequest {
            session_id: id.into(),
            run_id: "run".into(),
            workflow: "wf".into(),
            spec: VmSpec::default(),
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_panicking_allocate_fails_the_session_and_returns_its_slot() {
        let fake = Fake {
            panic_on_allocate: true,
            ..Fake::default()
        };
        let manager = SessionManager::new(Arc::new(fake), SessionConfig::default());
        let err = manager.create_session(request("s")).await.unwrap_err();
        assert!(
            matches!(err, SessionError::AllocationAborted { .. }),
            "{err}"
        );
        assert_eq!(manager.available_slots(), 4);
        assert_eq!(manager.active_count(), 0);
        assert_eq!(manager.sessions()[0].state, SessionState::Failed);
    }

    #[tokio::test]
    async fn a_failed_release_ends_failed_reports_why_and_returns_the_slot() {
        let fake = Arc::new(Fake {
            fail_release: true,
            ..Fake::default()
        });
        let manager = SessionManager::new(fake.clone(), SessionConfig::default());
        let guard = manager.create_session(request("s")).await.unwrap();
        assert_eq!(guard.allocation_time(), Duration::from_millis(7));
        assert_eq!(manager.available_slots(), 3);
        let err = manager.release_session(guard).await.unwrap_err();
        assert_eq!(
            ErrorChain(&err).to_string(),
            "Could not release VM fake-1 of session s: removing /run/fake for VM fake-1 failed: \
             device busy"
        );
        assert_eq!(manager.available_slots(), 4);
        assert_eq!(manager.sessions()[0].state, SessionState::Failed);
        assert_eq!(fake.released.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn max_sessions_zero_means_one() {
        let config = SessionConfig {
            max_sessions: 0,
            on_limit: OnLimit::Fail,
            ..SessionConfig::default()
        };
        let manager = SessionManager::new(Arc::new(Fake::default()), config);
        assert_eq!(manager.config().max_sessions, 1);
        let guard = manager.create_session(request("a")).await.unwrap();
        let err = manager.create_session(request("b")).await.unwrap_err();
        assert!(matches!(err, SessionError::LimitReached { limit: 1 }));
        manager.release_session(guard).await.unwrap();
    }

    #[test]
    fn on_limit_parses_wait_and_fail_and_rejects_the_rest() {
        assert_eq!("wait".parse::<OnLimit>().ok(), Some(OnLimit::Wait));
        assert_eq!("fail".parse::<OnLimit>().ok(), Some(OnLimit::Fail));
        let err = "queue".parse::<OnLimit>().err().map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some("Invalid on_limit value `queue` (expected wait or fail)")
        );
        assert_eq!(OnLimit::Wait.to_string(), "wait");
        assert_eq!(OnLimit::Fail.to_string(), "fail");
    }

    #[test]
    fn default_config_matches_the_documented_defaults() {
        let config = SessionConfig::default();
        assert_eq!(config.max_sessions, 4);
        assert_eq!(config.on_limit, OnLimit::Wait);
        assert_eq!(config.idle_timeout, None);
        assert_eq!(config.max_lifetime, None);
        assert_eq!(config.reaper_interval, Duration::from_secs(1));
    }

    #[test]
    fn limit_message_names_the_limit_and_the_mode() {
        let err = SessionError::LimitReached { limit: 2 };
        assert_eq!(
            err.to_string(),
            "Session limit reached: 2 of 2 sessions are active (on_limit = fail)"
        );
    }

    #[test]
    fn only_released_failed_and_expired_are_final() {
        use SessionState::*;
        let finals: Vec<_> = [Allocating, Active, Releasing, Released, Failed, Expired]
            .into_iter()
            .filter(|s| s.is_final())
            .collect();
        assert_eq!(finals, vec![Released, Failed, Expired]);
    }

    #[test]
    fn error_chain_joins_sources() {
        let err = SessionError::Allocation {
            session: "s1".into(),
            source: VmError::Boot {
                vm: "local-1".into(),
                reason: "no space".into(),
            },
        };
        assert_eq!(
            ErrorChain(&err).to_string(),
            "Could not allocate a VM for session s1: VM local-1 failed to start: no space"
        );
    }
}
