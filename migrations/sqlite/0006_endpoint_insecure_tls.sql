-- Endpoints whose configuration turns TLS certificate verification off
-- (`insecure_skip_verify = true`), as recorded by the last sync or worker that started
-- with them: `bulwark status` and the dashboard show them.
CREATE TABLE endpoint_insecure_tls (
    endpoint_id TEXT PRIMARY KEY,
    recorded_at BIGINT NOT NULL
);
