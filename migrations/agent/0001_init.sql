-- DP agent state (SQLite only: an agent's state is local to its machine).
CREATE TABLE packages (
    id                  TEXT PRIMARY KEY,
    installed_version   INTEGER,
    installed_root      TEXT,
    installed_dir       TEXT,
    installed_manifest  BLOB,
    previous_version    INTEGER,
    previous_dir        TEXT,
    previous_manifest   BLOB,
    broken              INTEGER NOT NULL DEFAULT 0,
    updated_at          INTEGER NOT NULL
);

-- A manifest offered and not yet committed.
CREATE TABLE staged (
    package       TEXT NOT NULL,
    version       INTEGER NOT NULL,
    content_root  TEXT NOT NULL,
    manifest      BLOB NOT NULL,
    force         INTEGER NOT NULL,
    created_at    INTEGER NOT NULL,
    PRIMARY KEY (package, version)
);

-- Verified chunks received for a package, in pack files under staging/.
CREATE TABLE staged_chunks (
    package   TEXT NOT NULL,
    chunk_id  BLOB NOT NULL,
    pack      TEXT NOT NULL,
    offset    INTEGER NOT NULL,
    len       INTEGER NOT NULL,
    PRIMARY KEY (package, chunk_id)
);

-- Where each chunk of installed content can be read: (library object, offset).
CREATE TABLE chunk_index (
    chunk_id   BLOB PRIMARY KEY,
    file_hash  BLOB NOT NULL,
    offset     INTEGER NOT NULL,
    len        INTEGER NOT NULL
);
CREATE INDEX chunk_index_by_file ON chunk_index (file_hash);
