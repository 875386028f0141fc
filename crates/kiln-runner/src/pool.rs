//! Where session VMs come from: warm pools, the ready snapshot, or a cold boot.
//!
//! [`PooledProvider`] wraps a backend's [`VmProvider`] and is handed to the
//! [`SessionManager`](crate::session::SessionManager) like any provider. For each allocation it
//! records the [`AllocationSource`] the `session_allocated` event reports:
//! - **`pool`**: a pre-warmed VM from the [`VmPool`] of the spec's VM type;
//! - **`snapshot`**: restored on demand from the backend's ready snapshot (stored with the
//!   image, created on first use), when the VM type has no pool or its pool is exhausted;
//! - **`cold`**: booted, with `--cold`, on a backend without snapshots, or when a restore
//!   failed.
//!
//! # A pool
//! A [`VmPool`] serves one VM type (image plus size). It has `max_total` *slots*, numbered from
//! 0; each holds at most one VM. A slot is
//!
//! ```text
//!   ┌───────┐ refill (idle + warming < min_idle)  ┌─────────┐ restored   ┌──────┐ take  ┌──────┐
//!   │ Empty │────────────────────────────────────▶│ Warming │──────────▶│ Idle │──────▶│ Busy │
//!   └───────┘                                     └─────────┘           └──────┘       └──────┘
//!     ▲  ▲          restore failed: VM discarded, slot counted failed │                    │
//!     │  └────────────────────────────────────────────────────────────┘                    │
//!     └──────────────────── released: the VM is destroyed, never reused ───────────────────┘
//! ```
//!
//! A background task keeps `min_idle` slots idle or warming (never more than `max_total` VMs in
//! all). A VM is never handed out twice: release destroys it and empties its slot, which the
//! refill restores again from the clean snapshot; the slot number is what is recycled. A
//! restore that fails is discarded, counted in [`PoolStatus::failed`], and retried after a
//! growing pause; after two failures in a row the snapshot itself is deleted so the backend
//! makes a new one, and on a backend without snapshots the pool boots its VMs cold.
//!
//! When no slot is idle, [`VmPool::take`] waits for a warming one; when none is warming either
//! and a slot is empty, it restores into that slot on demand (`snapshot`); when every slot is
//! busy it waits for a release.
//!
//! # Strategies
//! Which idle VM [`VmPool::take`] hands out:
//! - **`fifo`** (default): the VM that became ready first.
//! - **`lru`**: the VM in the slot whose last hand-out is oldest; slots never handed out come
//!   first, lowest number first. This spreads use evenly over slots (and their ids).
//! - **`round-robin`**: slots in turn: the first idle slot after the one handed out last,
//!   wrapping around.
//!
//! # Ownership
//! Each pool's state (its slots) has one owner, a `std::sync::Mutex` held only to read or flip
//! a slot, never across an `.await`. A [`tokio::sync::Notify`] wakes the refill task and
//! waiting callers on every change.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use kiln_vm::{Allocation, Vm, VmError, VmProvider, VmSnapshot, VmSpec};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::metrics::Metrics;

/// How a session's VM came to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AllocationSource {
    /// Pre-warmed, from a pool.
    Pool,
    /// Restored on demand from a snapshot.
    Snapshot,
    /// Booted.
    Cold,
}

impl AllocationSource {
    /// `pool`, `snapshot` or `cold`.
    pub fn as_str(self) -> &'static str {
        match self {
            AllocationSource::Pool => "pool",
            AllocationSource::Snapshot => "snapshot",
            AllocationSource::Cold => "cold",
        }
    }
}

impl fmt::Display for AllocationSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which idle VM a pool hands out (see the module docs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Strategy {
    /// The VM that became ready first.
    #[default]
    Fifo,
    /// The slot whose last hand-out is oldest.
    Lru,
    /// Slots in turn.
    RoundRobin,
}

impl FromStr for Strategy {
    type Err = PoolError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "fifo" => Ok(Strategy::Fifo),
            "lru" => Ok(Strategy::Lru),
            "round-robin" => Ok(Strategy::RoundRobin),
            other => Err(PoolError::InvalidStrategy {
                value: other.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Strategy::Fifo => "fifo",
            Strategy::Lru => "lru",
            Strategy::RoundRobin => "round-robin",
        })
    }
}

