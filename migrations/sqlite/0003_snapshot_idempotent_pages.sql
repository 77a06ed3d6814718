-- Snapshot pages are written idempotently: a page re-read after a crash (written, but its
-- journal entry not yet durable) is written again and must change nothing. Items remember
-- the source row they came from, so that a second row with the same SKU is told apart
-- from the same row written twice; rejects are unique per row and reason.
ALTER TABLE snapshot_items ADD COLUMN row_key TEXT;
DELETE FROM snapshot_rejects WHERE rowid NOT IN (
    SELECT MIN(rowid) FROM snapshot_rejects GROUP BY snapshot_id, row_key, reason);
CREATE UNIQUE INDEX snapshot_rejects_once ON snapshot_rejects (snapshot_id, row_key, reason);
