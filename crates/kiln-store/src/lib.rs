//! kiln's durable store: run records, the run queue, run events, webhook deliveries and the
//! report outbox.
//!
//! [`RunStore`] is the interface the server uses. Two implementations keep the same contract
//! (one behaviour test suite runs against both):
//! - [`SqliteStore`], the default: one SQLite file (WAL, `busy_timeout`, queue claims under
//!   `BEGIN IMMEDIATE`);
//! - [`PostgresStore`], for teams that run PostgreSQL: queue claims with
//!   `FOR UPDATE SKIP LOCKED`, one running run per concurrency group enforced by a unique index.
//!
//! Each has its own migrations (`migrations/sqlite`, `migrations/postgres`), applied on open.
//!
//! ## A run's lifecycle
//! ```text
//!  enqueue ──> queued ──claim_next──> running ──finish──> finished (success|failure|cancelled|error)
//!                │                       │
//!                └──cancel──> finished   └──recover (the process died)──> finished (failure,
//!                   (cancelled)                                           "interrupted") or queued
//! ```
//! Claims take the oldest queued run (`seq` order). A queued run whose concurrency group already
//! has a running run waits, unless it asked for `cancel-in-progress` (then the server cancels the
//! running one and the queued one is claimed once that finished).
//!
//! ## Deliveries and the outbox
//! A webhook delivery is recorded before the HTTP answer (`record_delivery`): a delivery id seen
//! before is a replay and is ignored, and a recorded delivery survives a restart until its runs
//! are enqueued (`pending_deliveries`, `finish_delivery`). Reports (commit statuses) are pushed
//! to the outbox in the same process step that changes the run; they are retried with backoff
//! until delivered, and items sharing a `key` are delivered in order. What a forge answers that a
//! later report needs (a check run's id) is kept with [`RunStore::put_report_ref`].

#![warn(missing_docs)]

mod postgres;
mod sqlite;

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use serde::Serialize;

pub use postgres::{PostgresOwnerLock, PostgresStore};
pub use sqlite::SqliteStore;

/// Where a run is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Waiting for a worker.
    Queued,
    /// A worker is executing it.
    Running,
    /// Done; see [`RunRecord::result`].
    Finished,
}

/// How a finished run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RunResult {
    /// Every job passed.
    Success,
    /// A job failed, or the run was interrupted.
    Failure,
    /// Cancelled by a person or by `cancel-in-progress`.
    Cancelled,
    /// kiln could not carry the run out (fetch failed, invalid workflow, no VM).
    Error,
}

