-- Source-data safety: see migrations/sqlite/0007_snapshot_safety.sql.
ALTER TABLE snapshot_items ADD COLUMN carried_from BIGINT;
ALTER TABLE snapshots ADD COLUMN held_reason TEXT;
