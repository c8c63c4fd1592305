-- A chunk can be read from every installed file that holds it, not only the first one
-- indexed: when that file is removed, the others still answer for the chunk.
CREATE TABLE chunk_locations (
    chunk_id   BLOB NOT NULL,
    file_hash  BLOB NOT NULL,
    offset     INTEGER NOT NULL,
    len        INTEGER NOT NULL,
    PRIMARY KEY (chunk_id, file_hash)
);
INSERT INTO chunk_locations (chunk_id, file_hash, offset, len)
    SELECT chunk_id, file_hash, offset, len FROM chunk_index;
DROP TABLE chunk_index;
ALTER TABLE chunk_locations RENAME TO chunk_index;
CREATE INDEX chunk_index_by_file ON chunk_index (file_hash);
