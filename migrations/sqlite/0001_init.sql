-- dpsync store schema, version 1 (SQLite).
-- Applied by dpsync-store's own migration runner inside one transaction.
-- Keep in step with ../postgres/0001_init.sql: same tables, columns and constraints.
-- Timestamps are unix milliseconds; hashes are lowercase hex TEXT.

-- Site identity and other key/value settings.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY NOT NULL,
    value TEXT NOT NULL
) STRICT;

-- Named counters, e.g. 'package_seq:PS1' (last package number handed out for a site code).
CREATE TABLE counters (
    name  TEXT PRIMARY KEY NOT NULL,
    value INTEGER NOT NULL
) STRICT;

CREATE TABLE packages (
    id              TEXT PRIMARY KEY NOT NULL,           -- site code + 5 uppercase hex digits
    name            TEXT NOT NULL UNIQUE,
    source_path     TEXT,                                -- NULL for packages owned by a parent site
    source_site     TEXT NOT NULL,
    current_version INTEGER NOT NULL DEFAULT 0 CHECK (current_version >= 0),
    created_at      INTEGER NOT NULL
) STRICT;

CREATE TABLE versions (
    package_id      TEXT NOT NULL REFERENCES packages (id) ON DELETE CASCADE,
    version         INTEGER NOT NULL CHECK (version > 0),
    content_root    TEXT NOT NULL,
    manifest        BLOB NOT NULL,
    scan_cache      BLOB NOT NULL,
    files           INTEGER NOT NULL,
    dirs            INTEGER NOT NULL,
    symlinks        INTEGER NOT NULL,
    total_bytes     INTEGER NOT NULL,
    files_added     INTEGER NOT NULL,
    files_changed   INTEGER NOT NULL,
    files_removed   INTEGER NOT NULL,
    files_unchanged INTEGER NOT NULL,
    bytes_hashed    INTEGER NOT NULL,
    origin          TEXT NOT NULL,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (package_id, version)
) STRICT;

-- Distribution points and child sites.
CREATE TABLE targets (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,        -- never reused
    name       TEXT NOT NULL UNIQUE,
    kind       TEXT NOT NULL CHECK (kind IN ('dp', 'site')),
    url        TEXT NOT NULL,
    token      TEXT,
    grp        TEXT,
    rate_limit INTEGER,
    created_at INTEGER NOT NULL
) STRICT;

-- One durable job row per (package, target).
-- generation: bumped by every request that changes what the row asks for (commit, assign, request_action);
-- claimed_generation: the generation a worker claimed, so finish() can tell a superseded job;
-- claim_token: identifies the rows taken by one claim_due() call.
CREATE TABLE distributions (
    package_id         TEXT NOT NULL REFERENCES packages (id) ON DELETE CASCADE,
    target_id          INTEGER NOT NULL REFERENCES targets (id) ON DELETE CASCADE,
    state              TEXT NOT NULL CHECK (state IN ('pending', 'in_progress', 'installed', 'retrying',
                                                      'failed', 'validation_failed', 'removing', 'removed')),
    action             TEXT NOT NULL CHECK (action IN ('install', 'redistribute', 'remove', 'validate')),
    desired_version    INTEGER NOT NULL DEFAULT 0,
    installed_version  INTEGER,
    attempts           INTEGER NOT NULL DEFAULT 0,
    next_attempt_at    INTEGER NOT NULL,
    last_error         TEXT,
    bytes_sent_last    INTEGER NOT NULL DEFAULT 0,
    bytes_sent_total   INTEGER NOT NULL DEFAULT 0,
    generation         INTEGER NOT NULL DEFAULT 1,
    claimed_generation INTEGER NOT NULL DEFAULT 0,
    claim_token        INTEGER,
    updated_at         INTEGER NOT NULL,
    PRIMARY KEY (package_id, target_id)
) STRICT;

CREATE INDEX distributions_due ON distributions (next_attempt_at)
    WHERE state IN ('pending', 'retrying', 'removing');
CREATE INDEX distributions_target ON distributions (target_id);
CREATE INDEX distributions_claim ON distributions (claim_token);
CREATE INDEX targets_grp ON targets (grp);
