-- kiln's run store, PostgreSQL dialect: the same tables and meanings as the SQLite one. Times are
-- Unix milliseconds (UTC), as there, so both stores compute due times and durations alike.

-- One row per workflow run. `seq` orders the queue; `id` is the public id.
CREATE TABLE runs (
    seq                BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id                 TEXT    NOT NULL UNIQUE,
    status             TEXT    NOT NULL CHECK (status IN ('queued', 'running', 'finished')),
    result             TEXT             CHECK (result IN ('success', 'failure', 'cancelled', 'error')),
    error              TEXT,
    forge              TEXT    NOT NULL,
    repository         TEXT    NOT NULL,
    clone_url          TEXT    NOT NULL,
    sha                TEXT    NOT NULL,
    git_ref            TEXT    NOT NULL,
    event              TEXT    NOT NULL,
    workflow_file      TEXT    NOT NULL,
    workflow_name      TEXT    NOT NULL,
    payload            TEXT    NOT NULL,
    inputs             TEXT    NOT NULL,
    delivery           TEXT,
    concurrency_group  TEXT,
    cancel_in_progress BOOLEAN NOT NULL DEFAULT FALSE,
    rerun_of           TEXT,
    cancel_requested   BOOLEAN NOT NULL DEFAULT FALSE,
    created_at         BIGINT  NOT NULL,
    started_at         BIGINT,
    finished_at        BIGINT
);
CREATE INDEX runs_queue ON runs (status, seq);
CREATE INDEX runs_repository ON runs (repository, seq);
-- At most one running run per concurrency group, enforced by the database: two claimers that
-- each pick a different queued run of one group cannot both start it (the second one's claim
-- fails with a unique violation and looks again).
CREATE UNIQUE INDEX runs_one_running_per_group ON runs (concurrency_group)
    WHERE status = 'running' AND concurrency_group IS NOT NULL;

-- Every RunEvent of every run, in the order it was emitted.
CREATE TABLE events (
    id     BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id TEXT   NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    body   TEXT   NOT NULL
);
CREATE INDEX events_run ON events (run_id, id);

-- Webhook deliveries: de-duplication by (source, id), and the durable hand-off from the HTTP
-- handler to the intake task (a delivery is `pending` until its runs are enqueued).
CREATE TABLE deliveries (
    seq         BIGINT GENERATED ALWAYS AS IDENTITY,
    source      TEXT   NOT NULL,
    id          TEXT   NOT NULL,
    event       TEXT   NOT NULL,
    payload     TEXT   NOT NULL,
    status      TEXT   NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    error       TEXT,
    received_at BIGINT NOT NULL,
    PRIMARY KEY (source, id)
);
CREATE INDEX deliveries_pending ON deliveries (status, received_at, seq);

-- Reports to forges (commit statuses, check runs), retried with backoff until delivered. Items
-- with the same `key` are delivered strictly in `id` order.
CREATE TABLE outbox (
    id              BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    key             TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    body            TEXT    NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at BIGINT  NOT NULL,
    last_error      TEXT,
    created_at      BIGINT  NOT NULL,
    delivered_at    BIGINT
);
CREATE INDEX outbox_due ON outbox (status, next_attempt_at, id);
CREATE INDEX outbox_key ON outbox (key, status, id);

-- What a forge answered to one report that later reports need (a check run's id, keyed like the
-- outbox items that create and update it).
CREATE TABLE report_refs (
    key        TEXT   PRIMARY KEY,
    value      TEXT   NOT NULL,
    created_at BIGINT NOT NULL
);
