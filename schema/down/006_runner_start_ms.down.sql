DROP TRIGGER jobs_terminal_is_final;
ALTER TABLE jobs ADD COLUMN runner_start_s REAL;
UPDATE jobs SET runner_start_s = runner_start_time / 1000.0 WHERE runner_start_time IS NOT NULL;
ALTER TABLE jobs DROP COLUMN runner_start_time;
ALTER TABLE jobs RENAME COLUMN runner_start_s TO runner_start_time;
CREATE TRIGGER jobs_terminal_is_final BEFORE UPDATE ON jobs
WHEN OLD.state IN ('DONE', 'FAILED', 'CANCELLED', 'SUPERSEDED', 'EXPIRED')
BEGIN
    SELECT RAISE(ABORT, 'a job in a terminal state never changes');
END;