macro_rules! string_enum {
    ($ty:ident { $($variant:ident => $text:literal),* $(,)? }) => {
        impl $ty {
            /// The word stored and shown.
            pub fn as_str(self) -> &'static str {
                match self { $($ty::$variant => $text),* }
            }
        }
        impl FromStr for $ty {
            type Err = StoreError;
            fn from_str(s: &str) -> Result<Self, StoreError> {
                match s {
                    $($text => Ok($ty::$variant),)*
                    other => Err(StoreError::Corrupt(format!(
                        "unknown {} `{other}`", stringify!($ty)
                    ))),
                }
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

string_enum!(RunStatus { Queued => "queued", Running => "running", Finished => "finished" });
string_enum!(RunResult {
    Success => "success",
    Failure => "failure",
    Cancelled => "cancelled",
    Error => "error",
});

/// What is needed to enqueue a run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NewRun {
    /// Where the event came from: `github`, `gitea` or `manual`.
    pub forge: String,
    /// `owner/name`.
    pub repository: String,
    /// The URL to fetch the repository from (before `clone_url_rewrite`).
    pub clone_url: String,
    /// The commit to run.
    pub sha: String,
    /// The full ref (`refs/heads/main`).
    pub git_ref: String,
    /// The event name (`push`, `pull_request`, ...).
    pub event: String,
    /// The workflow file, relative to the repository root.
    pub workflow_file: String,
    /// The workflow's display name.
    pub workflow_name: String,
    /// The event payload (`github.event`; large, so not in the run's JSON form).
    #[serde(skip)]
    pub payload: serde_json::Value,
    /// `workflow_dispatch` inputs (an object).
    pub inputs: serde_json::Value,
    /// The webhook delivery that caused it.
    pub delivery: Option<String>,
    /// The evaluated `concurrency.group`.
    pub concurrency_group: Option<String>,
    /// `concurrency.cancel-in-progress`.
    pub cancel_in_progress: bool,
    /// The run this one re-runs.
    pub rerun_of: Option<String>,
}

/// A stored run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRecord {
    /// Public id.
    pub id: String,
    /// Queue position (increasing).
    pub seq: i64,
    /// Lifecycle state.
    pub status: RunStatus,
    /// How it ended, once finished.
    pub result: Option<RunResult>,
    /// Why kiln failed it (`interrupted`, a fetch error, ...).
    pub error: Option<String>,
    /// Whether someone asked to cancel it.
    pub cancel_requested: bool,
    /// When it was enqueued.
    pub created_at: jiff::Timestamp,
    /// When a worker claimed it.
    pub started_at: Option<jiff::Timestamp>,
    /// When it finished.
    pub finished_at: Option<jiff::Timestamp>,
    /// What was enqueued.
    #[serde(flatten)]
    pub spec: NewRun,
}

/// Which runs to list.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunFilter {
    /// Only runs in this state.
    pub status: Option<RunStatus>,
    /// Only runs with this result.
    pub result: Option<RunResult>,
    /// Only runs of this repository (`owner/name`).
    pub repository: Option<String>,
    /// Only runs of this commit.
    pub sha: Option<String>,
    /// Only runs older than this `seq` (paging: pass the last `seq` of the previous page).
    pub before: Option<i64>,
    /// At most this many (newest first); 0 means the default of 50.
    pub limit: u32,
}

/// One stored run event (its JSON form, as the runner emitted it).
#[derive(Debug, Clone, PartialEq)]
pub struct StoredEvent {
    /// Position in the store (increasing; use as the SSE id and the `after` cursor).
    pub id: i64,
    /// The event's JSON.
    pub body: String,
}

/// A webhook delivery as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// `github` or `gitea`.
    pub source: String,
    /// The forge's delivery id.
    pub id: String,
    /// The event name.
    pub event: String,
    /// The raw JSON payload.
    pub payload: String,
}

/// One report waiting in the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxItem {
    /// Outbox id.
    pub id: i64,
    /// Items with the same key are delivered in order.
    pub key: String,
    /// What kind of report (`github_status`, `gitea_status`).
    pub kind: String,
    /// The report (JSON).
    pub body: String,
    /// Failed attempts so far.
    pub attempts: u32,
}

/// Counts for `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounts {
    /// Runs waiting.
    pub queued: i64,
    /// Runs executing.
    pub running: i64,
    /// Reports not yet delivered.
    pub outbox_pending: i64,
    /// Deliveries not yet turned into runs.
    pub deliveries_pending: i64,
}

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error("Database error")]
    Database(#[from] sqlx::Error),
    /// Migrations failed.
    #[error("Database migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value could not be read back.
    #[error("Corrupt store: {0}")]
    Corrupt(String),
    /// No such run.
    #[error("No run {0}")]
    NotFound(String),
    /// The run is not in a state that allows this.
    #[error("Run {id} is {status}")]
    WrongState {
        /// Run id.
        id: String,
        /// Its state.
        status: RunStatus,
    },
}

/// What the server needs from a store. Every method is one transaction.
#[async_trait]
pub trait RunStore: Send + Sync {
    /// Adds a queued run and returns it.
    async fn enqueue(&self, run: NewRun) -> Result<RunRecord, StoreError>;

    /// Claims the oldest claimable queued run (see the module docs) and marks it running.
    async fn claim_next(&self) -> Result<Option<RunRecord>, StoreError>;

    /// Marks a running run finished.
    async fn finish(
        &self,
        id: &str,
        result: RunResult,
        error: Option<&str>,
    ) -> Result<RunRecord, StoreError>;

