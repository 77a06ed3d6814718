-- Resilience: see migrations/sqlite/0005_resilience.sql.
ALTER TABLE circuits ADD COLUMN failures BIGINT NOT NULL DEFAULT 0;
ALTER TABLE circuits ADD COLUMN opens BIGINT NOT NULL DEFAULT 1;
ALTER TABLE circuits ADD COLUMN reason TEXT;

ALTER TABLE alerts ADD COLUMN level TEXT NOT NULL DEFAULT 'error';
ALTER TABLE alerts ADD COLUMN delivered_at BIGINT;
ALTER TABLE alerts ADD COLUMN delivery_attempts BIGINT NOT NULL DEFAULT 0;
ALTER TABLE alerts ADD COLUMN next_delivery_at BIGINT;
ALTER TABLE alerts ADD COLUMN delivery_error TEXT;
UPDATE alerts SET delivered_at = at, kind = CASE kind WHEN 'tripped' THEN 'circuit_opened' ELSE kind END;
ALTER TABLE alerts DROP CONSTRAINT alerts_workflow_id_seq_key;
ALTER TABLE alerts ADD CONSTRAINT alerts_workflow_id_seq_kind_key UNIQUE (workflow_id, seq, kind);
CREATE INDEX alerts_undelivered ON alerts (id) WHERE delivered_at IS NULL;

CREATE TABLE schedules (
    name       TEXT PRIMARY KEY,
    last_tick  BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
