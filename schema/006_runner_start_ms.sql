-- A runner's process start time in integer Unix milliseconds, as every other time
-- (SPEC §3), instead of REAL seconds. The column is rebuilt so its type says so.
ALTER TABLE jobs ADD COLUMN runner_start_ms INTEGER;
UPDATE jobs SET runner_start_ms = CAST(round(runner_start_time * 1000) AS INTEGER)
    WHERE runner_start_time IS NOT NULL;
ALTER TABLE jobs DROP COLUMN runner_start_time;
ALTER TABLE jobs RENAME COLUMN runner_start_ms TO runner_start_time;
