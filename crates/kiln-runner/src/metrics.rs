//! Prometheus metrics of VM allocation, pools, snapshots and runs.
//!
//! One [`Metrics`] value owns a `prometheus-client` [`Registry`] (no globals: tests read the
//! values they caused). It is fed from two places:
//! - the [`PooledProvider`](crate::pool::PooledProvider) (allocations, releases, pool counts,
//!   snapshot timings);
//! - the run's [`RunEvent`] stream, through [`Metrics::observe`] (steps, jobs, runs).
//!
//! [`serve`] answers `GET /metrics` with the OpenMetrics text exposition over plain HTTP/1.1
//! (`kiln run --metrics-addr ADDR`; the server mode registers the same families).
//!
//! | name | type | labels |
//! |---|---|---|
//! | `vm_allocation_duration_seconds` | histogram | `backend`, `vm_type`, `source` |
//! | `vm_allocation_total` | counter | `backend`, `vm_type`, `source`, `result` |
//! | `vm_active_sessions` | gauge | `backend` |
//! | `vm_pool_utilization` | gauge (busy / max_total) | `backend`, `vm_type` |
//! | `vm_pool_vms` | gauge | `backend`, `vm_type`, `state` (`idle`, `busy`, `warming`) |
//! | `vm_pool_restore_failures` | gauge (since the pool started) | `backend`, `vm_type` |
//! | `vm_snapshot_duration_seconds` | histogram | `backend`, `operation` (`ready`, `restore`, `step`) |
//! | `workflow_execution_duration_seconds` | histogram | `backend`, `result` |
//! | `workflow_runs_total` | counter | `backend`, `result` |
//! | `job_executions_total` | counter | `backend`, `result` |
//! | `step_executions_total` | counter | `backend`, `result` |
//!
//! `source` is `pool`, `snapshot` or `cold` (`none` on a failed allocation); `result` is
//! `success`, `failure`, `cancelled` or `skipped` for runs, jobs and steps, and `success` or
//! `failure` for allocations.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use kiln_vm::VmProvider;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use crate::event::{Conclusion, EventKind, RunEvent};
use crate::pool::{AllocationSource, PoolStatus};

