-- When each distribution last finished an install (unix milliseconds), for the
-- `dpsync_site_target_last_success_timestamp_seconds` metric operators alert on.
ALTER TABLE distributions ADD COLUMN last_success_at BIGINT;
