CREATE INDEX jobs_state_seq ON jobs (state, seq);
