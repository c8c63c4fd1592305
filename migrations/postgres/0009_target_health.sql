-- Since when a target's jobs have been failing (unix milliseconds; NULL: its last job
-- succeeded, or it has not been tried). The job runner claims such targets after the
-- others and gives them a small pool of slots of their own, so thousands of dead or
-- hung targets never queue the live ones. Per target, not per distribution: a new
-- version resets its rows' attempts but not what the site learnt of the target.
ALTER TABLE targets ADD COLUMN failing_since BIGINT;
