-- Send windows per target (one canonical spec per line), and a flag marking a job that
-- waits for its target's next window (state 'retrying' with next_attempt_at = when the
-- window opens; shown as 'waiting_window').
ALTER TABLE targets ADD COLUMN windows TEXT;
ALTER TABLE distributions ADD COLUMN window_wait BIGINT NOT NULL DEFAULT 0;
