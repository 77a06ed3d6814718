-- A rejected row remembers its SKU when it had a readable one (the row key is the source's
-- paging key, which may differ from the SKU: padding, another encoding, an excerpt of an
-- oversized key). Carry-forward matches rejected rows to SKUs through it.
ALTER TABLE snapshot_rejects ADD COLUMN sku TEXT;