/// Settings of one pool (`[pool.NAME]`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolConfig {
    /// VMs kept idle or warming.
    pub min_idle: usize,
    /// VMs in the pool at most (idle, warming and busy).
    pub max_total: usize,
    /// Which idle VM is handed out.
    pub strategy: Strategy,
}

impl PoolConfig {
    /// Checks the sizes: `max_total` at least 1 and at least `min_idle`.
    pub fn validate(&self) -> Result<(), PoolError> {
        if self.max_total == 0 || self.min_idle > self.max_total {
            return Err(PoolError::InvalidSize {
                min_idle: self.min_idle,
                max_total: self.max_total,
            });
        }
        Ok(())
    }
}

/// Errors of pools.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// Not `fifo`, `lru` or `round-robin`.
    #[error("Unknown pool strategy `{value}` (expected fifo, lru or round-robin)")]
    InvalidStrategy {
        /// What was given.
        value: String,
    },
    /// `max_total` is 0 or below `min_idle`.
    #[error("Pool sizes are inconsistent: min_idle = {min_idle}, max_total = {max_total}")]
    InvalidSize {
        /// `min_idle`.
        min_idle: usize,
        /// `max_total`.
        max_total: usize,
    },
}

/// Counts of one pool, for `kiln pool status` and metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PoolStatus {
    /// The VM type.
    pub vm_type: String,
    /// Ready to hand out.
    pub idle: usize,
    /// Handed out.
    pub busy: usize,
    /// Being restored (or booted).
    pub warming: usize,
    /// Restores that failed since the pool started (each VM discarded).
    pub failed: u64,
    /// VMs handed out since the pool started.
    pub served: u64,
    /// The settings.
    pub config: PoolConfig,
}

/// One VM a pool handed out.
#[derive(Debug)]
pub struct PoolLease {
    /// The VM.
    pub vm: Arc<dyn Vm>,
    /// Its slot.
    pub slot: usize,
    /// How it came: `pool` when it was waiting ready, `snapshot`/`cold` when made on demand.
    pub source: AllocationSource,
    /// From the request to the VM in hand.
    pub elapsed: Duration,
}

#[derive(Debug)]
enum SlotState {
    Empty,
    Warming,
    Idle { vm: Arc<dyn Vm>, ready_seq: u64 },
    Busy { vm_id: String },
}

#[derive(Debug)]
struct Slot {
    state: SlotState,
    /// Sequence number of the last hand-out (0: never).
    last_used: u64,
}

#[derive(Debug)]
struct PoolState {
    slots: Vec<Slot>,
    /// A counter ordering readiness and hand-outs.
    seq: u64,
    /// The slot after the last one handed out (round-robin).
    rr_next: usize,
    failed: u64,
    failed_in_a_row: u32,
    served: u64,
    closed: bool,
}

impl PoolState {
    fn count(&self, f: impl Fn(&SlotState) -> bool) -> usize {
        self.slots.iter().filter(|s| f(&s.state)).count()
    }

    /// The idle slot `strategy` picks, if any.
    fn choose(&self, strategy: Strategy) -> Option<usize> {
        let idle = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match &s.state {
                SlotState::Idle { ready_seq, .. } => Some((i, *ready_seq, s.last_used)),
                _ => None,
            });
        match strategy {
            Strategy::Fifo => idle.min_by_key(|&(i, ready, _)| (ready, i)).map(|t| t.0),
            Strategy::Lru => idle.min_by_key(|&(i, _, used)| (used, i)).map(|t| t.0),
            Strategy::RoundRobin => {
                let n = self.slots.len();
                idle.min_by_key(|&(i, _, _)| (i + n - self.rr_next % n) % n)
                    .map(|t| t.0)
            }
        }
    }

    fn hand_out(&mut self, slot: usize, vm_id: String) {
        self.seq += 1;
        self.served += 1;
        self.slots[slot].last_used = self.seq;
        self.slots[slot].state = SlotState::Busy { vm_id };
        self.rr_next = (slot + 1) % self.slots.len();
    }
}

