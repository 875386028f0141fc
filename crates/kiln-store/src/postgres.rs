//! [`RunStore`] on PostgreSQL.
//!
//! The same contract as the SQLite store, with PostgreSQL's tools for concurrency:
//! - A queue claim locks the oldest claimable queued run with `FOR UPDATE SKIP LOCKED`, so
//!   concurrent claimers (tasks, processes or hosts) each take a different run and never wait on
//!   one another's rows.
//! - "One running run per concurrency group" is a partial unique index. Two claimers that pick
//!   different queued runs of one group cannot both start theirs: the second `UPDATE` waits for
//!   the first to commit and then fails with a unique violation; that claimer looks again.
//! - Restart recovery must only happen when no other `kiln serve` uses the database:
//!   [`PostgresStore::lock_owner`] takes a session advisory lock that the server holds while it
//!   runs (the counterpart of the lock file next to a SQLite database).
//!
//! The connection URL is libpq's (`postgres://user@host:5432/db?sslmode=...`, or
//! `?host=/run/postgresql` for a Unix socket). The password is given separately (kiln reads it
//! from the environment or a file) so it never has to be in the URL; without one, `PGPASSWORD`
//! and `~/.pgpass` are used as libpq does.

use std::str::FromStr;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgConnection, PgPool, Row};

use crate::{
    Delivery, NewRun, OutboxItem, RunFilter, RunRecord, RunResult, RunStatus, RunStore,
    StoreCounts, StoreError, StoredEvent, due_in, json, new_run_id, now_ms, run_json, timestamp,
};

/// The PostgreSQL store.
#[derive(Debug, Clone)]
pub struct PostgresStore {
    pool: PgPool,
}

/// Held while one `kiln serve` owns the database (see [`PostgresStore::lock_owner`]); dropping
/// it closes the connection, which releases the lock.
#[derive(Debug)]
pub struct PostgresOwnerLock {
    _connection: PgConnection,
}

/// The advisory lock key of the owner lock: "kiln" in ASCII, then 1.
const OWNER_LOCK_KEY: i64 = 0x6b69_6c6e_0000_0001;

/// How often a claim looks again after losing a concurrency group to another claimer.
const CLAIM_ATTEMPTS: usize = 16;

const RUN_COLUMNS: &str = "seq, id, status, result, error, forge, repository, clone_url, sha, \
     git_ref, event, workflow_file, workflow_name, payload, inputs, delivery, concurrency_group, \
     cancel_in_progress, rerun_of, cancel_requested, created_at, started_at, finished_at";

fn run_from_row(row: &PgRow) -> Result<RunRecord, StoreError> {
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
        cancel_requested: row.try_get("cancel_requested")?,
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
            cancel_in_progress: row.try_get("cancel_in_progress")?,
            rerun_of: row.try_get("rerun_of")?,
        },
    })
}

/// Whether `error` is PostgreSQL's unique violation (SQLSTATE 23505).
fn is_unique_violation(error: &sqlx::Error) -> bool {
    matches!(error, sqlx::Error::Database(e) if e.code().as_deref() == Some("23505"))
}

impl PostgresStore {
    /// Connects to the database at `url` (with `password`, when given, instead of one in the
    /// URL or the environment) and applies the migrations.
    pub async fn connect(url: &str, password: Option<&str>) -> Result<PostgresStore, StoreError> {
        let mut options = PgConnectOptions::from_str(url)?.application_name("kiln");
        if let Some(password) = password {
            options = options.password(password);
        }
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(Duration::from_secs(30))
            .connect_with(options)
            .await?;
        // sqlx serializes concurrent migrators with an advisory lock of its own.
        sqlx::migrate!("migrations/postgres").run(&pool).await?;
        Ok(PostgresStore { pool })
    }

    /// Takes the owner lock: `None` when another process holds it. One `kiln serve` per
    /// database holds it for as long as it runs, so that restart recovery never marks another
    /// live server's runs as interrupted.
    pub async fn lock_owner(&self) -> Result<Option<PostgresOwnerLock>, StoreError> {
        let mut connection = self.pool.acquire().await?;
        let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(OWNER_LOCK_KEY)
            .fetch_one(&mut *connection)
            .await?;
        if !locked {
            return Ok(None);
        }
        // The lock lives as long as this session: keep the connection out of the pool.
        Ok(Some(PostgresOwnerLock {
            _connection: connection.detach(),
        }))
    }

    async fn run_by_id(&self, id: &str) -> Result<RunRecord, StoreError> {
        self.get(id)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))
    }

    /// One claim attempt: `Err` with a unique violation when another claimer started a run of
    /// the same concurrency group first.
    async fn try_claim(&self) -> Result<Option<String>, sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        // The oldest queued run whose concurrency group (if any) has nothing running, skipping
        // runs other claimers hold. A run of a group is only a candidate when it is the group's
        // oldest queued one: skipping a locked run must not let a younger run of its group
        // start first.
        let id: Option<String> = sqlx::query_scalar(
            "SELECT q.id FROM runs q WHERE q.status = 'queued' AND (q.concurrency_group IS NULL \
             OR (NOT EXISTS (SELECT 1 FROM runs r WHERE r.status = 'running' \
             AND r.concurrency_group = q.concurrency_group) \
             AND NOT EXISTS (SELECT 1 FROM runs o WHERE o.status = 'queued' \
             AND o.concurrency_group = q.concurrency_group AND o.seq < q.seq))) \
             ORDER BY q.seq LIMIT 1 FOR UPDATE OF q SKIP LOCKED",
        )
        .fetch_optional(&mut *tx)
        .await?;
        let Some(id) = id else {
            tx.commit().await?;
            return Ok(None);
        };
        sqlx::query("UPDATE runs SET status = 'running', started_at = $1 WHERE id = $2")
            .bind(now_ms())
            .bind(&id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(Some(id))
    }
}

