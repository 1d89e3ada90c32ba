DROP INDEX jobs_gated;
DROP INDEX jobs_run_after;