struct PoolInner {
    provider: Arc<dyn VmProvider>,
    spec: VmSpec,
    config: PoolConfig,
    state: Mutex<PoolState>,
    changed: Notify,
    stop: CancellationToken,
    metrics: Option<Arc<Metrics>>,
}

/// A warm pool for one VM type. See the module docs. Cheap to clone.
#[derive(Clone)]
pub struct VmPool {
    inner: Arc<PoolInner>,
}

impl fmt::Debug for VmPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VmPool")
            .field("vm_type", &self.inner.spec.vm_type)
            .field("config", &self.inner.config)
            .finish()
    }
}

/// What [`VmPool::take`] does after looking at the slots.
enum Next {
    Lease(PoolLease),
    OnDemand(usize),
    Wait,
}

impl VmPool {
    /// Starts a pool of `spec` VMs from `provider`, and its refill task (on the current tokio
    /// runtime). Stop it with [`VmPool::shutdown`].
    pub fn start(
        provider: Arc<dyn VmProvider>,
        spec: VmSpec,
        config: PoolConfig,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<VmPool, PoolError> {
        config.validate()?;
        let slots = (0..config.max_total)
            .map(|_| Slot {
                state: SlotState::Empty,
                last_used: 0,
            })
            .collect();
        let pool = VmPool {
            inner: Arc::new(PoolInner {
                provider,
                spec,
                config,
                state: Mutex::new(PoolState {
                    slots,
                    seq: 0,
                    rr_next: 0,
                    failed: 0,
                    failed_in_a_row: 0,
                    served: 0,
                    closed: false,
                }),
                changed: Notify::new(),
                stop: CancellationToken::new(),
                metrics,
            }),
        };
        tokio::spawn(refill(pool.inner.clone()));
        Ok(pool)
    }

    /// The VM type this pool serves.
    pub fn spec(&self) -> &VmSpec {
        &self.inner.spec
    }

    /// The counts.
    pub fn status(&self) -> PoolStatus {
        self.inner.status()
    }

    /// Hands out a VM (see the module docs for where it comes from).
    pub async fn take(&self) -> Result<PoolLease, VmError> {
        let started = Instant::now();
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let next = {
                let mut state = self.inner.lock();
                if state.closed {
                    return Err(VmError::Unavailable {
                        backend: self.inner.provider.name(),
                        reason: format!("the pool `{}` is shut down", self.inner.spec.vm_type),
                    });
                }
                if let Some(slot) = state.choose(self.inner.config.strategy) {
                    let SlotState::Idle { vm, .. } =
                        std::mem::replace(&mut state.slots[slot].state, SlotState::Empty)
                    else {
                        unreachable!("choose returns idle slots only");
                    };
                    state.hand_out(slot, vm.id().to_owned());
                    Next::Lease(PoolLease {
                        vm,
                        slot,
                        source: AllocationSource::Pool,
                        elapsed: started.elapsed(),
                    })
                } else if state.count(|s| matches!(s, SlotState::Warming)) > 0 {
                    Next::Wait
                } else if let Some(slot) = state
                    .slots
                    .iter()
                    .position(|s| matches!(s.state, SlotState::Empty))
                {
                    state.hand_out(slot, String::new());
                    Next::OnDemand(slot)
                } else {
                    Next::Wait
                }
            };
            self.inner.changed.notify_waiters();
            self.inner.publish();
            match next {
                Next::Lease(lease) => return Ok(lease),
                Next::OnDemand(slot) => {
                    let made = self.inner.make_vm().await;
                    let mut state = self.inner.lock();
                    match made {
                        Ok((allocation, source)) => {
                            state.slots[slot].state = SlotState::Busy {
                                vm_id: allocation.vm.id().to_owned(),
                            };
                            drop(state);
                            return Ok(PoolLease {
                                vm: allocation.vm,
                                slot,
                                source,
                                elapsed: started.elapsed(),
                            });
                        }
                        Err(e) => {
                            state.slots[slot].state = SlotState::Empty;
                            state.served -= 1;
                            drop(state);
                            self.inner.changed.notify_waiters();
                            self.inner.publish();
                            return Err(e);
                        }
                    }
                }
                Next::Wait => {
                    tokio::select! {
                        () = &mut notified => {}
                        () = self.inner.stop.cancelled() => {}
                    }
                }
            }
        }
    }

