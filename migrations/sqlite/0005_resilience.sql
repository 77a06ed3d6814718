-- Resilience: circuits remember how often they opened in a row (the cooldown doubles
-- with each failed half-open probe) and why; alerts carry a level and are an outbox for
-- the webhook (delivery state per alert); a transition may raise several alerts (one per
-- kind); schedules remember the tick they last fired at.
ALTER TABLE circuits ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
ALTER TABLE circuits ADD COLUMN opens INTEGER NOT NULL DEFAULT 1;
ALTER TABLE circuits ADD COLUMN reason TEXT;

CREATE TABLE alerts_v5 (
    id                INTEGER PRIMARY KEY,
    at                INTEGER NOT NULL,
    kind              TEXT    NOT NULL,
    level             TEXT    NOT NULL DEFAULT 'error',   -- warn | error
    subject           TEXT    NOT NULL,
    workflow_id       INTEGER,
    seq               INTEGER,
    message           TEXT    NOT NULL,
    delivered_at      INTEGER,                            -- webhook received it
    delivery_attempts INTEGER NOT NULL DEFAULT 0,
    next_delivery_at  INTEGER,                            -- lease / retry time of the next attempt
    delivery_error    TEXT,
    UNIQUE (workflow_id, seq, kind)
);
-- Alerts from before webhooks existed count as delivered: no flood on upgrade.
INSERT INTO alerts_v5 (id, at, kind, subject, workflow_id, seq, message, delivered_at)
    SELECT id, at, CASE kind WHEN 'tripped' THEN 'circuit_opened' ELSE kind END,
           subject, workflow_id, seq, message, at
    FROM alerts;
DROP TABLE alerts;
ALTER TABLE alerts_v5 RENAME TO alerts;
CREATE INDEX alerts_undelivered ON alerts (id) WHERE delivered_at IS NULL;

CREATE TABLE schedules (
    name       TEXT PRIMARY KEY,
    last_tick  INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
