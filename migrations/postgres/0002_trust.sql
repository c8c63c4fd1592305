-- TLS certificate pinning per target, and the owning site's signature per version.
ALTER TABLE targets ADD COLUMN tls_fingerprint TEXT;
ALTER TABLE versions ADD COLUMN signature TEXT;