#[async_trait]
impl RunStore for PostgresStore {
    async fn enqueue(&self, run: NewRun) -> Result<RunRecord, StoreError> {
        let id = new_run_id();
        let (payload, inputs) = run_json(&run)?;
        sqlx::query(
            "INSERT INTO runs (id, status, forge, repository, clone_url, sha, git_ref, event, \
             workflow_file, workflow_name, payload, inputs, delivery, concurrency_group, \
             cancel_in_progress, rerun_of, created_at) \
             VALUES ($1, 'queued', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, \
             $16)",
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
        .bind(run.cancel_in_progress)
        .bind(&run.rerun_of)
        .bind(now_ms())
        .execute(&self.pool)
        .await?;
        self.run_by_id(&id).await
    }

    async fn claim_next(&self) -> Result<Option<RunRecord>, StoreError> {
        for _ in 0..CLAIM_ATTEMPTS {
            match self.try_claim().await {
                Ok(Some(id)) => return Ok(Some(self.run_by_id(&id).await?)),
                Ok(None) => return Ok(None),
                // Another claimer started a run of this group: its run now counts as running,
                // so the next look skips the group.
                Err(e) if is_unique_violation(&e) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        // Constant contention: report nothing claimable now; the worker looks again soon.
        Ok(None)
    }

    async fn finish(
        &self,
        id: &str,
        result: RunResult,
        error: Option<&str>,
    ) -> Result<RunRecord, StoreError> {
        let done = sqlx::query(
            "UPDATE runs SET status = 'finished', result = $1, error = $2, finished_at = $3 \
             WHERE id = $4 AND status = 'running'",
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
        let mut tx = self.pool.begin().await?;
        let status: String = sqlx::query_scalar("SELECT status FROM runs WHERE id = $1 FOR UPDATE")
            .bind(id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(id.to_owned()))?;
        let status = RunStatus::from_str(&status)?;
        match status {
            RunStatus::Queued => {
                sqlx::query(
                    "UPDATE runs SET status = 'finished', result = 'cancelled', \
                     cancel_requested = TRUE, finished_at = $1 WHERE id = $2",
                )
                .bind(now_ms())
                .bind(id)
                .execute(&mut *tx)
                .await?;
            }
            RunStatus::Running => {
                sqlx::query("UPDATE runs SET cancel_requested = TRUE WHERE id = $1")
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
        let sql = format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1");
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
        // Optional filters as `($n::type IS NULL OR column = $n)`: one statement, no string
        // building from input (the casts give PostgreSQL the parameter types).
        let sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE ($1::text IS NULL OR status = $1) \
             AND ($2::text IS NULL OR result = $2) AND ($3::text IS NULL OR repository = $3) \
             AND ($4::text IS NULL OR sha = $4) AND ($5::bigint IS NULL OR seq < $5) \
             ORDER BY seq DESC LIMIT $6"
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
            "SELECT {RUN_COLUMNS} FROM runs WHERE status = $1 AND concurrency_group = $2 \
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
        // One statement per batch; the ordinality keeps the ids in the batch's order.
        sqlx::query(
            "INSERT INTO events (run_id, body) SELECT $1, b.body \
             FROM unnest($2::text[]) WITH ORDINALITY AS b(body, n) ORDER BY b.n",
        )
        .bind(run)
        .bind(bodies)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn events(
        &self,
        run: &str,
        after: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT id, body FROM events WHERE run_id = $1 AND id > $2 ORDER BY id LIMIT $3",
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
             VALUES ($1, $2, $3, $4, 'pending', $5) ON CONFLICT (source, id) DO NOTHING",
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
             ORDER BY received_at, seq",
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
        sqlx::query("UPDATE deliveries SET status = $1, error = $2 WHERE source = $3 AND id = $4")
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
        let id: i64 = sqlx::query_scalar(
            "INSERT INTO outbox (key, kind, body, status, next_attempt_at, created_at) \
             VALUES ($1, $2, $3, 'pending', $4, $4) RETURNING id",
        )
        .bind(key)
        .bind(kind)
        .bind(body)
        .bind(now)
        .fetch_one(&self.pool)
        .await?;
        Ok(id)
    }

    async fn due_outbox(&self, limit: u32) -> Result<Vec<OutboxItem>, StoreError> {
        let rows = sqlx::query(
            "SELECT o.id, o.key, o.kind, o.body, o.attempts FROM outbox o \
             WHERE o.status = 'pending' AND o.next_attempt_at <= $1 \
             AND NOT EXISTS (SELECT 1 FROM outbox e WHERE e.key = o.key \
             AND e.status = 'pending' AND e.id < o.id) ORDER BY o.id LIMIT $2",
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
                    attempts: u32::try_from(row.try_get::<i32, _>("attempts")?).unwrap_or(0),
                })
            })
            .collect()
    }

    async fn outbox_delivered(&self, id: i64) -> Result<(), StoreError> {
        sqlx::query("UPDATE outbox SET status = 'delivered', delivered_at = $1 WHERE id = $2")
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
            "UPDATE outbox SET status = $1, attempts = attempts + 1, last_error = $2, \
             next_attempt_at = $3 WHERE id = $4",
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
        let mut tx = self.pool.begin().await?;
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM runs WHERE status = 'running' ORDER BY seq FOR UPDATE",
        )
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
                 finished_at = $1 WHERE status = 'running'",
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
            "INSERT INTO report_refs (key, value, created_at) VALUES ($1, $2, $3) \
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
            sqlx::query_scalar("SELECT value FROM report_refs WHERE key = $1")
                .bind(key)
                .fetch_optional(&self.pool)
                .await?,
        )
    }
}
