DROP INDEX jobs_run_after;
CREATE INDEX jobs_run_after ON jobs (run_after) WHERE state = 'QUEUED';
