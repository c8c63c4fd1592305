-- Package lifecycle and schedules (keep in step with ../postgres/0004_package_lifecycle.sql).
-- priority: 2 high, 1 medium, 0 low; the job runner claims due jobs of higher priority first.
ALTER TABLE packages ADD COLUMN priority INTEGER NOT NULL DEFAULT 1 CHECK (priority IN (0, 1, 2));
-- Scheduled refresh: every refresh_every_ms (NULL: none), next due at next_refresh_at;
-- schedule_error: why the last scheduled refresh failed (NULL once one succeeds).
ALTER TABLE packages ADD COLUMN refresh_every_ms INTEGER CHECK (refresh_every_ms > 0);
ALTER TABLE packages ADD COLUMN next_refresh_at INTEGER;
ALTER TABLE packages ADD COLUMN schedule_error TEXT;
-- Set by `package delete`: the package is being removed from its targets; its rows go
-- once every distribution is removed.
ALTER TABLE packages ADD COLUMN deleting_since INTEGER;
-- Scheduled validation of a target's content: every validate_every_ms (NULL: none).
ALTER TABLE targets ADD COLUMN validate_every_ms INTEGER CHECK (validate_every_ms > 0);
ALTER TABLE targets ADD COLUMN next_validate_at INTEGER;
-- When the content of this package on this target was last checked by a validation.
ALTER TABLE distributions ADD COLUMN last_validated_at INTEGER;
