-- The last validation of each installed package (unix milliseconds, and whether every
-- file matched), shown on the agent's status page.
ALTER TABLE packages ADD COLUMN validated_at INTEGER;
ALTER TABLE packages ADD COLUMN validation_ok INTEGER;
