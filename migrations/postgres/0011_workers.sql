-- Long-running workers (`bulwark worker`, `Bulwark::work`) and their heartbeats: each beat
-- (every third of the lease) upserts its row, so `bulwark status` can show who works here,
-- with which lease, when it was last heard of, and which ones stopped beating.
CREATE TABLE workers (
    worker TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL,
    last_beat BIGINT NOT NULL,
    lease_ms BIGINT NOT NULL
);
