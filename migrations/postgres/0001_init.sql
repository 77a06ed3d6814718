-- Bulwark's PostgreSQL schema (several workers on one database). Times are milliseconds
-- since the Unix epoch. Mirrors migrations/sqlite/0001_init.sql.

CREATE TABLE runs (
    id          BIGSERIAL PRIMARY KEY,
    kind        TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    params_json TEXT    NOT NULL,
    created_at  BIGINT  NOT NULL,
    finished_at BIGINT
);

CREATE TABLE workflows (
    id          BIGSERIAL PRIMARY KEY,
    run_id      BIGINT  NOT NULL REFERENCES runs(id),
    kind        TEXT    NOT NULL,
    subject     TEXT    NOT NULL,
    status      TEXT    NOT NULL,
    seq         BIGINT  NOT NULL,
    lease_owner TEXT,
    lease_epoch BIGINT  NOT NULL DEFAULT 0,
    lease_until BIGINT,
    wake_at     BIGINT,
    terminal    BOOLEAN NOT NULL DEFAULT FALSE,
    created_at  BIGINT  NOT NULL,
    updated_at  BIGINT  NOT NULL,
    UNIQUE (run_id, subject)
);
-- Claims scan only open workflows.
CREATE INDEX workflows_open ON workflows (kind, id) WHERE NOT terminal;
CREATE INDEX workflows_subject ON workflows (subject);

CREATE TABLE workflow_inputs (
    workflow_id BIGINT PRIMARY KEY,
    input_json  TEXT NOT NULL
);

CREATE TABLE journal (
    workflow_id BIGINT NOT NULL,
    seq         BIGINT NOT NULL,
    at          BIGINT NOT NULL,
    worker      TEXT   NOT NULL,
    epoch       BIGINT NOT NULL,
    event_json  TEXT,
    state_json  TEXT   NOT NULL,
    PRIMARY KEY (workflow_id, seq)
);

CREATE TABLE alerts (
    id          BIGSERIAL PRIMARY KEY,
    at          BIGINT NOT NULL,
    kind        TEXT   NOT NULL,
    subject     TEXT   NOT NULL,
    workflow_id BIGINT,
    seq         BIGINT,
    message     TEXT   NOT NULL,
    UNIQUE (workflow_id, seq)
);

CREATE TABLE circuits (
    subject   TEXT PRIMARY KEY,
    state     TEXT   NOT NULL,
    opened_at BIGINT NOT NULL,
    retry_at  BIGINT NOT NULL
);

CREATE TABLE snapshots (
    id            BIGSERIAL PRIMARY KEY,
    source        TEXT   NOT NULL,
    status        TEXT   NOT NULL,
    rows_read     BIGINT NOT NULL DEFAULT 0,
    rows_accepted BIGINT NOT NULL DEFAULT 0,
    rows_rejected BIGINT NOT NULL DEFAULT 0,
    queries       BIGINT NOT NULL DEFAULT 0,
    content_hash  TEXT,
    started_at    BIGINT NOT NULL,
    sealed_at     BIGINT
);

CREATE TABLE snapshot_items (
    snapshot_id BIGINT NOT NULL,
    sku         TEXT   NOT NULL,
    qty         BIGINT NOT NULL,
    tiers_json  TEXT   NOT NULL,
    PRIMARY KEY (snapshot_id, sku)
);

CREATE TABLE snapshot_rejects (
    snapshot_id BIGINT NOT NULL,
    row_key     TEXT   NOT NULL,
    reason      TEXT   NOT NULL
);

CREATE TABLE endpoint_confirmed (
    endpoint_id TEXT PRIMARY KEY,
    snapshot_id BIGINT NOT NULL,
    run_id      BIGINT NOT NULL,
    at          BIGINT NOT NULL
);
