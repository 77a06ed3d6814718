-- Bulwark's embedded (SQLite) schema. Times are milliseconds since the Unix epoch.

-- One row a run: a set of workflows started together (a sync run, a snapshot).
CREATE TABLE runs (
    id          INTEGER PRIMARY KEY,
    kind        TEXT    NOT NULL,
    status      TEXT    NOT NULL,          -- running | finished | cancelled
    params_json TEXT    NOT NULL,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER
);

-- Every workflow, one row each. `seq` is the last journaled sequence number; appends
-- are conditional on (seq, lease_epoch). The current state is the journal row at
-- (id, seq): keeping it only there halves what each transition writes.
CREATE TABLE workflows (
    id          INTEGER PRIMARY KEY,
    run_id      INTEGER NOT NULL REFERENCES runs(id),
    kind        TEXT    NOT NULL,
    subject     TEXT    NOT NULL,          -- what the workflow is about, e.g. an endpoint id
    status      TEXT    NOT NULL,          -- state variant name
    seq         INTEGER NOT NULL,
    lease_owner TEXT,
    lease_epoch INTEGER NOT NULL DEFAULT 0,
    lease_until INTEGER,
    wake_at     INTEGER,
    terminal    INTEGER NOT NULL DEFAULT 0,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    UNIQUE (run_id, subject)
);
CREATE INDEX workflows_open ON workflows (terminal, kind, run_id);
CREATE INDEX workflows_subject ON workflows (subject);

-- Immutable workflow inputs, kept apart from the hot row every transition rewrites.
CREATE TABLE workflow_inputs (
    workflow_id INTEGER PRIMARY KEY,
    input_json  TEXT NOT NULL
);

-- Append-only history: the event applied and the state it produced. Row 0 holds the
-- initial state (no event). A rowid table on purpose: rows are appended in commit order,
-- so a group commit dirties a few tail pages plus the small (workflow_id, seq) index,
-- not one page of a clustered table per workflow.
CREATE TABLE journal (
    workflow_id INTEGER NOT NULL,
    seq         INTEGER NOT NULL,
    at          INTEGER NOT NULL,
    worker      TEXT    NOT NULL,
    epoch       INTEGER NOT NULL,
    event_json  TEXT,
    state_json  TEXT    NOT NULL,
    UNIQUE (workflow_id, seq)
);

-- Alerts raised atomically with the transition that caused them.
CREATE TABLE alerts (
    id          INTEGER PRIMARY KEY,
    at          INTEGER NOT NULL,
    kind        TEXT    NOT NULL,
    subject     TEXT    NOT NULL,
    workflow_id INTEGER,
    seq         INTEGER,
    message     TEXT    NOT NULL,
    UNIQUE (workflow_id, seq)
);

-- Per-subject circuit breakers (an open circuit skips the subject until retry_at).
CREATE TABLE circuits (
    subject   TEXT PRIMARY KEY,
    state     TEXT    NOT NULL,             -- open | closed
    opened_at INTEGER NOT NULL,
    retry_at  INTEGER NOT NULL
);

-- Staging: immutable once sealed. Sync runs read only sealed snapshots.
CREATE TABLE snapshots (
    id           INTEGER PRIMARY KEY,
    source       TEXT    NOT NULL,
    status       TEXT    NOT NULL,          -- filling | sealed | aborted
    rows_read    INTEGER NOT NULL DEFAULT 0,
    rows_accepted INTEGER NOT NULL DEFAULT 0,
    rows_rejected INTEGER NOT NULL DEFAULT 0,
    queries      INTEGER NOT NULL DEFAULT 0,
    content_hash TEXT,
    started_at   INTEGER NOT NULL,
    sealed_at    INTEGER
);

CREATE TABLE snapshot_items (
    snapshot_id INTEGER NOT NULL,
    sku         TEXT    NOT NULL,
    qty         INTEGER NOT NULL,
    tiers_json  TEXT    NOT NULL,
    PRIMARY KEY (snapshot_id, sku)
) WITHOUT ROWID;

CREATE TABLE snapshot_rejects (
    snapshot_id INTEGER NOT NULL,
    row_key     TEXT    NOT NULL,
    reason      TEXT    NOT NULL
);

-- What each endpoint last confirmed (verified in full): the snapshot its values equal.
CREATE TABLE endpoint_confirmed (
    endpoint_id TEXT PRIMARY KEY,
    snapshot_id INTEGER NOT NULL,
    run_id      INTEGER NOT NULL,
    at          INTEGER NOT NULL
);