    /// Whether `vm` is one this pool handed out and has not taken back yet.
    pub fn owns(&self, vm_id: &str) -> bool {
        self.inner.lock().slots.iter().any(
            |s| matches!(&s.state, SlotState::Busy { vm_id: id } if id == vm_id && !id.is_empty()),
        )
    }

    /// Takes a VM back: destroys it (a VM is never handed out twice) and empties its slot for
    /// the refill.
    pub async fn give_back(&self, vm: &dyn Vm) -> Result<(), VmError> {
        let result = self.inner.provider.release(vm).await;
        {
            let mut state = self.inner.lock();
            if let Some(slot) = state
                .slots
                .iter_mut()
                .find(|s| matches!(&s.state, SlotState::Busy { vm_id } if vm_id == vm.id()))
            {
                slot.state = SlotState::Empty;
            }
        }
        self.inner.changed.notify_waiters();
        self.inner.publish();
        result
    }

    /// Stops the refill and destroys the idle VMs. Busy VMs are destroyed when given back.
    pub async fn shutdown(&self) {
        let idle: Vec<Arc<dyn Vm>> = {
            let mut state = self.inner.lock();
            state.closed = true;
            state
                .slots
                .iter_mut()
                .filter_map(
                    |s| match std::mem::replace(&mut s.state, SlotState::Empty) {
                        SlotState::Idle { vm, .. } => Some(vm),
                        other => {
                            s.state = other;
                            None
                        }
                    },
                )
                .collect()
        };
        self.inner.stop.cancel();
        self.inner.changed.notify_waiters();
        for vm in idle {
            if let Err(e) = self.inner.provider.release(&*vm).await {
                warn!(vm = vm.id(), "releasing an idle pool VM failed: {e}");
            }
        }
        // A VM still warming is released by its warm task once it is up (the pool is closed);
        // wait for that, or it would outlive the process that owns it.
        let deadline = tokio::time::Instant::now() + SHUTDOWN_WAIT;
        loop {
            let notified = self.inner.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let warming = self.inner.lock().count(|s| matches!(s, SlotState::Warming));
            if warming == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                warn!(
                    "pool `{}`: {warming} VMs still warming at shutdown",
                    self.inner.spec.vm_type
                );
                break;
            }
        }
    }
}

