-- The http adapter's lookup cache: a platform's own ids for SKUs, per profile and
-- endpoint. Entries are removed when a write answers "not found" (the id went stale).
-- `IF NOT EXISTS`: the adapter's SqliteIdCache creates the same table when it starts.
CREATE TABLE IF NOT EXISTS adapter_id_cache (
    profile    TEXT    NOT NULL,
    endpoint   TEXT    NOT NULL,
    sku        TEXT    NOT NULL,
    remote_id  TEXT    NOT NULL,
    updated_at INTEGER NOT NULL,
    PRIMARY KEY (profile, endpoint, sku)
) WITHOUT ROWID;
