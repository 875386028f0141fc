-- What a forge answered to one report that later reports need (a check run's id, keyed like the
-- outbox items that create and update it).
CREATE TABLE report_refs (
    key        TEXT    PRIMARY KEY,
    value      TEXT    NOT NULL,
    created_at INTEGER NOT NULL
);