impl PoolInner {
    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // Every critical section flips whole slot states, so a poisoned lock is consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn status(&self) -> PoolStatus {
        let state = self.lock();
        PoolStatus {
            vm_type: self.spec.vm_type.clone(),
            idle: state.count(|s| matches!(s, SlotState::Idle { .. })),
            busy: state.count(|s| matches!(s, SlotState::Busy { .. })),
            warming: state.count(|s| matches!(s, SlotState::Warming)),
            failed: state.failed,
            served: state.served,
            config: self.config.clone(),
        }
    }

    fn publish(&self) {
        if let Some(metrics) = &self.metrics {
            metrics.pool_status(&self.provider, &self.status());
        }
    }

    /// A fresh VM: restored from the ready snapshot, or booted when the backend has no
    /// snapshots or the restore failed.
    async fn make_vm(&self) -> Result<(Allocation, AllocationSource), VmError> {
        make_vm(&*self.provider, &self.spec, self.metrics.as_deref()).await
    }

    /// Warms one slot; the result lands in the slot.
    async fn warm(self: Arc<Self>, slot: usize) {
        let restored = restore_ready(&*self.provider, &self.spec, self.metrics.as_deref()).await;
        let restored = match restored {
            Err(e) if is_unsupported(&e) => self
                .provider
                .allocate(&self.spec)
                .await
                .map(|a| (a, AllocationSource::Cold)),
            other => other,
        };
        // Decided under the lock; acted on (release, pause) after it is dropped.
        let (leftover, pause) = {
            let mut state = self.lock();
            match restored {
                Ok((allocation, _)) => {
                    state.failed_in_a_row = 0;
                    if state.closed {
                        state.slots[slot].state = SlotState::Empty;
                        (Some(allocation.vm), None)
                    } else {
                        state.seq += 1;
                        let ready_seq = state.seq;
                        state.slots[slot].state = SlotState::Idle {
                            vm: allocation.vm,
                            ready_seq,
                        };
                        (None, None)
                    }
                }
                Err(e) => {
                    state.failed += 1;
                    state.failed_in_a_row += 1;
                    state.slots[slot].state = SlotState::Empty;
                    warn!(
                        "A VM for pool `{}` failed to restore and was discarded: {e}",
                        self.spec.vm_type
                    );
                    (None, Some(state.failed_in_a_row))
                }
            }
        };
        if let Some(vm) = leftover {
            let _ = self.provider.release(&*vm).await;
            // `shutdown` waits for this.
            self.changed.notify_waiters();
            return;
        }
        if let Some(in_a_row) = pause {
            if in_a_row >= 2
                && let Ok(snapshot) = self.provider.ready_snapshot(&self.spec).await
            {
                let _ = self.provider.delete_snapshot(&snapshot).await;
            }
            let pause = Duration::from_millis(500 * u64::from(in_a_row.min(60)));
            tokio::select! {
                () = tokio::time::sleep(pause) => {}
                () = self.stop.cancelled() => {}
            }
        }
        self.changed.notify_waiters();
        self.publish();
    }
}

/// How long shutdown waits for VMs that are still warming (a cold boot under TCG).
const SHUTDOWN_WAIT: Duration = Duration::from_secs(180);

/// Keeps `min_idle` slots idle or warming until the pool stops.
async fn refill(inner: Arc<PoolInner>) {
    loop {
        let notified = inner.changed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        let to_warm: Vec<usize> = {
            let mut state = inner.lock();
            if state.closed {
                return;
            }
            let ready = state.count(|s| matches!(s, SlotState::Idle { .. } | SlotState::Warming));
            let need = inner.config.min_idle.saturating_sub(ready);
            let empty: Vec<usize> = state
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| matches!(s.state, SlotState::Empty))
                .map(|(i, _)| i)
                .take(need)
                .collect();
            for &i in &empty {
                state.slots[i].state = SlotState::Warming;
            }
            empty
        };
        if !to_warm.is_empty() {
            inner.publish();
        }
        for slot in to_warm {
            tokio::spawn(inner.clone().warm(slot));
        }
        tokio::select! {
            () = &mut notified => {}
            () = inner.stop.cancelled() => return,
        }
    }
}

fn is_unsupported(e: &VmError) -> bool {
    matches!(e, VmError::Unsupported { .. })
}

/// Restores a VM from the backend's ready snapshot (creating it on first use).
async fn restore_ready(
    provider: &dyn VmProvider,
    spec: &VmSpec,
    metrics: Option<&Metrics>,
) -> Result<(Allocation, AllocationSource), VmError> {
    let started = Instant::now();
    let snapshot: VmSnapshot = provider.ready_snapshot(spec).await?;
    if let Some(m) = metrics {
        m.snapshot_duration(provider.name(), "ready", started.elapsed());
    }
    let started = Instant::now();
    let allocation = provider.restore(&snapshot).await?;
    if let Some(m) = metrics {
        m.snapshot_duration(provider.name(), "restore", started.elapsed());
    }
    Ok((allocation, AllocationSource::Snapshot))
}

