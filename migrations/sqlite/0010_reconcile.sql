-- The last reconcile of each endpoint (`bulwark reconcile`, `[schedule] reconcile`): what
-- it read back against the snapshot the endpoint had confirmed, how many items showed other
-- values (drift, sent again by `run_id`'s sync), and how many could not be read. `skipped`:
-- why the endpoint was not read (its circuit is open, its adapter cannot read back, ...).
-- `detail`: the first differences, e.g. "SKU-1: qty expected 5 shown 3".
CREATE TABLE endpoint_reconcile (
    endpoint_id TEXT PRIMARY KEY,
    at BIGINT NOT NULL,
    snapshot_id BIGINT,
    items_read BIGINT NOT NULL,
    drifted BIGINT NOT NULL,
    unread BIGINT NOT NULL,
    run_id BIGINT,
    skipped TEXT,
    detail TEXT NOT NULL
);