/// The content type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AllocationLabels {
    backend: String,
    vm_type: String,
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AllocationResultLabels {
    backend: String,
    vm_type: String,
    source: String,
    result: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    backend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    backend: String,
    vm_type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolStateLabels {
    backend: String,
    vm_type: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SnapshotLabels {
    backend: String,
    operation: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    backend: String,
    result: String,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    // 1 ms to ~65 s: a pool hand-out is milliseconds, a TCG cold boot seconds.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

fn long_histogram() -> Histogram {
    // 0.1 s to ~3.6 h: whole workflow runs.
    Histogram::new(exponential_buckets(0.1, 2.0, 18))
}

/// kiln's metrics. See the module docs for the families.
pub struct Metrics {
    registry: Registry,
    allocation_duration: HistogramFamily<AllocationLabels>,
    allocations: Family<AllocationResultLabels, Counter>,
    active_sessions: Family<BackendLabels, Gauge>,
    pool_utilization: Family<PoolLabels, Gauge<f64, AtomicU64>>,
    pool_vms: Family<PoolStateLabels, Gauge>,
    pool_failures: Family<PoolLabels, Gauge>,
    snapshot_duration: HistogramFamily<SnapshotLabels>,
    workflow_duration: HistogramFamily<ResultLabels>,
    workflows: Family<ResultLabels, Counter>,
    jobs: Family<ResultLabels, Counter>,
    steps: Family<ResultLabels, Counter>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every family, registered and empty.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let allocation_duration: HistogramFamily<AllocationLabels> =
            Family::new_with_constructor(seconds_histogram);
        registry.register(
            "vm_allocation_duration_seconds",
            "Time from a session's request to its VM ready to run commands",
            allocation_duration.clone(),
        );
        let allocations = Family::<AllocationResultLabels, Counter>::default();
        registry.register(
            "vm_allocation",
            "VM allocations for sessions",
            allocations.clone(),
        );
        let active_sessions = Family::<BackendLabels, Gauge>::default();
        registry.register(
            "vm_active_sessions",
            "Sessions holding a VM",
            active_sessions.clone(),
        );
        let pool_utilization = Family::<PoolLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "vm_pool_utilization",
            "Busy VMs of a pool as a fraction of its max_total",
            pool_utilization.clone(),
        );
        let pool_vms = Family::<PoolStateLabels, Gauge>::default();
        registry.register("vm_pool_vms", "VMs of a pool by state", pool_vms.clone());
        let pool_failures = Family::<PoolLabels, Gauge>::default();
        registry.register(
            "vm_pool_restore_failures",
            "Pool VMs that failed to restore and were discarded, since the pool started",
            pool_failures.clone(),
        );
        let snapshot_duration: HistogramFamily<SnapshotLabels> =
            Family::new_with_constructor(seconds_histogram);
        registry.register(
            "vm_snapshot_duration_seconds",
            "Time to find or create the ready snapshot, to restore a VM from it, and to take a \
             step snapshot",
            snapshot_duration.clone(),
        );
        let workflow_duration: HistogramFamily<ResultLabels> =
            Family::new_with_constructor(long_histogram);
        registry.register(
            "workflow_execution_duration_seconds",
            "Wall time of workflow runs",
            workflow_duration.clone(),
        );
        let workflows = Family::<ResultLabels, Counter>::default();
        registry.register("workflow_runs", "Finished workflow runs", workflows.clone());
        let jobs = Family::<ResultLabels, Counter>::default();
        registry.register(
            "job_executions",
            "Finished jobs (matrix legs)",
            jobs.clone(),
        );
        let steps = Family::<ResultLabels, Counter>::default();
        registry.register("step_executions", "Finished steps", steps.clone());
        Metrics {
            registry,
            allocation_duration,
            allocations,
            active_sessions,
            pool_utilization,
            pool_vms,
            pool_failures,
            snapshot_duration,
            workflow_duration,
            workflows,
            jobs,
            steps,
        }
    }

    /// The OpenMetrics text exposition of every family.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }

    /// An allocation ended: with a VM from `source`, or failed (`None`).
    pub fn allocation(
        &self,
        backend: &str,
        vm_type: &str,
        source: Option<AllocationSource>,
        elapsed: Duration,
    ) {
        let source_label = source.map_or("none", AllocationSource::as_str);
        self.allocations
            .get_or_create(&AllocationResultLabels {
                backend: backend.to_owned(),
                vm_type: vm_type.to_owned(),
                source: source_label.to_owned(),
                result: if source.is_some() {
                    "success"
                } else {
                    "failure"
                }
                .to_owned(),
            })
            .inc();
        if source.is_some() {
            self.allocation_duration
                .get_or_create(&AllocationLabels {
                    backend: backend.to_owned(),
                    vm_type: vm_type.to_owned(),
                    source: source_label.to_owned(),
                })
                .observe(elapsed.as_secs_f64());
            self.active_sessions
                .get_or_create(&BackendLabels {
                    backend: backend.to_owned(),
                })
                .inc();
        }
    }

    /// A session's VM was released.
    pub fn session_ended(&self, backend: &str) {
        self.active_sessions
            .get_or_create(&BackendLabels {
                backend: backend.to_owned(),
            })
            .dec();
    }

    /// A snapshot operation (`ready` or `restore`) took `elapsed`.
    pub fn snapshot_duration(&self, backend: &str, operation: &str, elapsed: Duration) {
        self.snapshot_duration
            .get_or_create(&SnapshotLabels {
                backend: backend.to_owned(),
                operation: operation.to_owned(),
            })
            .observe(elapsed.as_secs_f64());
    }

    /// A pool's counts changed.
    pub fn pool_status(&self, provider: &Arc<dyn VmProvider>, status: &PoolStatus) {
        let backend = provider.name().to_owned();
        let labels = PoolLabels {
            backend: backend.clone(),
            vm_type: status.vm_type.clone(),
        };
        let max = status.config.max_total.max(1) as f64;
        self.pool_utilization
            .get_or_create(&labels)
            .set(status.busy as f64 / max);
        self.pool_failures
            .get_or_create(&labels)
            .set(i64::try_from(status.failed).unwrap_or(i64::MAX));
        for (state, count) in [
            ("idle", status.idle),
            ("busy", status.busy),
            ("warming", status.warming),
        ] {
            self.pool_vms
                .get_or_create(&PoolStateLabels {
                    backend: backend.clone(),
                    vm_type: status.vm_type.clone(),
                    state: state.to_owned(),
                })
                .set(i64::try_from(count).unwrap_or(i64::MAX));
        }
    }

    /// Counts what a run event says finished (steps, jobs, runs) on `backend`.
    pub fn observe(&self, backend: &str, event: &RunEvent) {
        let labels = |result: Conclusion| ResultLabels {
            backend: backend.to_owned(),
            result: conclusion_label(result).to_owned(),
        };
        match &event.kind {
            EventKind::StepFinished { conclusion, .. } => {
                self.steps.get_or_create(&labels(*conclusion)).inc();
            }
            EventKind::JobFinished { result, .. } => {
                self.jobs.get_or_create(&labels(*result)).inc();
            }
            EventKind::RunFinished {
                result,
                duration_ms,
                ..
            } => {
                self.workflows.get_or_create(&labels(*result)).inc();
                self.workflow_duration
                    .get_or_create(&labels(*result))
                    .observe(*duration_ms as f64 / 1000.0);
            }
            EventKind::SnapshotTaken { duration_ms, .. } => {
                self.snapshot_duration(backend, "step", Duration::from_millis(*duration_ms));
            }
            _ => {}
        }
    }
}

fn conclusion_label(result: Conclusion) -> &'static str {
    match result {
        Conclusion::Success => "success",
        Conclusion::Failure => "failure",
        Conclusion::Cancelled => "cancelled",
        Conclusion::Skipped => "skipped",
    }
}

