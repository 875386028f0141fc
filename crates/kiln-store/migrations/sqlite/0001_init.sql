-- kiln's run store, SQLite dialect. Times are Unix milliseconds (UTC).

-- One row per workflow run. `seq` orders the queue; `id` is the public id.
CREATE TABLE runs (
    seq               INTEGER PRIMARY KEY AUTOINCREMENT,
    id                TEXT    NOT NULL UNIQUE,
    status            TEXT    NOT NULL CHECK (status IN ('queued', 'running', 'finished')),
    result            TEXT             CHECK (result IN ('success', 'failure', 'cancelled', 'error')),
    error             TEXT,
    forge             TEXT    NOT NULL,
    repository        TEXT    NOT NULL,
    clone_url         TEXT    NOT NULL,
    sha               TEXT    NOT NULL,
    git_ref           TEXT    NOT NULL,
    event             TEXT    NOT NULL,
    workflow_file     TEXT    NOT NULL,
    workflow_name     TEXT    NOT NULL,
    payload           TEXT    NOT NULL,
    inputs            TEXT    NOT NULL,
    delivery          TEXT,
    concurrency_group TEXT,
    cancel_in_progress INTEGER NOT NULL DEFAULT 0,
    rerun_of          TEXT,
    cancel_requested  INTEGER NOT NULL DEFAULT 0,
    created_at        INTEGER NOT NULL,
    started_at        INTEGER,
    finished_at       INTEGER
);
CREATE INDEX runs_queue ON runs (status, seq);
CREATE INDEX runs_repository ON runs (repository, seq);

-- Every RunEvent of every run, in the order it was emitted.
CREATE TABLE events (
    id     INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT    NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    body   TEXT    NOT NULL
);
CREATE INDEX events_run ON events (run_id, id);

-- Webhook deliveries: de-duplication by (source, id), and the durable hand-off from the HTTP
-- handler to the intake task (a delivery is `pending` until its runs are enqueued).
CREATE TABLE deliveries (
    source      TEXT    NOT NULL,
    id          TEXT    NOT NULL,
    event       TEXT    NOT NULL,
    payload     TEXT    NOT NULL,
    status      TEXT    NOT NULL CHECK (status IN ('pending', 'done', 'failed')),
    error       TEXT,
    received_at INTEGER NOT NULL,
    PRIMARY KEY (source, id)
);
CREATE INDEX deliveries_pending ON deliveries (status, received_at);

-- Reports to forges (commit statuses), retried with backoff until delivered. Items with the same
-- `key` (one status context of one commit) are delivered strictly in `id` order.
CREATE TABLE outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    key             TEXT    NOT NULL,
    kind            TEXT    NOT NULL,
    body            TEXT    NOT NULL,
    status          TEXT    NOT NULL CHECK (status IN ('pending', 'delivered', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    delivered_at    INTEGER
);
CREATE INDEX outbox_due ON outbox (status, next_attempt_at, id);
CREATE INDEX outbox_key ON outbox (key, status, id);
