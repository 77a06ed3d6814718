-- Items an endpoint refused (a value out of its range, a SKU it does not know): the endpoint
-- keeps what it had for them while the rest of its catalog syncs. Written when a sync run
-- finishes; a row goes away when a later sync carries the SKU again and the endpoint takes
-- it. `retry_requested`: an operator asked (`bulwark retry`) that the next sync carries the
-- SKU even if the snapshot did not change it.
CREATE TABLE endpoint_quarantine (
    endpoint_id TEXT NOT NULL,
    sku TEXT NOT NULL,
    snapshot_id BIGINT NOT NULL,
    run_id BIGINT NOT NULL,
    reason TEXT NOT NULL,
    at BIGINT NOT NULL,
    retry_requested INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (endpoint_id, sku)
);

-- Endpoints whose last sync ended without confirming (tripped, cancelled): what it sent may
-- have landed, so the next sync reads back before it writes. Cleared when one confirms.
CREATE TABLE endpoint_unsettled (
    endpoint_id TEXT PRIMARY KEY,
    snapshot_id BIGINT NOT NULL,
    run_id BIGINT NOT NULL,
    status TEXT NOT NULL,
    at BIGINT NOT NULL
);
