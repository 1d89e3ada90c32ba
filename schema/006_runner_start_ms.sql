-- A runner's process start time in integer Unix milliseconds, as every other time
-- (SPEC §3), instead of REAL seconds. The column is rebuilt so its type says so.
-- Jobs cancelled or superseded while running keep their runner's start time, so the
-- copy touches terminal rows: the trigger that keeps them final steps aside for it.
DROP TRIGGER jobs_terminal_is_final;
ALTER TABLE jobs ADD COLUMN runner_start_ms INTEGER;
UPDATE jobs SET runner_start_ms = CAST(round(runner_start_time * 1000) AS INTEGER)
    WHERE runner_start_time IS NOT NULL;
ALTER TABLE jobs DROP COLUMN runner_start_time;
ALTER TABLE jobs RENAME COLUMN runner_start_ms TO runner_start_time;
CREATE TRIGGER jobs_terminal_is_final BEFORE UPDATE ON jobs
WHEN OLD.state IN ('DONE', 'FAILED', 'CANCELLED', 'SUPERSEDED', 'EXPIRED')
BEGIN
    SELECT RAISE(ABORT, 'a job in a terminal state never changes');
END;
