-- Every enqueue and every state change wrote to jobs_state_seq (state, seq) as well as
-- jobs_queue_state (queue, state, seq): one more index page per commit in the WAL.
-- Listing by state alone now walks jobs_queue_state one queue at a time and merges.
DROP INDEX jobs_state_seq;
