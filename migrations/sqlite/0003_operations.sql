-- Operations on targets: when a distribution's last error happened, failed rows that are
-- retried slowly (claimable like retrying ones), and packages assigned to DP groups.
-- Keep in step with ../postgres/0003_operations.sql.

-- Unix milliseconds of `last_error`; NULL when there is none.
ALTER TABLE distributions ADD COLUMN last_error_at INTEGER;

-- A `failed` row is tried again at `next_attempt_at` (the slow retry).
DROP INDEX distributions_due;
CREATE INDEX distributions_due ON distributions (next_attempt_at)
    WHERE state IN ('pending', 'retrying', 'removing', 'failed');

-- `distribute PKG --group G`: the package belongs to the group itself, so a target that
-- joins the group later receives it.
CREATE TABLE group_packages (
    grp        TEXT NOT NULL,
    package_id TEXT NOT NULL REFERENCES packages (id) ON DELETE CASCADE,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (grp, package_id)
) STRICT;
CREATE INDEX group_packages_package ON group_packages (package_id);
