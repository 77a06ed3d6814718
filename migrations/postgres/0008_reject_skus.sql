-- Rejected rows remember their SKU: see migrations/sqlite/0008_reject_skus.sql.
ALTER TABLE snapshot_rejects ADD COLUMN sku TEXT;
