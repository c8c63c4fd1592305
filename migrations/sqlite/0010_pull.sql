-- Pull DPs: where a DP fetches the chunks it lacks (one source DP name per line, in rank
-- order, or `auto`; NULL: the site pushes everything), and what it fetched from peers.
ALTER TABLE targets ADD COLUMN pull_sources TEXT;
ALTER TABLE distributions ADD COLUMN bytes_from_peers_last INTEGER NOT NULL DEFAULT 0;
