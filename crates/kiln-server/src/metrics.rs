//! `/metrics` in Prometheus' text format.
//!
//! Counters are updated as things happen (webhooks by result, runs by result, VM allocations,
//! step results, report attempts); gauges are read at scrape time from the store (queue depth,
//! running runs, report outbox depth, pending deliveries) and the session manager (active
//! sessions). One explicit [`Registry`], no globals.

use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use kiln_runner::event::{EventKind, RunEvent};
use kiln_store::{RunRecord, RunResult};
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::Shared;

type Labels = Vec<(String, String)>;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// kiln's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    webhooks: Family<Labels, Counter>,
    runs_started: Counter,
    runs_finished: Family<Labels, Counter>,
    run_duration: Histogram,
    vm_allocations: Family<Labels, Counter>,
    vm_allocation_seconds: Histogram,
    steps: Family<Labels, Counter>,
    reports: Family<Labels, Counter>,
    queue_depth: Gauge,
    runs_running: Gauge,
    outbox_depth: Gauge,
    deliveries_pending: Gauge,
    sessions_active: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A registry with every metric registered.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("kiln");
        let m = Metrics {
            registry: Arc::default(),
            webhooks: Family::default(),
            runs_started: Counter::default(),
            runs_finished: Family::default(),
            run_duration: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            vm_allocations: Family::default(),
            vm_allocation_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 12)),
            steps: Family::default(),
            reports: Family::default(),
            queue_depth: Gauge::default(),
            runs_running: Gauge::default(),
            outbox_depth: Gauge::default(),
            deliveries_pending: Gauge::default(),
            sessions_active: Gauge::default(),
        };
        registry.register(
            "webhooks",
            "Webhook deliveries by source and result",
            m.webhooks.clone(),
        );
        registry.register("runs_started", "Runs started", m.runs_started.clone());
        registry.register(
            "runs_finished",
            "Runs finished by result",
            m.runs_finished.clone(),
        );
        registry.register(
            "run_duration_seconds",
            "Wall time of finished runs",
            m.run_duration.clone(),
        );
        registry.register(
            "vm_allocations",
            "VM allocations by backend and source",
            m.vm_allocations.clone(),
        );
        registry.register(
            "vm_allocation_seconds",
            "Time to allocate a VM",
            m.vm_allocation_seconds.clone(),
        );
        registry.register("steps", "Steps finished by conclusion", m.steps.clone());
        registry.register(
            "reports",
            "Status report attempts by outcome",
            m.reports.clone(),
        );
        registry.register(
            "queue_depth",
            "Runs waiting in the queue",
            m.queue_depth.clone(),
        );
        registry.register("runs_running", "Runs executing", m.runs_running.clone());
        registry.register(
            "report_outbox_depth",
            "Status reports not yet delivered",
            m.outbox_depth.clone(),
        );
        registry.register(
            "deliveries_pending",
            "Webhook deliveries not yet turned into runs",
            m.deliveries_pending.clone(),
        );
        registry.register(
            "sessions_active",
            "Sessions (VMs) holding a slot",
            m.sessions_active.clone(),
        );
        *m.registry.lock().unwrap_or_else(|e| e.into_inner()) = registry;
        m
    }

    /// Counts a webhook by result.
    pub fn webhook(&self, source: &str, result: &str) {
        self.webhooks
            .get_or_create(&labels(&[("source", source), ("result", result)]))
            .inc();
    }

    /// Counts a run start.
    pub fn run_started(&self) {
        self.runs_started.inc();
    }

    /// Counts a finished run.
    pub fn run_finished(&self, result: RunResult, run: &RunRecord) {
        self.runs_finished
            .get_or_create(&labels(&[("result", result.as_str())]))
            .inc();
        if let (Some(start), Some(end)) = (run.started_at, run.finished_at) {
            let secs = end.duration_since(start).as_secs_f64();
            self.run_duration.observe(secs.max(0.0));
        }
    }

    /// Counts what an event says (allocations, steps).
    pub fn event(&self, event: &RunEvent) {
        match &event.kind {
            EventKind::SessionAllocated {
                backend,
                source,
                allocation_ms,
                ..
            } => {
                self.vm_allocations
                    .get_or_create(&labels(&[("backend", backend), ("source", source)]))
                    .inc();
                self.vm_allocation_seconds
                    .observe(*allocation_ms as f64 / 1000.0);
            }
            EventKind::StepFinished { conclusion, .. } => {
                self.steps
                    .get_or_create(&labels(&[("conclusion", conclusion.as_str())]))
                    .inc();
            }
            _ => {}
        }
    }

    /// Counts a report attempt.
    pub fn report(&self, outcome: &str) {
        self.reports
            .get_or_create(&labels(&[("outcome", outcome)]))
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut text = String::new();
        encode(
            &mut text,
            &self.registry.lock().unwrap_or_else(|e| e.into_inner()),
        )?;
        Ok(text)
    }
}

pub(crate) fn routes(shared: Arc<Shared>) -> Router<Arc<Shared>> {
    Router::new()
        .route("/metrics", get(scrape))
        .route_layer(axum::middleware::from_fn_with_state(
            shared,
            crate::api::require_token,
        ))
}

async fn scrape(State(shared): State<Arc<Shared>>) -> Response {
    let m = &shared.metrics;
    match shared.store.counts().await {
        Ok(c) => {
            m.queue_depth.set(c.queued);
            m.runs_running.set(c.running);
            m.outbox_depth.set(c.outbox_pending);
            m.deliveries_pending.set(c.deliveries_pending);
        }
        Err(e) => tracing::warn!("/metrics: {}", crate::api::chain(&e)),
    }
    let active = shared.runner.executor.sessions().active_count();
    m.sessions_active
        .set(i64::try_from(active).unwrap_or(i64::MAX));
    match m.encode() {
        Ok(text) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
