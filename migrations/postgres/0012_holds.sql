-- Operator holds (`bulwark pause`): a held subject's workflows are not claimed by any
-- worker, and one in flight stops before its next command, untouched (no retry used, no
-- failure counted), until the hold is lifted (`bulwark resume`).
CREATE TABLE holds (
    subject    TEXT PRIMARY KEY,
    reason     TEXT NOT NULL,
    held_by    TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
