DROP INDEX jobs_queue_claim_order;
CREATE INDEX jobs_claim_order ON jobs (priority DESC, seq) WHERE state = 'QUEUED';
