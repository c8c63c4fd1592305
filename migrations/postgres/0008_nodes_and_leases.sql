-- Several server nodes of one site on one database (PostgreSQL): each running job is
-- leased by the node that claimed it, which renews the lease while it works; a row whose
-- lease ran out is claimable by any node. Nodes record a heartbeat for `dpsync info`.
ALTER TABLE distributions ADD COLUMN claimed_by TEXT;
ALTER TABLE distributions ADD COLUMN lease_until BIGINT;

CREATE TABLE nodes (
    name          TEXT PRIMARY KEY NOT NULL,
    instance      TEXT NOT NULL,
    started_at    BIGINT NOT NULL,
    heartbeat_at  BIGINT NOT NULL,
    -- Set by a clean stop: the name is free at once, and the node is not alive.
    stopped_at    BIGINT
);
