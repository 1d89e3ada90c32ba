-- Semantica schema v1: queues, subjects (supersede generations), jobs, dependencies.
-- The supersede invariants live here, not only in code: the two partial unique
-- indexes allow at most one QUEUED and one RUNNING job per (queue, job_type, subject_key).

CREATE TABLE queues (
    name        TEXT PRIMARY KEY,
    concurrency INTEGER CHECK (concurrency IS NULL OR concurrency >= 1),  -- NULL: only the global limit
    paused      INTEGER NOT NULL DEFAULT 0 CHECK (paused IN (0, 1)),
    created_at  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE subjects (
    queue             TEXT NOT NULL,
    job_type          TEXT NOT NULL,
    subject_key       TEXT NOT NULL,
    latest_generation INTEGER NOT NULL CHECK (latest_generation >= 0),
    PRIMARY KEY (queue, job_type, subject_key)
) WITHOUT ROWID;

CREATE TABLE jobs (
    seq               INTEGER PRIMARY KEY,          -- enqueue order (FIFO within a priority)
    id                TEXT NOT NULL UNIQUE,
    state             TEXT NOT NULL CHECK (state IN
                          ('QUEUED', 'RUNNING', 'DONE', 'FAILED', 'CANCELLED', 'SUPERSEDED', 'EXPIRED')),
    queue             TEXT NOT NULL REFERENCES queues (name),
    job_type          TEXT NOT NULL,
    subject_key       TEXT,
    generation        INTEGER CHECK (generation IS NULL OR generation >= 0),
    payload           BLOB NOT NULL,                -- JSON object
    priority          INTEGER NOT NULL CHECK (priority BETWEEN -1000 AND 1000),
    execution_mode    TEXT NOT NULL CHECK (execution_mode IN ('SUBPROCESS', 'WARM')),
    max_attempts      INTEGER NOT NULL CHECK (max_attempts >= 1),
    backoff_base_ms   INTEGER NOT NULL CHECK (backoff_base_ms >= 0),
    backoff_factor    REAL NOT NULL CHECK (backoff_factor >= 1.0),
    deadline_ms       INTEGER NOT NULL CHECK (deadline_ms >= 1),
    ttl_ms            INTEGER,
    schedule_at       INTEGER,
    expires_at        INTEGER,                      -- created_at + ttl_ms
    wait_for_idle     INTEGER NOT NULL CHECK (wait_for_idle IN (0, 1)),
    require_charging  INTEGER NOT NULL CHECK (require_charging IN (0, 1)),
    depends_on        TEXT NOT NULL DEFAULT '[]',   -- JSON list, as enqueued; job_deps indexes it
    user_tag          TEXT,
    parent_job_id     TEXT,
    chain_group_id    TEXT,
    env               TEXT NOT NULL DEFAULT '{}',   -- JSON object
    attempt           INTEGER NOT NULL DEFAULT 0 CHECK (attempt >= 0),
    created_at        INTEGER NOT NULL,
    run_after         INTEGER NOT NULL,             -- earliest start: schedule_at, then retry backoff
    started_at        INTEGER,
    finished_at       INTEGER,
    runner_pid        INTEGER,
    runner_start_time REAL,                         -- the runner process's start time, to tell PID reuse
    exit_code         INTEGER,
    error_kind        TEXT,
    error_message     TEXT,
    result_summary    TEXT,                         -- JSON
    artifacts         TEXT NOT NULL DEFAULT '[]',   -- JSON list of paths
    progress          REAL CHECK (progress IS NULL OR progress BETWEEN 0.0 AND 1.0),
    progress_message  TEXT,
    CHECK ((subject_key IS NULL) = (generation IS NULL)),
    CHECK ((state IN ('QUEUED', 'RUNNING')) = (finished_at IS NULL))
);

CREATE UNIQUE INDEX jobs_one_queued_per_key ON jobs (queue, job_type, subject_key)
    WHERE state = 'QUEUED' AND subject_key IS NOT NULL;
CREATE UNIQUE INDEX jobs_one_running_per_key ON jobs (queue, job_type, subject_key)
    WHERE state = 'RUNNING' AND subject_key IS NOT NULL;
CREATE INDEX jobs_claim_order ON jobs (priority DESC, seq) WHERE state = 'QUEUED';
CREATE INDEX jobs_running_by_queue ON jobs (queue) WHERE state = 'RUNNING';
CREATE INDEX jobs_expiry ON jobs (expires_at) WHERE state = 'QUEUED' AND expires_at IS NOT NULL;
CREATE INDEX jobs_queue_state ON jobs (queue, state);
CREATE INDEX jobs_state_seq ON jobs (state, seq);
CREATE INDEX jobs_tag ON jobs (user_tag, seq) WHERE user_tag IS NOT NULL;
CREATE INDEX jobs_chain ON jobs (chain_group_id, seq) WHERE chain_group_id IS NOT NULL;
CREATE INDEX jobs_parent ON jobs (parent_job_id) WHERE parent_job_id IS NOT NULL;
CREATE INDEX jobs_subject ON jobs (subject_key, seq) WHERE subject_key IS NOT NULL;
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;

-- Terminal states never change: enforced here as well as by the transition table.
CREATE TRIGGER jobs_terminal_is_final BEFORE UPDATE ON jobs
WHEN OLD.state IN ('DONE', 'FAILED', 'CANCELLED', 'SUPERSEDED', 'EXPIRED')
BEGIN
    SELECT RAISE(ABORT, 'a job in a terminal state never changes');
END;

CREATE TABLE job_deps (
    job_id     TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    depends_on TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    PRIMARY KEY (job_id, depends_on)
) WITHOUT ROWID;

CREATE INDEX job_deps_by_dependency ON job_deps (depends_on);