    /// Asks to cancel a run: a queued run is finished as cancelled at once; a running run gets
    /// `cancel_requested` (its worker stops it); a finished run is [`StoreError::WrongState`].
    async fn request_cancel(&self, id: &str) -> Result<RunRecord, StoreError>;

    /// One run.
    async fn get(&self, id: &str) -> Result<Option<RunRecord>, StoreError>;

    /// Runs, newest first.
    async fn list(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, StoreError>;

    /// The runs of a concurrency group in one state, oldest first.
    async fn group_runs(
        &self,
        group: &str,
        status: RunStatus,
    ) -> Result<Vec<RunRecord>, StoreError>;

    /// Appends events (JSON) to a run, in order.
    async fn append_events(&self, run: &str, bodies: &[String]) -> Result<(), StoreError>;

    /// A run's events with `id > after`, in order, at most `limit`.
    async fn events(
        &self,
        run: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError>;

    /// Records a webhook delivery. `false`: the delivery id was seen before (a replay).
    async fn record_delivery(&self, delivery: &Delivery) -> Result<bool, StoreError>;

    /// Deliveries recorded but not yet turned into runs, oldest first.
    async fn pending_deliveries(&self) -> Result<Vec<Delivery>, StoreError>;

    /// Marks a delivery processed (`error`: it could not be, and why).
    async fn finish_delivery(
        &self,
        source: &str,
        id: &str,
        error: Option<&str>,
    ) -> Result<(), StoreError>;

    /// Adds a report to the outbox.
    async fn push_outbox(&self, key: &str, kind: &str, body: &str) -> Result<i64, StoreError>;

    /// Reports due now, oldest first: at most one per key, and only the key's oldest pending one.
    async fn due_outbox(&self, limit: u32) -> Result<Vec<OutboxItem>, StoreError>;

    /// Marks a report delivered.
    async fn outbox_delivered(&self, id: i64) -> Result<(), StoreError>;

    /// Records a failed attempt; it is due again after `retry_in`, or never (`None`: given up).
    async fn outbox_failed(
        &self,
        id: i64,
        error: &str,
        retry_in: Option<std::time::Duration>,
    ) -> Result<(), StoreError>;

    /// Restart recovery: every run left `running` (by a process that is gone) is finished as a
    /// failure with error `interrupted`, or put back in the queue when `requeue`. Returns them.
    async fn recover(&self, requeue: bool) -> Result<Vec<RunRecord>, StoreError>;

    /// Gauges for `/metrics`.
    async fn counts(&self) -> Result<StoreCounts, StoreError>;

    /// Keeps what a forge answered to a report under `key` (a check run's id), replacing an
    /// earlier value.
    async fn put_report_ref(&self, key: &str, value: &str) -> Result<(), StoreError>;

    /// The value kept under `key`, if any.
    async fn report_ref(&self, key: &str) -> Result<Option<String>, StoreError>;
}

/// Now, in Unix milliseconds (how both stores keep times).
fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

fn timestamp(ms: i64) -> Result<jiff::Timestamp, StoreError> {
    jiff::Timestamp::from_millisecond(ms)
        .map_err(|e| StoreError::Corrupt(format!("timestamp {ms}: {e}")))
}

fn json(text: &str, what: &str) -> Result<serde_json::Value, StoreError> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{what}: {e}")))
}

/// A new public run id: 12 hex digits.
fn new_run_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// The payload and inputs of a run as stored (JSON text).
fn run_json(run: &NewRun) -> Result<(String, String), StoreError> {
    let payload = serde_json::to_string(&run.payload)
        .map_err(|e| StoreError::Corrupt(format!("payload: {e}")))?;
    let inputs = serde_json::to_string(&run.inputs)
        .map_err(|e| StoreError::Corrupt(format!("inputs: {e}")))?;
    Ok((payload, inputs))
}

/// A retry delay as milliseconds from now (saturating).
fn due_in(after: std::time::Duration) -> i64 {
    now_ms().saturating_add(i64::try_from(after.as_millis()).unwrap_or(i64::MAX))
}