/// A fresh VM on demand: from the ready snapshot, else booted (see the module docs).
async fn make_vm(
    provider: &dyn VmProvider,
    spec: &VmSpec,
    metrics: Option<&Metrics>,
) -> Result<(Allocation, AllocationSource), VmError> {
    let started = Instant::now();
    match restore_ready(provider, spec, metrics).await {
        Ok((allocation, source)) => Ok((
            Allocation {
                vm: allocation.vm,
                elapsed: started.elapsed(),
            },
            source,
        )),
        Err(e) => {
            if !is_unsupported(&e) {
                warn!("Restoring a VM from the ready snapshot failed, booting one instead: {e}");
            }
            let allocation = provider.allocate(spec).await?;
            Ok((
                Allocation {
                    vm: allocation.vm,
                    elapsed: started.elapsed(),
                },
                AllocationSource::Cold,
            ))
        }
    }
}

/// Settings of a [`PooledProvider`].
#[derive(Clone, Debug, Default)]
pub struct PoolSettings {
    /// Restore from the ready snapshot when there is no pool (`false`: `kiln run --cold`,
    /// which also starts no pools).
    pub snapshots: bool,
    /// Pools by VM type name, with the spec each serves.
    pub pools: Vec<(VmSpec, PoolConfig)>,
}

/// A [`VmProvider`] that takes VMs from pools, the ready snapshot or a cold boot, and
/// remembers which (see the module docs).
pub struct PooledProvider {
    inner: Arc<dyn VmProvider>,
    snapshots: bool,
    pools: HashMap<String, VmPool>,
    sources: Mutex<HashMap<String, AllocationSource>>,
    metrics: Option<Arc<Metrics>>,
}

