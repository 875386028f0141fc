//! [`RunStore`] on one SQLite file.
//!
//! The file is opened in WAL mode (readers never block the writer) with a `busy_timeout`, so
//! several connections of the pool, or a second process, wait for the write lock instead of
//! failing. A queue claim runs in `BEGIN IMMEDIATE`: the write lock is taken before the oldest
//! queued run is read, so two claimers can never take the same run.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, SqlitePool};

use crate::{
    Delivery, NewRun, OutboxItem, RunFilter, RunRecord, RunResult, RunStatus, RunStore,
    StoreCounts, StoreError, StoredEvent, due_in, json, new_run_id, now_ms, run_json, timestamp,
};

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

const RUN_COLUMNS: &str = "seq, id, status, result, error, forge, repository, clone_url, sha, \
     git_ref, event, workflow_file, workflow_name, payload, inputs, delivery, concurrency_group, \
     cancel_in_progress, rerun_of, cancel_requested, created_at, started_at, finished_at";

fn run_from_row(row: &sqlx::sqlite::SqliteRow) -> Result<RunRecord, StoreError> {
    let result: Option<String> = row.try_get("result")?;
    let payload: String = row.try_get("payload")?;
    let inputs: String = row.try_get("inputs")?;
    let started: Option<i64> = row.try_get("started_at")?;
    let finished: Option<i64> = row.try_get("finished_at")?;
    Ok(RunRecord {
        id: row.try_get("id")?,
        seq: row.try_get("seq")?,
        status: RunStatus::from_str(&row.try_get::<String, _>("status")?)?,
        result: result.as_deref().map(RunResult::from_str).transpose()?,
        error: row.try_get("error")?,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        created_at: timestamp(row.try_get("created_at")?)?,
        started_at: started.map(timestamp).transpose()?,
        finished_at: finished.map(timestamp).transpose()?,
        spec: NewRun {
            forge: row.try_get("forge")?,
            repository: row.try_get("repository")?,
            clone_url: row.try_get("clone_url")?,
            sha: row.try_get("sha")?,
            git_ref: row.try_get("git_ref")?,
            event: row.try_get("event")?,
            workflow_file: row.try_get("workflow_file")?,
            workflow_name: row.try_get("workflow_name")?,
            payload: json(&payload, "payload")?,
            inputs: json(&inputs, "inputs")?,
            delivery: row.try_get("delivery")?,
            concurrency_group: row.try_get("concurrency_group")?,
            cancel_in_progress: row.try_get::<i64, _>("cancel_in_progress")? != 0,
            rerun_of: row.try_get("rerun_of")?,
        },
    })
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and applies the migrations.
    pub async fn open(path: &Path) -> Result<SqliteStore, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options)
            .await?;
        sqlx::migrate!("migrations/sqlite").run(&pool).await?;
        Ok(SqliteStore { pool })
    }

    /// Records a run that this process executes itself (`kiln run`): stored as `running` from
    /// the start, with the caller's id, so that it never enters the queue a server claims from.
    /// Finish it with [`RunStore::finish`].
    pub async fn record_local(&self, id: &str, run: NewRun) -> Result<RunRecord, StoreError> {
        let payload = serde_json::to_string(&run.payload)
            .map_err(|e| StoreError::Corrupt(format!("payload: {e}")))?;
        let inputs = serde_json::to_string(&run.inputs)
            .map_err(|e| StoreError::Corrupt(format!("inputs: {e}")))?;
        let now = now_ms();
        sqlx::query(
            "INSERT INTO runs (id, status, forge, repository, clone_url, sha, git_ref, event, \
             workflow_file, workflow_name, payload, inputs, delivery, concurrency_group, \
             cancel_in_progress, rerun_of, created_at, started_at) \
             VALUES (?, 'running', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(id)
        .bind(&run.forge)
        .bind(&run.repository)
        .bind(&run.clone_url)
        .bind(&run.sha)
        .bind(&run.git_ref)
        .bind(&run.event)
        .bind(&run.workflow_file)
        .bind(&run.workflow_name)
        .bind(payload)
        .bind(inputs)
        .bind(&run.delivery)
        .bind(&run.concurrency_group)
        .bind(i64::from(run.cancel_in_progress))
        .bind(&run.rerun_of)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        self.run_by_id(id).await
    }

    async fn run_by_id(&self, id: &str) -> Result<RunRecord, StoreError> {
        self.get(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }
}

#[async_trait]
impl RunStore for SqliteStore {
    async fn enqueue(&self, run: NewRun) -> Result<RunRecord, StoreError> {
        let id = new_run_id();
        let (payload, inputs) = run_json(&run)?;
        sqlx::query(
            "INSERT INTO runs (id, status, forge, repository, clone_url, sha, git_ref, event, \
             workflow_file, workflow_name, payload, inputs, delivery, concurrency_group, \
             cancel_in_progress, rerun_of, created_at) \
             VALUES (?, 'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&run.forge)
        .bind(&run.repository)
        .bind(&run.clone_url)
        .bind(&run.sha)
        .bind(&run.git_ref)
        .bind(&run.event)
        .bind(&run.workflow_file)
        .bind(&run.workflow_name)
        .bind(payload)
        .bind(inputs)
        .bind(&run.delivery)
        .bind(&run.concurrency_group)
        .bind(i64::from(run.cancel_in_progress))
        .bind(&run.rerun_of)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        self.run_by_id(&id).await
    }

    async fn claim_next(&self) -> Result<Option<RunRecord>, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        // The oldest queued run whose concurrency group (if any) has nothing running.
        let row = sqlx::query(
            "SELECT q.id FROM runs q WHERE q.status = 'queued' AND (q.concurrency_group IS NULL \
             OR NOT EXISTS (SELECT 1 FROM runs r WHERE r.status = 'running' \
             AND r.concurrency_group = q.concurrency_group)) ORDER BY q.seq LIMIT 1",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            tx.commit().await?;
            return Ok(None);
        };
        let id: String = row.try_get("id")?;
        sqlx::query("UPDATE runs SET status = 'running', started_at = ? WHERE id = ?")
            .bind(now_ms())
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(self.run_by_id(&id).await?))
    }

    async fn finish(
        &self,
        id: &str,
        result: RunResult,
        error: Option<&str>,
    ) -> Result<RunRecord, StoreError> {
        let done = sqlx::query(
            "UPDATE runs SET status = 'finished', result = ?, error = ?, finished_at = ? \
             WHERE id = ? AND status = 'running'",
        )
        .bind(result.as_str())
        .bind(error)
        .bind(now_ms())
        .bind(id)
        .execute(&self.pool)
        .await?;
        let run = self.run_by_id(id).await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::WrongState {
                id: id.to_owned(),
                status: run.status,
            });
        }
        Ok(run)
    }

    async fn request_cancel(&self, id: &str) -> Result<RunRecord, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let row = sqlx::query("SELECT status FROM runs WHERE id = ?")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        let status = RunStatus::from_str(&row.try_get::<String, _>("status")?)?;
        match status {
            RunStatus::Queued => {
                sqlx::query(
                    "UPDATE runs SET status = 'finished', result = 'cancelled', \
                     cancel_requested = 1, finished_at = ? WHERE id = ?",
                )
                .bind(now_ms())
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
            RunStatus::Running => {
                sqlx::query("UPDATE runs SET cancel_requested = 1 WHERE id = ?")
                    .bind(id)
                    .execute(&mut *tx)
                    .await?;
            }
            RunStatus::Finished => {
                return Err(StoreError::WrongState {
                    id: id.to_owned(),
                    status,
                });
            }
        }
        tx.commit().await?;
        self.run_by_id(id).await
    }

    async fn get(&self, id: &str) -> Result<Option<RunRecord>, StoreError> {
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(run_from_row).transpose()
    }

    async fn list(&self, filter: &RunFilter) -> Result<Vec<RunRecord>, StoreError> {
        let limit = if filter.limit == 0 {
            50
        } else {
            filter.limit.min(500)
        };
        // Optional filters as `(? IS NULL OR column = ?)`: one statement, no string building
        // from input.
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE (?1 IS NULL OR status = ?1) \
             AND (?2 IS NULL OR result = ?2) AND (?3 IS NULL OR repository = ?3) \
             AND (?4 IS NULL OR sha = ?4) AND (?5 IS NULL OR seq < ?5) ORDER BY seq DESC LIMIT ?6"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(filter.status.map(RunStatus::as_str))
            .bind(filter.result.map(RunResult::as_str))
            .bind(filter.repository.as_deref())
            .bind(filter.sha.as_deref())
            .bind(filter.before)
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(run_from_row).collect()
    }

    async fn group_runs(
        &self,
        group: &str,
        status: RunStatus,
    ) -> Result<Vec<RunRecord>, StoreError> {
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE status = ? AND concurrency_group = ? \
             ORDER BY seq"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(status.as_str())
            .bind(group)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(run_from_row).collect()
    }

    async fn append_events(&self, run: &str, bodies: &[String]) -> Result<(), StoreError> {
        if bodies.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for body in bodies {
            sqlx::query("INSERT INTO events (run_id, body) VALUES (?, ?)")
                .bind(run)
                .bind(body)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    async fn events(
        &self,
        run: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, body FROM events WHERE run_id = ? AND id > ? ORDER BY id LIMIT ?",
        )
        .bind(run)
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(StoredEvent {
                    id: row.try_get("id")?,
                    body: row.try_get("body")?,
                })
            })
            .collect()
    }

    async fn record_delivery(&self, delivery: &Delivery) -> Result<bool, StoreError> {
        let done = sqlx::query(
            "INSERT INTO deliveries (source, id, event, payload, status, received_at) \
             VALUES (?, ?, ?, ?, 'pending', ?) ON CONFLICT (source, id) DO NOTHING",
        )
        .bind(&delivery.source)
        .bind(&delivery.id)
        .bind(&delivery.event)
        .bind(&delivery.payload)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    async fn pending_deliveries(&self) -> Result<Vec<Delivery>, StoreError> {
        let rows = sqlx::query(
            "SELECT source, id, event, payload FROM deliveries WHERE status = 'pending' \
             ORDER BY received_at, rowid",
        )
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(Delivery {
                    source: row.try_get("source")?,
                    id: row.try_get("id")?,
                    event: row.try_get("event")?,
                    payload: row.try_get("payload")?,
                })
            })
            .collect()
    }

    async fn finish_delivery(
        &self,
        source: &str,
        id: &str,
        error: Option<&str>,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE deliveries SET status = ?, error = ? WHERE source = ? AND id = ?")
            .bind(if error.is_some() { "failed" } else { "done" })
            .bind(error)
            .bind(source)
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn push_outbox(&self, key: &str, kind: &str, body: &str) -> Result<i64, StoreError> {
        let now = now_ms();
        let done = sqlx::query(
            "INSERT INTO outbox (key, kind, body, status, next_attempt_at, created_at) \
             VALUES (?, ?, ?, 'pending', ?, ?)",
        )
        .bind(key)
        .bind(kind)
        .bind(body)
        .bind(now)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(done.last_insert_rowid())
    }

    async fn due_outbox(&self, limit: u32) -> Result<Vec<OutboxItem>, StoreError> {
        let rows = sqlx::query(
            "SELECT o.id, o.key, o.kind, o.body, o.attempts FROM outbox o \
             WHERE o.status = 'pending' AND o.next_attempt_at <= ? \
             AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.key = o.key \
             AND e.status = 'pending' AND e.id < o.id) ORDER BY o.id LIMIT ?",
        )
        .bind(now_ms())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|row| {
                Ok(OutboxItem {
                    id: row.try_get("id")?,
                    key: row.try_get("key")?,
                    kind: row.try_get("kind")?,
                    body: row.try_get("body")?,
                    attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(0),
                })
            })
            .collect()
    }

    async fn outbox_delivered(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE outbox SET status = 'delivered', delivered_at = ? WHERE id = ?")
            .bind(now_ms())
            .bind(id)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn outbox_failed(
        &self,
        id: i64,
        error: &str,
        retry_in: Option<Duration>,
    ) -> Result<(), StoreError> {
        let (status, next) = match retry_in {
            Some(after) => ("pending", due_in(after)),
            None => ("dead", now_ms()),
        };
        sqlx::query(
            "UPDATE outbox SET status = ?, attempts = attempts + 1, last_error = ?, \
             next_attempt_at = ? WHERE id = ?",
        )
        .bind(status)
        .bind(error)
        .bind(next)
        .bind(id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn recover(&self, requeue: bool) -> Result<Vec<RunRecord>, StoreError> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let ids: Vec<String> =
            sqlx::query_scalar("SELECT id FROM runs WHERE status = 'running' ORDER BY seq")
                .fetch_all(&mut *tx)
                .await?;
        if requeue {
            sqlx::query(
                "UPDATE runs SET status = 'queued', started_at = NULL WHERE status = 'running'",
            )
            .execute(&mut *tx)
            .await?;
        } else {
            sqlx::query(
                "UPDATE runs SET status = 'finished', result = 'failure', error = 'interrupted', \
                 finished_at = ? WHERE status = 'running'",
            )
            .bind(now_ms())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        let mut runs = Vec::with_capacity(ids.len());
        for id in ids {
            runs.push(self.run_by_id(&id).await?);
        }
        Ok(runs)
    }

    async fn counts(&self) -> Result<StoreCounts, StoreError> {
        let row = sqlx::query(
            "SELECT (SELECT COUNT(*) FROM runs WHERE status = 'queued') AS queued, \
             (SELECT COUNT(*) FROM runs WHERE status = 'running') AS running, \
             (SELECT COUNT(*) FROM outbox WHERE status = 'pending') AS outbox_pending, \
             (SELECT COUNT(*) FROM deliveries WHERE status = 'pending') AS deliveries_pending",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(StoreCounts {
            queued: row.try_get("queued")?,
            running: row.try_get("running")?,
            outbox_pending: row.try_get("outbox_pending")?,
            deliveries_pending: row.try_get("deliveries_pending")?,
        })
    }

    async fn put_report_ref(&self, key: &str, value: &str) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO report_refs (key, value, created_at) VALUES (?, ?, ?) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(key)
        .bind(value)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn report_ref(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(
            sqlx::query_scalar("SELECT value FROM report_refs WHERE key = ?")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }
}
