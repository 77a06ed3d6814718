-- The http adapter's lookup cache: a platform's own ids for SKUs, per profile and
-- endpoint. Entries are removed when a write answers "not found" (the id went stale).
-- Mirrors migrations/sqlite/0002_http_lookup_cache.sql.
CREATE TABLE IF NOT EXISTS adapter_id_cache (
    profile    TEXT    NOT NULL,
    endpoint   TEXT    NOT NULL,
    sku        TEXT    NOT NULL,
    remote_id  TEXT    NOT NULL,
    updated_at BIGINT NOT NULL,
    PRIMARY KEY (profile, endpoint, sku)
);