impl fmt::Debug for PooledProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PooledProvider")
            .field("backend", &self.inner.name())
            .field("snapshots", &self.snapshots)
            .field("pools", &self.pools.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl PooledProvider {
    /// Wraps `inner`, starting the configured pools (none with `snapshots = false`).
    pub fn new(
        inner: Arc<dyn VmProvider>,
        settings: PoolSettings,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<PooledProvider, PoolError> {
        let mut pools = HashMap::new();
        if settings.snapshots {
            for (spec, config) in settings.pools {
                info!(
                    "Starting pool `{}` (min_idle {}, max_total {}, {})",
                    spec.vm_type, config.min_idle, config.max_total, config.strategy
                );
                let name = spec.vm_type.clone();
                pools.insert(
                    name,
                    VmPool::start(inner.clone(), spec, config, metrics.clone())?,
                );
            }
        }
        Ok(PooledProvider {
            inner,
            snapshots: settings.snapshots,
            pools,
            sources: Mutex::new(HashMap::new()),
            metrics,
        })
    }

    /// The wrapped backend.
    pub fn backend(&self) -> &Arc<dyn VmProvider> {
        &self.inner
    }

    /// The pool of a VM type.
    pub fn pool(&self, vm_type: &str) -> Option<&VmPool> {
        self.pools.get(vm_type)
    }

    /// Every pool's counts, by VM type name.
    pub fn status(&self) -> Vec<PoolStatus> {
        let mut all: Vec<PoolStatus> = self.pools.values().map(VmPool::status).collect();
        all.sort_by(|a, b| a.vm_type.cmp(&b.vm_type));
        all
    }

    /// How VM `vm_id` came, while it is allocated (`cold` for one this provider does not know).
    pub fn source_of(&self, vm_id: &str) -> AllocationSource {
        self.lock_sources()
            .get(vm_id)
            .copied()
            .unwrap_or(AllocationSource::Cold)
    }

    /// Stops every pool and destroys its idle VMs.
    pub async fn shutdown(&self) {
        for pool in self.pools.values() {
            pool.shutdown().await;
        }
    }

    fn lock_sources(&self) -> MutexGuard<'_, HashMap<String, AllocationSource>> {
        self.sources.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl VmProvider for PooledProvider {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn isolates(&self) -> bool {
        self.inner.isolates()
    }

    async fn allocate(&self, spec: &VmSpec) -> Result<Allocation, VmError> {
        let started = Instant::now();
        let pool = self.pools.get(&spec.vm_type).filter(|p| p.spec() == spec);
        let result = match pool {
            Some(pool) => pool.take().await.map(|lease| {
                (
                    Allocation {
                        vm: lease.vm,
                        elapsed: lease.elapsed,
                    },
                    lease.source,
                )
            }),
            None if self.snapshots => make_vm(&*self.inner, spec, self.metrics.as_deref()).await,
            None => self
                .inner
                .allocate(spec)
                .await
                .map(|a| (a, AllocationSource::Cold)),
        };
        let elapsed = started.elapsed();
        if let Some(metrics) = &self.metrics {
            let source = result.as_ref().map(|(_, s)| *s).ok();
            metrics.allocation(self.inner.name(), &spec.vm_type, source, elapsed);
        }
        let (allocation, source) = result?;
        self.lock_sources()
            .insert(allocation.vm.id().to_owned(), source);
        Ok(Allocation {
            vm: allocation.vm,
            elapsed,
        })
    }

    async fn release(&self, vm: &dyn Vm) -> Result<(), VmError> {
        let known = self.lock_sources().remove(vm.id()).is_some();
        if known && let Some(metrics) = &self.metrics {
            metrics.session_ended(self.inner.name());
        }
        match self.pools.values().find(|p| p.owns(vm.id())) {
            Some(pool) => pool.give_back(vm).await,
            None => self.inner.release(vm).await,
        }
    }

    async fn ready_snapshot(&self, spec: &VmSpec) -> Result<VmSnapshot, VmError> {
        self.inner.ready_snapshot(spec).await
    }

    async fn restore(&self, snapshot: &VmSnapshot) -> Result<Allocation, VmError> {
        self.inner.restore(snapshot).await
    }

    fn supports_checkpoints(&self) -> bool {
        self.inner.supports_checkpoints()
    }

    async fn delete_snapshot(&self, snapshot: &VmSnapshot) -> Result<(), VmError> {
        self.inner.delete_snapshot(snapshot).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(n: usize) -> PoolState {
        PoolState {
            slots: (0..n)
                .map(|_| Slot {
                    state: SlotState::Empty,
                    last_used: 0,
                })
                .collect(),
            seq: 0,
            rr_next: 0,
            failed: 0,
            failed_in_a_row: 0,
            served: 0,
            closed: false,
        }
    }

    #[test]
    fn strategies_parse_and_print() {
        for s in [Strategy::Fifo, Strategy::Lru, Strategy::RoundRobin] {
            assert_eq!(s.to_string().parse::<Strategy>().unwrap(), s);
        }
        let err = "random".parse::<Strategy>().unwrap_err();
        assert!(err.to_string().contains("round-robin"), "{err}");
    }

    #[test]
    fn sizes_are_checked() {
        let config = |min_idle, max_total| PoolConfig {
            min_idle,
            max_total,
            strategy: Strategy::Fifo,
        };
        assert!(config(2, 8).validate().is_ok());
        assert!(config(0, 1).validate().is_ok());
        assert!(config(3, 2).validate().is_err());
        assert!(config(0, 0).validate().is_err());
    }

    #[test]
    fn nothing_is_chosen_without_an_idle_slot() {
        let mut s = state(3);
        s.slots[1].state = SlotState::Warming;
        s.slots[2].state = SlotState::Busy { vm_id: "x".into() };
        for strategy in [Strategy::Fifo, Strategy::Lru, Strategy::RoundRobin] {
            assert_eq!(s.choose(strategy), None);
        }
    }
}
