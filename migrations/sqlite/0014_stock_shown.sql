-- Compare-and-set stock (`stock_policy = "compare_and_set"`): SKUs whose last confirmed
-- write was lowered because the shop sold some since the write before. `compare` is what
-- the endpoint showed after that write, `basis` the (mapped) quantity it was made for. The
-- next write of the SKU compares with `compare`; a confirmed write that was not lowered
-- removes the row (the endpoint then shows what it last confirmed).
CREATE TABLE endpoint_stock_shown (
    endpoint_id TEXT NOT NULL,
    sku TEXT NOT NULL,
    compare BIGINT NOT NULL,
    basis BIGINT NOT NULL,
    run_id BIGINT NOT NULL,
    at BIGINT NOT NULL,
    PRIMARY KEY (endpoint_id, sku)
);
