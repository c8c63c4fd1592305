-- Manifests stored once per (package, content root): versions with the same content (an
-- unchanged refresh, a rollback, a relay of the same content) reference one row, and an
-- unchanged refresh writes no manifest at all. The scan cache goes with the manifest: it
-- holds the stats the source files had when the hashes of that manifest were taken, so it
-- is valid for that content whichever version carries it. A manifest row lives as long as
-- a version of its package names its content root (pruning drops the others).
CREATE TABLE manifests (
    package_id   TEXT NOT NULL REFERENCES packages (id) ON DELETE CASCADE,
    content_root TEXT NOT NULL,
    manifest     BLOB NOT NULL,
    scan_cache   BLOB NOT NULL,
    PRIMARY KEY (package_id, content_root)
) STRICT;

-- Each content root's manifest, with the scan cache of its newest version.
INSERT INTO manifests (package_id, content_root, manifest, scan_cache)
SELECT v.package_id, v.content_root, v.manifest, v.scan_cache
  FROM versions v
 WHERE v.version = (SELECT MAX(w.version) FROM versions w
                     WHERE w.package_id = v.package_id AND w.content_root = v.content_root);

ALTER TABLE versions DROP COLUMN manifest;
ALTER TABLE versions DROP COLUMN scan_cache;