/// Serves `GET /metrics` on `listener` until the task is dropped or aborted. Other paths get
/// 404, other methods 405. One request per connection (`Connection: close`).
pub async fn serve(listener: TcpListener, metrics: Arc<Metrics>) {
    loop {
        let Ok((mut stream, _)) = listener.accept().await else {
            continue;
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            let read_head = async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16384 {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
            };
            if tokio::time::timeout(Duration::from_secs(10), read_head)
                .await
                .is_err()
            {
                return;
            }
            let line = String::from_utf8_lossy(&head);
            let mut words = line.split_whitespace();
            let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
            let (status, content_type, body) = match (method, path.split('?').next()) {
                ("GET", Some("/metrics")) => ("200 OK", CONTENT_TYPE, metrics.encode()),
                ("GET", _) => (
                    "404 Not Found",
                    "text/plain",
                    "Not found: metrics are at /metrics\n".to_owned(),
                ),
                _ => (
                    "405 Method Not Allowed",
                    "text/plain",
                    "Only GET is served\n".to_owned(),
                ),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(response.as_bytes()).await;
            let _ = stream.shutdown().await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn families_have_their_names_types_and_labels() {
        let metrics = Metrics::new();
        metrics.allocation(
            "qemu",
            "default",
            Some(AllocationSource::Pool),
            Duration::from_millis(3),
        );
        metrics.allocation("qemu", "default", None, Duration::from_millis(3));
        metrics.snapshot_duration("qemu", "restore", Duration::from_millis(400));
        let text = metrics.encode();
        for expected in [
            "# TYPE vm_allocation_duration_seconds histogram",
            "vm_allocation_duration_seconds_count{backend=\"qemu\",vm_type=\"default\",source=\"pool\"} 1",
            "# TYPE vm_allocation counter",
            "vm_allocation_total{backend=\"qemu\",vm_type=\"default\",source=\"pool\",result=\"success\"} 1",
            "vm_allocation_total{backend=\"qemu\",vm_type=\"default\",source=\"none\",result=\"failure\"} 1",
            "vm_active_sessions{backend=\"qemu\"} 1",
            "vm_snapshot_duration_seconds_sum{backend=\"qemu\",operation=\"restore\"} 0.4",
            "# EOF",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        // A family with no samples yet is left out of the exposition.
        assert!(
            !text.contains("workflow_execution_duration_seconds"),
            "{text}"
        );
        metrics.session_ended("qemu");
        assert!(
            metrics
                .encode()
                .contains("vm_active_sessions{backend=\"qemu\"} 0")
        );
    }
}
