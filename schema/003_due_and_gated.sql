-- The dispatcher's cheap questions, each answered from a small index:
-- "when is the next queued job due?" (a retry's backoff, a schedule_at) and
-- "does any queued job wait for CPU idle or AC power?" (sample the sensors only then).
CREATE INDEX jobs_run_after ON jobs (run_after) WHERE state = 'QUEUED';
CREATE INDEX jobs_gated ON jobs (seq)
    WHERE state = 'QUEUED' AND (wait_for_idle = 1 OR require_charging = 1);
