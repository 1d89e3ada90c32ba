-- Claim by queue: the claim takes the head of each eligible queue (not paused, under
-- its concurrency) and picks the best of those heads, so jobs in a paused or full
-- queue are never walked one by one. Replaces the global (priority, seq) order.
DROP INDEX jobs_claim_order;
CREATE INDEX jobs_queue_claim_order ON jobs (queue, priority DESC, seq) WHERE state = 'QUEUED';
