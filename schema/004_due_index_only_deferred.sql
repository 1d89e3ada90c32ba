-- A job enqueued to start at once never needs the "when is the next queued job due?"
-- index: only jobs whose start was put off (a schedule_at, a retry's backoff) are in
-- it now, so an ordinary enqueue writes one index page less to the WAL.
DROP INDEX jobs_run_after;
CREATE INDEX jobs_run_after ON jobs (run_after) WHERE state = 'QUEUED' AND run_after > created_at;
