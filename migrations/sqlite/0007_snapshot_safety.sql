-- Source-data safety. A row rejected at snapshot keeps the SKU's last accepted value: the
-- item is copied from the previous sealed snapshot and marked with where it came from.
-- A snapshot whose change against the previous sealed one is too large is sealed `held`
-- (its reason kept here) and syncs nothing until an operator approves it.
ALTER TABLE snapshot_items ADD COLUMN carried_from INTEGER;
ALTER TABLE snapshots ADD COLUMN held_reason TEXT;
