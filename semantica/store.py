"""The durable job store: the only module that speaks SQL.

One `Store` owns one apsw connection. Every public method is one transaction; SQL
lives in named constants next to the method that runs it. State changes are checked
against `domain.TRANSITIONS`: bulk updates build their `WHERE state IN (...)` from
the table, single-job changes call `domain.check_transition`.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import os
import random
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import apsw
import msgspec

from semantica import domain, log
from semantica.domain import (
    EnqueueRequest,
    Job,
    Outcome,
    State,
    ValidationError,
)

SYNCHRONOUS_MODES = ("OFF", "NORMAL", "FULL", "EXTRA")
BUSY_TIMEOUT_MS = 5000
LIST_LIMIT_MAX = 1000

_json_encode = msgspec.json.Encoder().encode
_json_decode = msgspec.json.decode
_decode_payload = msgspec.json.Decoder(dict[str, Any]).decode
_decode_str_list = msgspec.json.Decoder(list[str]).decode
_decode_str_map = msgspec.json.Decoder(dict[str, str]).decode


# --------------------------------------------------------------------------- errors


class StoreError(Exception):
    """Base class for errors the store reports to its callers."""


class NotFound(StoreError):
    """No job (or queue) with that id/name."""

    def __init__(self, what: str, ident: str) -> None:
        self.what, self.ident = what, ident
        super().__init__(f"no {what} {ident!r}: check the id with `semantica-cli list`")


class SchemaTooNew(StoreError):
    """The database was written by a newer Semantica than this one."""


class MigrationFailed(StoreError):
    """A schema migration failed; its transaction left the database as it was."""


class StorageUnavailable(StoreError):
    """The database cannot be written (disk full, read-only file, I/O error)."""


class DatabaseDamaged(StoreError):
    """The file is not a SQLite database, or it is damaged."""


def _unopenable(path: str, exc: apsw.Error) -> StoreError:
    """What opening the database failed on, as a person can act on it."""
    if isinstance(exc, apsw.NotADBError | apsw.CorruptError):
        return DatabaseDamaged(
            f"{path} is not a Semantica database, or it is damaged ({exc}): restore a "
            "backup (`semantica-cli backup` makes one) or move the file away to start "
            "with an empty queue"
        )
    if isinstance(exc, apsw.FullError):
        return StorageUnavailable(f"the disk holding {path} is full ({exc}): free some space")
    return StorageUnavailable(
        f"{path} cannot be opened for reading and writing ({exc}): check that the file "
        "and its directory are yours and writable, and the disk"
    )


# --------------------------------------------------------------------------- results


class EnqueueResult(msgspec.Struct, kw_only=True):
    """The stored job plus what the enqueue did to other jobs of its key."""

    job: Job
    superseded_on_arrival: bool = False
    superseded_ids: list[str] = msgspec.field(default_factory=list)
    superseded_running_ids: list[str] = msgspec.field(default_factory=list)


class EnqueueGroup(msgspec.Struct):
    """One client request's jobs: a single enqueue, or a batch (`batch=True`)."""

    requests: list[EnqueueRequest]
    batch: bool


class CancelResult(msgspec.Struct, kw_only=True):
    cancelled: list[str]
    was_running: list[str]  # their processes must be stopped by the caller
    dependents_cancelled: list[str] = msgspec.field(default_factory=list)


class Conditions(msgspec.Struct, kw_only=True, frozen=True):
    """What the machine offers right now, for `wait_for_idle` / `require_charging` jobs."""

    cpu_idle: bool
    on_ac_power: bool


class JobFilter(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    state: State | None = None
    queue: str | None = None
    job_type: str | None = None
    tag: str | None = None
    chain: str | None = None
    subject: str | None = None
    parent: str | None = None  # parent_job_id


class QueueInfo(msgspec.Struct, kw_only=True):
    name: str
    concurrency: int | None
    paused: bool
    counts: dict[str, int]


class Stats(msgspec.Struct, kw_only=True):
    by_state: dict[str, int]
    by_queue: dict[str, dict[str, int]]
    running: int
    db_size_bytes: int


# --------------------------------------------------------------------------- schema


def schema_dir() -> Path:
    """Where the numbered migrations live: beside the package in a wheel, else the repo."""
    packaged = Path(__file__).with_name("_schema")
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "schema"


_MIGRATION_NAME = re.compile(r"(\d{3})_[a-z0-9_]+\.sql")


def migrations() -> list[tuple[int, Path, Path]]:
    """(version, up script, down script) for every migration, in order."""
    found = []
    base = schema_dir()
    for path in sorted(base.glob("*.sql")):
        m = _MIGRATION_NAME.fullmatch(path.name)
        if not m:
            continue
        down = base / "down" / path.name.replace(".sql", ".down.sql")
        found.append((int(m.group(1)), path, down))
    versions = [v for v, _, _ in found]
    if versions != list(range(1, len(versions) + 1)):
        raise RuntimeError(f"migrations in {base} are not numbered 001, 002, ...: {versions}")
    return found


def latest_schema_version() -> int:
    return len(migrations())


def _user_version(db: apsw.Connection) -> int:
    return db.execute("PRAGMA user_version").fetchall()[0][0]


def migrate(db: apsw.Connection, target: int | None = None) -> tuple[int, int]:
    """Bring the schema to `target` (default: latest) in one transaction.

    Goes up or down. Returns (version before, version after). A database newer than
    this code is refused with SchemaTooNew and left untouched.
    """
    steps = migrations()
    latest = len(steps)
    target = latest if target is None else target
    if not 0 <= target <= latest:
        raise ValueError(f"schema version {target} does not exist (latest is {latest})")
    with db:
        current = _user_version(db)
        if current > latest:
            raise SchemaTooNew(
                f"the database has schema version {current}, but this Semantica knows only "
                f"up to {latest}: upgrade Semantica, or restore a backup made by this version"
            )
        try:
            for version, up, _down in steps:
                if current < version <= target:
                    db.execute(up.read_text())
            for version, _up, down in reversed(steps):
                if target < version <= current:
                    db.execute(down.read_text())
        except apsw.Error as exc:
            raise MigrationFailed(
                f"migrating the database from schema version {current} to {target} failed "
                f"({exc}); it is unchanged, still version {current}. Run the Semantica "
                "that wrote it, or restore a backup, and report this"
            ) from exc
        db.execute(f"PRAGMA user_version = {int(target)}")
    return current, target


# --------------------------------------------------------------------------- SQL


def _moving(target: State, *sources: State) -> str:
    """SQL condition `state IN (sources)`, checked against the transition table at import.

    Every UPDATE of `state` below builds its WHERE clause with this, so the SQL can
    only make moves that `domain.TRANSITIONS` allows.
    """
    for source in sources:
        domain.check_transition(source, target)
    if len(sources) == 1:  # `=` lets the planner match the partial indexes
        return f"state = '{sources[0].value}'"
    return "state IN (" + ", ".join(f"'{s.value}'" for s in sources) + ")"


def _moving_from_any(target: State) -> str:
    return _moving(target, *domain.states_that_may_become(target))


JOB_COLUMNS = (
    "id, state, queue, job_type, subject_key, generation, payload, priority, execution_mode, "
    "max_attempts, backoff_base_ms, backoff_factor, deadline_ms, ttl_ms, schedule_at, "
    "wait_for_idle, require_charging, depends_on, user_tag, parent_job_id, chain_group_id, env, "
    "attempt, created_at, run_after, started_at, finished_at, runner_pid, runner_start_time, "
    "exit_code, error_kind, error_message, result_summary, artifacts, progress, progress_message"
)

# The error message of a job superseded by a newer request, before the newer job's id.
SUPERSEDED_BY = "superseded by a newer request for the same subject: job "

SQL_ENSURE_QUEUE = "INSERT INTO queues (name, created_at) VALUES (?, ?) ON CONFLICT DO NOTHING"

# Without an explicit generation: latest + 1 (the first is 1).
SQL_NEXT_GENERATION = """
INSERT INTO subjects (queue, job_type, subject_key, latest_generation) VALUES (?, ?, ?, 1)
ON CONFLICT DO UPDATE SET latest_generation = latest_generation + 1
RETURNING latest_generation
"""

# The keys a batch names several times, [[queue, job_type, subject_key, n], ...]: each
# latest + n at once (the batch takes latest-n+1..latest).
SQL_ADVANCE_GENERATIONS = """
INSERT INTO subjects (queue, job_type, subject_key, latest_generation)
SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each(?1) WHERE true
ON CONFLICT DO UPDATE SET latest_generation = latest_generation + excluded.latest_generation
RETURNING queue, job_type, subject_key, latest_generation
"""

# With an explicit generation: remember the highest seen; the caller compares.
SQL_RECORD_GENERATION = """
INSERT INTO subjects (queue, job_type, subject_key, latest_generation) VALUES (?, ?, ?, ?)
ON CONFLICT DO UPDATE SET latest_generation = max(latest_generation, excluded.latest_generation)
RETURNING latest_generation
"""

SQL_SUPERSEDE_OLDER_QUEUED = f"""
UPDATE jobs SET state = 'SUPERSEDED', finished_at = :now, error_kind = 'superseded',
    error_message = '{SUPERSEDED_BY}' || :by
WHERE {_moving(State.SUPERSEDED, State.QUEUED)}
  AND queue = :queue AND job_type = :job_type AND subject_key = :subject_key
RETURNING id
"""

# The older QUEUED job of each key, [[queue, job_type, subject_key, by_job_id], ...].
SQL_SUPERSEDE_QUEUED_OF_KEYS = f"""
WITH keys (queue, job_type, subject_key, by_id) AS MATERIALIZED (
    SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM json_each(?1))
UPDATE jobs SET state = 'SUPERSEDED', finished_at = ?2, error_kind = 'superseded',
    error_message = '{SUPERSEDED_BY}' || keys.by_id
FROM keys
WHERE jobs.{_moving(State.SUPERSEDED, State.QUEUED)} AND jobs.queue = keys.queue
  AND jobs.job_type = keys.job_type AND jobs.subject_key = keys.subject_key
RETURNING jobs.id, jobs.queue, jobs.job_type, jobs.subject_key
"""

SQL_SUPERSEDE_RUNNING = f"""
UPDATE jobs SET state = 'SUPERSEDED', finished_at = :now, error_kind = 'superseded',
    error_message = 'stopped: superseded while running by job ' || :by
WHERE {_moving(State.SUPERSEDED, State.RUNNING)}
  AND queue = :queue AND job_type = :job_type AND subject_key = :subject_key
RETURNING id
"""

SQL_INSERT_JOB = """
INSERT INTO jobs (
    id, state, queue, job_type, subject_key, generation, payload, priority, execution_mode,
    max_attempts, backoff_base_ms, backoff_factor, deadline_ms, ttl_ms, schedule_at, expires_at,
    wait_for_idle, require_charging, depends_on, user_tag, parent_job_id, chain_group_id, env,
    created_at, run_after, finished_at, error_kind, error_message
) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
"""

SQL_INSERT_DEP = "INSERT INTO job_deps (job_id, depends_on) VALUES (?, ?)"

SQL_DEP_STATES = "SELECT id, state FROM jobs WHERE id IN (SELECT value FROM json_each(?))"

SQL_GET = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = ?"

SQL_JOBS_BY_SEQ = f"""
SELECT seq, {JOB_COLUMNS} FROM jobs WHERE seq IN (SELECT value FROM json_each(?))
ORDER BY seq DESC
"""

SQL_COUNT_RUNNING = "SELECT count(*) FROM jobs WHERE state = 'RUNNING'"

SQL_WAIT_QUEUE = """
SELECT q.paused, q.concurrency,
       (SELECT count(*) FROM jobs WHERE state = 'RUNNING' AND queue = q.name)
FROM queues AS q WHERE q.name = ?
"""

SQL_WAIT_DEPS = """
SELECT p.id, p.state FROM job_deps AS d JOIN jobs AS p ON p.id = d.depends_on
WHERE d.job_id = ? AND p.state <> 'DONE' ORDER BY p.seq
"""

SQL_WAIT_SUBJECT = """
SELECT (SELECT latest_generation FROM subjects
        WHERE queue = :queue AND job_type = :job_type AND subject_key = :subject_key),
       (SELECT id FROM jobs WHERE state = 'RUNNING' AND queue = :queue
        AND job_type = :job_type AND subject_key = :subject_key)
"""

# Ready QUEUED jobs of eligible queues that the claim order puts before this one.
# Per queue that is not paused, the jobs ahead are a prefix of its claim order: a
# higher priority, or the same and older. Two index ranges per queue, so jobs in
# paused queues and jobs behind this one are never read (one statement over all
# QUEUED jobs took 18 ms per jobs.get.v1 with 72,000 of them waiting, most paused).
SQL_WAIT_AHEAD = """
SELECT count(*) FROM (
    SELECT 1 FROM queues AS q CROSS JOIN jobs AS j INDEXED BY jobs_queue_claim_order
    WHERE q.paused = 0 AND j.queue = q.name AND j.state = 'QUEUED'
      AND j.priority > :priority AND j.run_after <= :now
    UNION ALL
    SELECT 1 FROM queues AS q CROSS JOIN jobs AS j INDEXED BY jobs_queue_claim_order
    WHERE q.paused = 0 AND j.queue = q.name AND j.state = 'QUEUED'
      AND j.priority = :priority AND j.seq < :seq AND j.run_after <= :now
    LIMIT :cap)
"""
WAIT_AHEAD_CAP = 1000  # "1000 or more ahead" is answer enough; the count stays cheap

# The claim: one statement picks and takes the best ready job, so two claimers can
# never take the same job and the rules below hold at the instant of the write. It
# looks at the head of each eligible queue only (not paused, under its concurrency),
# so jobs in a paused or full queue cost nothing, and picks the best of those heads.
# The best ready job of each queue (see Store.claim_next_job).
_SQL_CLAIM_HEADS = f"""
WITH heads (seq) AS MATERIALIZED (
        SELECT (
            SELECT j.seq FROM jobs AS j INDEXED BY jobs_queue_claim_order
            WHERE j.queue = q.name AND j.{_moving(State.RUNNING, State.QUEUED)}
              AND j.run_after <= :now
              AND (j.expires_at IS NULL OR j.expires_at > :now)
              AND (j.subject_key IS NULL OR (
                    NOT EXISTS (
                        SELECT 1 FROM jobs AS r
                        WHERE r.state = 'RUNNING' AND r.subject_key IS NOT NULL
                          AND r.queue = j.queue AND r.job_type = j.job_type
                          AND r.subject_key = j.subject_key)
                    -- a cancelled or superseded job of the key whose process is
                    -- still stopping: [[queue, job_type, subject_key], ...]
                    AND NOT EXISTS (
                        SELECT 1 FROM json_each(:stopping) AS k
                        WHERE k.value ->> 0 = j.queue AND k.value ->> 1 = j.job_type
                          AND k.value ->> 2 = j.subject_key)
                    AND j.generation = (
                        SELECT s.latest_generation FROM subjects AS s
                        WHERE s.queue = j.queue AND s.job_type = j.job_type
                          AND s.subject_key = j.subject_key)))
              AND NOT EXISTS (
                    SELECT 1 FROM job_deps AS d JOIN jobs AS p ON p.id = d.depends_on
                    WHERE d.job_id = j.id AND p.state <> 'DONE')
              AND (:cpu_idle OR j.wait_for_idle = 0)
              AND (:on_ac_power OR j.require_charging = 0)
            ORDER BY j.priority DESC, j.seq
            LIMIT 1) AS seq
        FROM queues AS q
        WHERE q.paused = 0
          AND (q.concurrency IS NULL OR q.concurrency > (
                SELECT count(*) FROM jobs AS r WHERE r.state = 'RUNNING' AND r.queue = q.name))
)
"""

SQL_CLAIM_NEXT_JOB = f"""{_SQL_CLAIM_HEADS}
UPDATE jobs SET state = 'RUNNING', attempt = attempt + 1, started_at = :now,
    expires_at = NULL,  -- ttl bounds the wait for a first start; retries never expire
    -- A job's runner known before the claim (an idle worker of the WARM pool, the
    -- zygote's spare for a fresh process) is recorded with it, so the job never
    -- counts as RUNNING without its process.
    runner_pid = CASE execution_mode WHEN 'WARM' THEN :warm_pid
                                     WHEN 'SUBPROCESS' THEN :fresh_pid END,
    runner_start_time = CASE execution_mode WHEN 'WARM' THEN :warm_start_time
                                            WHEN 'SUBPROCESS' THEN :fresh_start_time END,
    progress = NULL, progress_message = NULL
WHERE (SELECT count(*) FROM jobs WHERE state = 'RUNNING') < :global_limit
  AND seq = (
    SELECT best.seq FROM heads JOIN jobs AS best ON best.seq = heads.seq
    ORDER BY best.priority DESC, best.seq
    LIMIT 1)
  -- The best job waits for its runner process if it is not there yet; no other
  -- takes its place meanwhile (the claim order holds).
  AND (:claim_warm OR execution_mode <> 'WARM')
  AND (:claim_subprocess OR execution_mode <> 'SUBPROCESS')
RETURNING {JOB_COLUMNS}
"""

# The execution mode of the job the claim would take next.
SQL_NEXT_CLAIM_MODE = f"""{_SQL_CLAIM_HEADS}
SELECT best.execution_mode FROM heads JOIN jobs AS best ON best.seq = heads.seq
ORDER BY best.priority DESC, best.seq
LIMIT 1
"""

SQL_RECORD_RUNNER = """
UPDATE jobs SET runner_pid = ?, runner_start_time = ? WHERE id = ? AND state = 'RUNNING'
"""

SQL_SET_PROGRESS = """
UPDATE jobs SET progress = ?, progress_message = ? WHERE id = ? AND state = 'RUNNING'
"""

SQL_NEWER_REQUEST_EXISTS = """
SELECT EXISTS (
    SELECT 1 FROM subjects
    WHERE queue = :queue AND job_type = :job_type AND subject_key = :subject_key
      AND latest_generation > :generation)
    OR EXISTS (
    SELECT 1 FROM jobs
    WHERE state = 'QUEUED' AND queue = :queue AND job_type = :job_type
      AND subject_key = :subject_key)
"""

SQL_FINISH = f"""
UPDATE jobs SET state = :state, run_after = :run_after,
    finished_at = CASE WHEN :state = 'QUEUED' THEN NULL ELSE :now END,
    exit_code = :exit_code, error_kind = :error_kind, error_message = :error_message,
    result_summary = :result_summary, artifacts = :artifacts,
    runner_pid = NULL, runner_start_time = NULL
WHERE id = :id AND {_moving(State.DONE, State.RUNNING)}
  AND (:attempt IS NULL OR attempt = :attempt)
RETURNING {JOB_COLUMNS}
"""

SQL_CANCEL_MATCHING = f"""
UPDATE jobs SET state = 'CANCELLED', finished_at = :now, error_kind = 'cancelled',
    error_message = :why
WHERE {{column}} = :value AND {_moving_from_any(State.CANCELLED)}
RETURNING id
"""

SQL_RUNNING_MATCHING = "SELECT id FROM jobs WHERE {column} = ? AND state = 'RUNNING'"

# Everything that waits, directly or through others, on jobs that will never be DONE.
SQL_CANCEL_DEPENDENTS = f"""
WITH RECURSIVE doomed (id, cause) AS (
    SELECT d.job_id, d.depends_on FROM job_deps AS d
    WHERE d.depends_on IN (SELECT value FROM json_each(:ids))
    UNION
    SELECT d.job_id, doomed.id FROM job_deps AS d JOIN doomed ON d.depends_on = doomed.id
)
UPDATE jobs SET state = 'CANCELLED', finished_at = :now, error_kind = 'dependency_failed',
    error_message = 'dependency ' || x.cause || ' ended ' || x.cause_state
                    || ', so this job cannot run'
FROM (
    SELECT c.id AS id, c.cause AS cause,
           CASE WHEN c.cause IN (SELECT value FROM json_each(:ids)) THEN p.state
                ELSE 'CANCELLED' END AS cause_state
    FROM (SELECT id, min(cause) AS cause FROM doomed GROUP BY id) AS c
    LEFT JOIN jobs AS p ON p.id = c.cause
) AS x
WHERE jobs.id = x.id AND +jobs.{_moving(State.CANCELLED, State.QUEUED)}
RETURNING jobs.id
"""

SQL_ANY_DEPENDENCY = "SELECT EXISTS (SELECT 1 FROM job_deps)"

SQL_HAS_DEPENDENTS = """
SELECT EXISTS (SELECT 1 FROM job_deps WHERE depends_on IN (SELECT value FROM json_each(?)))
"""

SQL_EXPIRE_OVERDUE = f"""
UPDATE jobs INDEXED BY jobs_expiry SET state = 'EXPIRED', finished_at = :now,
    error_kind = 'expired', error_message = 'not started within ttl_ms of being enqueued'
WHERE {_moving(State.EXPIRED, State.QUEUED)}
  AND expires_at IS NOT NULL AND expires_at <= :now
RETURNING id
"""

SQL_REQUEUE = f"""
UPDATE jobs SET state = 'QUEUED', attempt = attempt - 1, run_after = :now,
    runner_pid = NULL, runner_start_time = NULL, progress = NULL, progress_message = NULL,
    error_kind = 'interrupted', error_message = 'stopped by a daemon shutdown; not counted'
WHERE id = :id AND {_moving(State.QUEUED, State.RUNNING)}
RETURNING {JOB_COLUMNS}
"""

SQL_SUPERSEDE_INTERRUPTED = f"""
UPDATE jobs SET state = 'SUPERSEDED', finished_at = :now, error_kind = 'superseded',
    error_message = 'stopped by a daemon shutdown, and not queued again: '
                    || 'a newer request for its subject exists'
WHERE id = :id AND {_moving(State.SUPERSEDED, State.RUNNING)}
RETURNING {JOB_COLUMNS}
"""

SQL_NEXT_RUN_AFTER = """
SELECT min(run_after) FROM jobs INDEXED BY jobs_run_after
WHERE state = 'QUEUED' AND run_after > created_at AND run_after > :now
"""

TERMINAL_SQL = ", ".join(sorted(f"'{s.value}'" for s in domain.TERMINAL_STATES))

SQL_FINISHED_BEFORE = f"""
SELECT id FROM jobs INDEXED BY jobs_finished
WHERE finished_at < :cutoff AND state IN ({TERMINAL_SQL})
ORDER BY finished_at LIMIT :limit
"""

SQL_DELETE_FINISHED = f"""
DELETE FROM jobs WHERE id IN (SELECT value FROM json_each(?)) AND state IN ({TERMINAL_SQL})
"""

SQL_EXISTING_IDS = "SELECT id FROM jobs WHERE id IN (SELECT value FROM json_each(?))"

SQL_GATED_WAITING = """
SELECT coalesce(max(wait_for_idle), 0), coalesce(max(require_charging), 0)
FROM jobs INDEXED BY jobs_gated
WHERE state = 'QUEUED' AND (wait_for_idle = 1 OR require_charging = 1)
"""

SQL_NEXT_EXPIRY = """
SELECT min(expires_at) FROM jobs INDEXED BY jobs_expiry
WHERE state = 'QUEUED' AND expires_at IS NOT NULL AND expires_at > :now
"""

SQL_RUNNING_JOBS = f"""
SELECT {JOB_COLUMNS} FROM jobs INDEXED BY jobs_running_by_queue
WHERE state = 'RUNNING' ORDER BY seq
"""

SQL_QUEUES = """
SELECT q.name, q.concurrency, q.paused,
       (SELECT json_group_object(state, n) FROM
            (SELECT state, count(*) AS n FROM jobs WHERE queue = q.name GROUP BY state))
FROM queues AS q ORDER BY q.name
"""

SQL_SET_QUEUE_CONCURRENCY = "UPDATE queues SET concurrency = ? WHERE name = ?"
SQL_SET_QUEUE_PAUSED = "UPDATE queues SET paused = ? WHERE name = ?"
SQL_PAUSED_QUEUES = "SELECT name FROM queues WHERE paused = 1"

SQL_STATS = "SELECT queue, state, count(*) FROM jobs GROUP BY queue, state"


_MODES = {mode.value: mode for mode in domain.ExecutionMode}

# Random bits of job ids: seeded from the OS, and again in a forked child so that two
# processes never share the sequence. Uniqueness is all ids need, not secrecy: only a
# client the daemon let in sees them, and guessing one grants nothing. (RFC 9562 says
# SHOULD for a CSPRNG; this one is predictable after enough ids.) A getrandom() call
# per job cost more than the rest of the id.
_id_random = random.Random()
os.register_at_fork(after_in_child=_id_random.seed)


def new_job_id(now_ms: int) -> str:
    """A UUIDv7 (RFC 9562): time-ordered, so new ids append to the id index.

    48 bits of Unix milliseconds, version 7, 74 random bits.
    """
    rand = _id_random.getrandbits(74)
    value = (
        (now_ms & 0xFFFF_FFFF_FFFF) << 80
        | 0x7 << 76
        | (rand >> 62 & 0xFFF) << 64
        | 0b10 << 62
        | (rand & 0x3FFF_FFFF_FFFF_FFFF)
    )
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _in_batch(exc: ValidationError, index: int) -> ValidationError:
    """The error of a batch's job `index`, its field named as `jobs[index].field`."""
    return ValidationError(f"jobs[{index}].{exc.field}", exc.reason)


def _cannot_fail(group: EnqueueGroup) -> bool:
    """One validated job with no subject key and no dependencies: storing it reads no
    other job, so no rule of the store can refuse it."""
    if len(group.requests) != 1:
        return False
    req = group.requests[0]
    return req.subject_key is None and not req.depends_on


def _in_batch_supersedes(
    reqs: Sequence[EnqueueRequest],
) -> dict[int, tuple[int | None, int | None, int]]:
    """Keys that a batch names more than once, each time with a server-assigned
    generation (no explicit generation, no supersede_running, no depends_on): for each
    of their requests, (previous index, next index, how many) within the batch."""
    if any(req.depends_on for req in reqs):
        # A dependency check inside the batch sees the jobs as each earlier request
        # left them: keep the one-by-one order for such a batch.
        return {}
    by_key: dict[tuple[str, str, str], list[int]] = {}
    unsuitable: set[tuple[str, str, str]] = set()
    for i, req in enumerate(reqs):
        if req.subject_key is None:
            continue
        key = (req.queue, req.job_type, req.subject_key)
        by_key.setdefault(key, []).append(i)
        if req.generation is not None or req.supersede_running or req.depends_on:
            unsuitable.add(key)
    plan: dict[int, tuple[int | None, int | None, int]] = {}
    for key, indexes in by_key.items():
        if len(indexes) > 1 and key not in unsuitable:
            for n, i in enumerate(indexes):
                prev = indexes[n - 1] if n else None
                following = indexes[n + 1] if n + 1 < len(indexes) else None
                plan[i] = (prev, following, len(indexes))
    return plan


def _ready_args(
    now: int, conditions: Conditions, stopping_keys: Sequence[tuple[str, str, str]]
) -> dict[str, Any]:
    """The parameters of the claim's choice of the ready jobs (_SQL_CLAIM_HEADS)."""
    return {
        "now": now,
        "cpu_idle": conditions.cpu_idle,
        "on_ac_power": conditions.on_ac_power,
        "stopping": _json_encode(stopping_keys).decode() if stopping_keys else "[]",
    }


def _as_stored_after(results: list[EnqueueResult], now: int) -> list[EnqueueResult]:
    """A batch's reply shows each job as the batch left it: one that a later job of the
    same batch superseded is SUPERSEDED (as `jobs.get.v1` would say), not QUEUED."""
    batch = {r.job.id for r in results}
    superseded_by = {old: r.job.id for r in results for old in r.superseded_ids if old in batch}
    if not superseded_by:
        return results
    out = []
    for r in results:
        by = superseded_by.get(r.job.id)
        if by is not None and r.job.state is State.QUEUED:
            job = msgspec.structs.replace(
                r.job, state=State.SUPERSEDED, finished_at=now, error_kind="superseded",
                error_message=f"{SUPERSEDED_BY}{by}",
            )  # fmt: skip
            r = msgspec.structs.replace(r, job=job)
        out.append(r)
    return out


def _row_to_job(row: Sequence[Any]) -> Job:
    (
        id_, state, queue, job_type, subject_key, generation, payload, priority, mode,
        max_attempts, backoff_base_ms, backoff_factor, deadline_ms, ttl_ms, schedule_at,
        wait_for_idle, require_charging, depends_on, user_tag, parent_job_id, chain_group_id,
        env, attempt, created_at, run_after, started_at, finished_at, runner_pid,
        runner_start_time, exit_code, error_kind, error_message, result_summary, artifacts,
        progress, progress_message,
    ) = row  # fmt: skip
    return Job(
        id=id_,
        state=State(state),
        queue=queue,
        job_type=job_type,
        subject_key=subject_key,
        generation=generation,
        payload=_decode_payload(payload),
        priority=priority,
        execution_mode=domain.ExecutionMode(mode),
        max_attempts=max_attempts,
        backoff_base_ms=backoff_base_ms,
        backoff_factor=backoff_factor,
        deadline_ms=deadline_ms,
        ttl_ms=ttl_ms,
        schedule_at=schedule_at,
        wait_for_idle=bool(wait_for_idle),
        require_charging=bool(require_charging),
        depends_on=_decode_str_list(depends_on),
        user_tag=user_tag,
        parent_job_id=parent_job_id,
        chain_group_id=chain_group_id,
        env=_decode_str_map(env),
        attempt=attempt,
        created_at=created_at,
        run_after=run_after,
        started_at=started_at,
        finished_at=finished_at,
        runner_pid=runner_pid,
        runner_start_time=runner_start_time,
        exit_code=exit_code,
        error_kind=error_kind,
        error_message=error_message,
        result_summary=None if result_summary is None else _json_decode(result_summary),
        artifacts=_decode_str_list(artifacts),
        progress=progress,
        progress_message=progress_message,
    )


# --------------------------------------------------------------------------- the store


class Store:
    """The job database. Use from one thread; every method is one transaction."""

    def __init__(self, db: apsw.Connection, path: str) -> None:
        self._db = db
        self.path = path
        self.env_allowlist = domain.DEFAULT_ENV_ALLOWLIST
        self.migrated: tuple[int, int] = (0, 0)  # schema version (before, after) at open
        self._known_queues: set[str] = set()  # queue rows known to exist (queues are never deleted)
        self._paused: set[str] | None = None  # paused queues; None: not read yet
        self._tx = _Transaction(db)
        self._pending_inserts: list[tuple] = []  # job rows of the group being stored
        self._pending_keys: set[tuple[str, str, str]] = set()  # their supersede keys
        # Within one enqueue transaction: job_deps is empty (None: not looked up yet).
        self._no_dependencies_yet: bool | None = False
        self._wal_fd: int | None = None
        self._checkpointer: apsw.Connection | None = None
        self.needs_sync = False  # group_sync: sync_wal() before acknowledging writes
        self._synchronous = "FULL"
        self.read_only = False
        self._checkpoint_lock = threading.Lock()
        self._wal_pages = 0  # WAL pages after the last commit (checkpoint_elsewhere)
        self._wal_threshold = self._wal_limit = self._wal_inline_at = 0
        self._checkpoints_inline = 0
        # gated_waiting's answer, kept until a write could change it (None: ask).
        self._gated: tuple[bool, bool] | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        synchronous: str = "FULL",
        env_allowlist: frozenset[str] = domain.DEFAULT_ENV_ALLOWLIST,
        group_sync: bool = False,
    ) -> Store:
        """Open (creating if needed) and migrate the database at `path`.

        WAL journal, a busy timeout, foreign keys on, and `synchronous` as given
        (FULL by default: an acknowledged enqueue survives a power cut).

        With `group_sync` and FULL/EXTRA, commits do not fsync by themselves: the
        caller must call `sync_wal()` (from any thread) before acknowledging a write,
        so that one fsync can cover many commits. Durability is FULL's.
        """
        synchronous = synchronous.upper()
        if synchronous not in SYNCHRONOUS_MODES:
            raise ValueError(f"synchronous must be one of {', '.join(SYNCHRONOUS_MODES)}")
        deferred = group_sync and synchronous in ("FULL", "EXTRA")
        path = os.fspath(path)
        try:
            db = apsw.Connection(path)
        except apsw.Error as exc:
            raise _unopenable(path, exc) from None
        try:
            db.set_busy_timeout(BUSY_TIMEOUT_MS)
            # On a new file (before WAL mode writes its header): free pages can then be
            # handed back in small steps by maintenance, never needing a VACUUM that
            # holds the database. A no-op on an existing file.
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute(f"PRAGMA synchronous = {'NORMAL' if deferred else synchronous}")
            db.execute("PRAGMA foreign_keys = ON")
            db.execute("PRAGMA temp_store = MEMORY")  # planning temp b-trees on disk cost ms
            migrated = migrate(db)
        except apsw.Error as exc:
            db.close()
            raise _unopenable(path, exc) from None
        except BaseException:
            db.close()
            raise
        store = cls(db, path)
        store.env_allowlist = env_allowlist
        store.migrated = migrated
        store.needs_sync = deferred
        store._synchronous = synchronous
        return store

    @classmethod
    def open_read_only(cls, path: str | os.PathLike[str]) -> Store:
        """Open an existing database for reading only (the daemon is not running: the
        CLI shows its data). Never creates, migrates or writes anything."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise StorageUnavailable(f"no database at {path}: start the daemon once to create it")
        try:
            db = apsw.Connection(path, flags=apsw.SQLITE_OPEN_READONLY)
        except apsw.Error as exc:
            raise _unopenable(path, exc) from None
        try:
            db.set_busy_timeout(BUSY_TIMEOUT_MS)
            try:
                version = _user_version(db)
            except apsw.Error as exc:
                raise _unopenable(path, exc) from None
            latest = latest_schema_version()
            if version > latest:
                raise SchemaTooNew(
                    f"{path} has schema version {version}, newer than this Semantica "
                    f"knows ({latest}): upgrade Semantica to read it"
                )
            if version < latest:
                raise StorageUnavailable(
                    f"{path} has schema version {version}, older than {latest}: start "
                    "the daemon once to migrate it"
                )
        except BaseException:
            db.close()
            raise
        store = cls(db, path)
        store.read_only = True
        return store

    def close(self) -> None:
        """Checkpoint-friendly close: optimise query plans, then release the file."""
        if not self.read_only:
            with contextlib.suppress(apsw.Error):  # a damaged or full disk: close anyway
                self._db.execute("PRAGMA optimize")
        if self._checkpointer is not None:
            self._checkpointer.close()
            self._checkpointer = None
        self._db.close()
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    def checkpoint_elsewhere(
        self,
        on_wal_grown: Callable[[int], None],
        *,
        threshold_pages: int = 1000,
        limit_pages: int | None = None,
    ) -> None:
        """Move WAL checkpoints out of commits: after a commit leaves `threshold_pages`
        or more in the WAL, `on_wal_grown(pages)` is called and the caller runs
        `checkpoint()` (e.g. in a worker thread). Commits then rarely pay for one.

        SQLite starts the WAL over only after a checkpoint has copied every frame in
        it, and one running in another thread rarely can while commits go on: each
        leaves behind the frames committed while it copied. So the hook asks again
        only once the WAL has grown by another `threshold_pages`; and when it reaches
        `limit_pages` (4 x threshold unless given), the committing thread checkpoints
        right after that commit, when nothing else can write, so that checkpoint
        finishes and the next commit starts the WAL over. Without this a steady stream
        of enqueues grew the WAL without bound (770 MB after 40,000). A checkpoint
        that cannot finish there (a reader holds an older snapshot, or another
        checkpoint runs) is tried again only after another `threshold_pages`.
        """
        self._wal_threshold = threshold_pages
        self._wal_limit = limit_pages if limit_pages is not None else 4 * threshold_pages
        self._wal_inline_at = self._wal_limit
        tx = self._tx
        due = threshold_pages  # WAL pages at which to ask for the next checkpoint

        def hook(_db: apsw.Connection, _name: str, pages: int) -> int:
            nonlocal due
            if pages < self._wal_pages:  # the WAL was started over
                due = threshold_pages
                self._wal_inline_at = self._wal_limit
            self._wal_pages = pages
            if pages >= self._wal_inline_at:
                tx.after_commit = self._checkpoint_after_commit
            elif pages >= due:
                due = pages + threshold_pages
                on_wal_grown(pages)
            return apsw.SQLITE_OK

        self._db.set_wal_hook(hook)  # replaces SQLite's automatic checkpoint

    def _checkpoint_after_commit(self) -> None:
        """A PASSIVE checkpoint on the writing connection, between two commits. It
        never raises: the commit before it stands whatever happens here."""
        try:
            frames, copied = self._db.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)
        except apsw.Error:
            frames, copied = 1, 0  # busy (another checkpoint runs) or refused
        if frames >= 0 and copied >= frames:
            self._checkpoints_inline += 1
        else:  # could not copy everything: not again before the WAL has grown further
            self._wal_inline_at = self._wal_pages + self._wal_threshold

    def checkpoint(self, mode: str = "PASSIVE") -> tuple[int, int]:
        """Copy the WAL into the database file; returns (WAL frames, frames copied).

        Uses a connection of its own, so it may run in a worker thread while the
        owning thread keeps committing. PASSIVE never waits for readers or writers.
        """
        modes = {
            "PASSIVE": apsw.SQLITE_CHECKPOINT_PASSIVE,
            "FULL": apsw.SQLITE_CHECKPOINT_FULL,
            "TRUNCATE": apsw.SQLITE_CHECKPOINT_TRUNCATE,
        }
        # One checkpoint at a time: the WAL-growth checkpointer and maintenance both
        # call this from worker threads, on the one checkpoint connection.
        with self._checkpoint_lock:
            if self._checkpointer is None:
                self._checkpointer = apsw.Connection(self.path)
                self._checkpointer.set_busy_timeout(BUSY_TIMEOUT_MS)
                # Reading once makes the connection see WAL mode; until then it
                # cannot checkpoint.
                self._checkpointer.execute("SELECT count(*) FROM sqlite_schema").fetchall()
            try:
                return self._checkpointer.wal_checkpoint(mode=modes[mode])
            except (apsw.FullError, apsw.IOError, apsw.ReadOnlyError) as exc:
                raise StorageUnavailable(_storage_advice(exc)) from exc

    @property
    def checkpoints_inline(self) -> int:
        """Checkpoints the committing thread ran (and finished) because the WAL reached
        its limit."""
        return self._checkpoints_inline

    @property
    def commits(self) -> int:
        """How many write transactions this store has committed; `sync_wal` covers them."""
        return self._tx.commits

    def sync_wal(self) -> None:
        """fsync the write-ahead log: every commit made before this call is then on disk.

        Safe to call from a worker thread while the owning thread keeps committing
        (an fsync covers what was written before it started; later commits need
        another). Raises StorageUnavailable when the disk refuses.
        """
        wal = self.path + "-wal"
        try:
            if self._wal_fd is None or os.fstat(self._wal_fd).st_ino != os.stat(wal).st_ino:
                if self._wal_fd is not None:
                    os.close(self._wal_fd)
                self._wal_fd = os.open(wal, os.O_RDONLY)
                _fsync_dir(os.path.dirname(os.path.abspath(wal)))  # the WAL's name is durable too
            _datasync(self._wal_fd)
        except FileNotFoundError:
            return  # no WAL: nothing committed since the last checkpoint truncated it
        except OSError as exc:
            raise StorageUnavailable(f"the database cannot be synced to disk ({exc})") from exc

    @property
    def connection(self) -> apsw.Connection:
        return self._db

    def schema_version(self) -> int:
        return _user_version(self._db)

    # ----------------------------------------------------------------- enqueue

    def enqueue(self, req: EnqueueRequest, *, now: int) -> EnqueueResult:
        """Validate and store one job with every supersede rule of SPEC §3.

        In one transaction: record the subject's generation (server-assigned latest+1
        unless given), mark older QUEUED jobs of the key SUPERSEDED (and a RUNNING one
        too with `supersede_running`), insert the job. A job whose explicit generation
        is older than the latest is stored SUPERSEDED at once; the result says so.
        """
        payload = domain.validate_enqueue(req, env_allowlist=self.env_allowlist)
        try:
            with self._writing():
                self._no_dependencies_yet = None  # looked up when first needed
                result = self._enqueue_one(req, payload, now, new_job_id(now))
                self._flush_inserts()
        finally:
            self._pending_inserts.clear()
            self._pending_keys.clear()
            self._no_dependencies_yet = False
        self._known_queues.add(req.queue)  # after the commit: the queue row exists
        return result

    def enqueue_batch(self, reqs: Sequence[EnqueueRequest], *, now: int) -> list[EnqueueResult]:
        """Store many jobs in one transaction, in order: all or nothing.

        A validation error names the job's index in the batch (`jobs[3].priority`).
        """
        outcome = self.enqueue_groups([EnqueueGroup(list(reqs), batch=True)], now=now)[0]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def enqueue_groups(
        self, groups: Sequence[EnqueueGroup], *, now: int
    ) -> list[list[EnqueueResult] | ValidationError | StoreError]:
        """Group commit: store several independent requests in one transaction.

        Each group is all-or-nothing on its own (a savepoint): a group that breaks a
        rule gets its error in the returned list and leaves no trace, while the others
        are stored. All share one commit, so one fsync acknowledges them all. If the
        commit itself fails, StorageUnavailable is raised and nothing is stored.
        """
        if len(groups) == 1 and not groups[0].batch and len(groups[0].requests) == 1:
            try:  # a lone client's enqueue: the same, without the bookkeeping of groups
                return [[self.enqueue(groups[0].requests[0], now=now)]]
            except ValidationError as exc:
                return [exc]
        prepared: list[list[bytes] | ValidationError] = []
        for group in groups:
            try:
                prepared.append(self._validate_group(group))
            except ValidationError as exc:
                prepared.append(exc)
        outcomes: list[list[EnqueueResult] | ValidationError | StoreError] = []
        alone = len(groups) == 1  # then the transaction itself is the group's savepoint
        try:
            with self._writing():
                self._no_dependencies_yet = None  # looked up when first needed
                for group, payloads in zip(groups, prepared, strict=True):
                    if isinstance(payloads, ValidationError):
                        outcomes.append(payloads)
                        continue
                    if _cannot_fail(group):
                        # Validated already, and nothing in the store can refuse it: no
                        # savepoint, and its row joins the one INSERT after the loop.
                        outcomes.append(self._enqueue_group(group, payloads, now))
                        continue
                    self._flush_inserts()  # earlier groups' rows stay out of this savepoint
                    try:
                        with contextlib.nullcontext() if alone else self._tx:  # savepoint
                            outcomes.append(self._enqueue_group(group, payloads, now))
                            self._flush_inserts()
                    except ValidationError as exc:
                        self._pending_inserts.clear()  # rows of the group rolled back
                        self._pending_keys.clear()
                        if alone:
                            raise
                        outcomes.append(exc)
                self._flush_inserts()
        except ValidationError as exc:
            return [exc]
        finally:
            self._pending_inserts.clear()
            self._pending_keys.clear()
            self._no_dependencies_yet = False
        # Only stored groups, after the commit: a rolled-back queue row must not be remembered.
        self._known_queues.update(
            result.job.queue
            for outcome in outcomes
            if isinstance(outcome, list)
            for result in outcome
        )
        return outcomes

    def _validate_group(self, group: EnqueueGroup) -> list[bytes]:
        payloads = []
        for index, req in enumerate(group.requests):
            try:
                payloads.append(domain.validate_enqueue(req, env_allowlist=self.env_allowlist))
            except ValidationError as exc:
                if not group.batch:
                    raise
                raise _in_batch(exc, index) from None
        return payloads

    def _enqueue_group(
        self, group: EnqueueGroup, payloads: list[bytes], now: int
    ) -> list[EnqueueResult]:
        reqs = group.requests
        if len(reqs) == 1:
            try:
                return [self._enqueue_one(reqs[0], payloads[0], now, new_job_id(now))]
            except ValidationError as exc:
                raise _in_batch(exc, 0) if group.batch else exc from None
        # Each new queue's row once for the batch, not once per job: the rows join
        # `_known_queues` only after the commit.
        fresh = {req.queue for req in reqs} - self._known_queues
        for queue in fresh:
            self._db.execute(SQL_ENSURE_QUEUE, (queue, now))
        known, self._known_queues = self._known_queues, self._known_queues | fresh
        cancelled_before = len(self._tx.dependents)
        try:
            results = self._enqueue_many(reqs, payloads, now)
        finally:
            self._known_queues = known
        if doomed := set(self._tx.dependents[cancelled_before:]):
            # A job of the batch that a later one doomed (it superseded what the job
            # depends on): the reply shows it as the batch left it, CANCELLED.
            self._flush_inserts()
            results = [
                msgspec.structs.replace(r, job=self._get(r.job.id)) if r.job.id in doomed else r
                for r in results
            ]
        return results

    def _enqueue_many(
        self, reqs: Sequence[EnqueueRequest], payloads: list[bytes], now: int
    ) -> list[EnqueueResult]:
        ids = [new_job_id(now) for _ in reqs]
        plan = _in_batch_supersedes(reqs)
        generations: dict[tuple[str, str, str], int] = {}  # next generation, per planned key
        # The QUEUED jobs each key's first request supersedes (None: found in the loop).
        older: dict[tuple[str, str, str], list[str]] | None = {}
        if plan:
            generations, older = self._advance_planned_keys(reqs, ids, plan, now)
        results = []
        for i, (req, payload) in enumerate(zip(reqs, payloads, strict=True)):
            step = plan.get(i)
            if step is None:
                try:
                    results.append(self._enqueue_one(req, payload, now, ids[i]))
                except ValidationError as exc:  # a dependency that does not exist, ...
                    raise _in_batch(exc, i) from None
                continue
            prev, following, _count = step
            key = (req.queue, req.job_type, req.subject_key)
            generation = generations[key]
            generations[key] = generation + 1
            if prev is not None:
                superseded = [ids[prev]]
            elif older is not None:
                superseded = older.get(key, [])
            else:
                superseded = self._supersede_older_queued(key, ids[i], now)
            if following is None:  # the last of its key in the batch: it stays QUEUED
                result = self._store_row(
                    req, payload, now, ids[i], generation, superseded=superseded
                )
            else:  # a later job of the batch supersedes it: stored SUPERSEDED at once
                result = self._store_row(
                    req, payload, now, ids[i], generation, superseded=superseded,
                    state=State.SUPERSEDED, finished_at=now, error_kind="superseded",
                    error_message=f"{SUPERSEDED_BY}{ids[following]}",
                )  # fmt: skip
            results.append(result)
        return _as_stored_after(results, now)

    def _advance_planned_keys(
        self,
        reqs: Sequence[EnqueueRequest],
        ids: list[str],
        plan: dict[int, tuple[int | None, int | None, int]],
        now: int,
    ) -> tuple[dict[tuple[str, str, str], int], dict[tuple[str, str, str], list[str]] | None]:
        """For the keys a batch names several times (see _in_batch_supersedes), in two
        statements for all of them: advance each key's generation by its count, and
        supersede its older QUEUED job by the key's first request in the batch (the
        rules of one-by-one enqueues). Returns each key's first generation in the batch
        and the jobs superseded per key."""
        first_of: dict[tuple[str, str, str], tuple[int, int]] = {}  # key -> (index, count)
        for i, (prev, _following, count) in plan.items():
            if prev is None:
                first_of[(reqs[i].queue, reqs[i].job_type, reqs[i].subject_key)] = (i, count)
        for queue in {key[0] for key in first_of} - self._known_queues:
            self._db.execute(SQL_ENSURE_QUEUE, (queue, now))
        counts = _json_encode([[*key, n] for key, (_i, n) in first_of.items()])
        generations = {}
        for queue, job_type, subject_key, latest in self._db.execute(
            SQL_ADVANCE_GENERATIONS, (counts,)
        ):
            key = (queue, job_type, subject_key)
            generations[key] = latest - first_of[key][1] + 1
        if self._dependencies_exist():
            # Superseding a job cancels its dependents, which may reach jobs that the
            # batch's earlier requests supersede: keep each key's supersede at its first
            # request's place, as one by one (the loop does it: `older` is None).
            return generations, None
        by = _json_encode([[*key, ids[i]] for key, (i, _n) in first_of.items()])
        older: dict[tuple[str, str, str], list[str]] = {}
        for job_id, q, t, k in self._db.execute(SQL_SUPERSEDE_QUEUED_OF_KEYS, (by, now)):
            older.setdefault((q, t, k), []).append(job_id)
        return generations, older

    def _supersede_older_queued(self, key: tuple[str, str, str], by: str, now: int) -> list[str]:
        """Supersede the key's QUEUED job (by job `by`) and cancel what depends on it."""
        args = {"now": now, "by": by, "queue": key[0], "job_type": key[1], "subject_key": key[2]}
        superseded = [r[0] for r in self._db.execute(SQL_SUPERSEDE_OLDER_QUEUED, args)]
        if superseded:
            self._cancel_dependents(superseded, now)
        return superseded

    def _dependencies_exist(self) -> bool:
        if self._no_dependencies_yet is None:  # once per enqueue transaction
            self._no_dependencies_yet = not self._db.execute(SQL_ANY_DEPENDENCY).fetchall()[0][0]
        return not self._no_dependencies_yet

    def _enqueue_one(
        self, req: EnqueueRequest, payload: bytes, now: int, job_id: str
    ) -> EnqueueResult:
        db = self._db
        if req.queue not in self._known_queues:
            db.execute(SQL_ENSURE_QUEUE, (req.queue, now))
        state = State.QUEUED
        generation = req.generation
        superseded: list[str] = []
        superseded_running: list[str] = []
        error_kind = error_message = finished_at = None
        if req.depends_on:
            self._flush_inserts()
            self._check_dependencies(req.depends_on)
        if req.subject_key is not None:
            key = (req.queue, req.job_type, req.subject_key)
            if key in self._pending_keys:
                self._flush_inserts()  # the supersede below must see this batch's older job
            if generation is None:
                generation = db.execute(SQL_NEXT_GENERATION, key).fetchall()[0][0]
            else:
                latest = db.execute(SQL_RECORD_GENERATION, (*key, generation)).fetchall()[0][0]
                if latest > generation:
                    state, finished_at, error_kind = State.SUPERSEDED, now, "superseded"
                    error_message = (
                        f"arrived with generation {generation}, older than the latest "
                        f"({latest}) for this subject"
                    )
            if state is State.QUEUED:
                args = {
                    "now": now,
                    "by": job_id,
                    "queue": req.queue,
                    "job_type": req.job_type,
                    "subject_key": req.subject_key,
                }
                superseded = [r[0] for r in db.execute(SQL_SUPERSEDE_OLDER_QUEUED, args)]
                if req.supersede_running:
                    superseded_running = [r[0] for r in db.execute(SQL_SUPERSEDE_RUNNING, args)]
        result = self._store_row(
            req, payload, now, job_id, generation, superseded=superseded,
            superseded_running=superseded_running, state=state, finished_at=finished_at,
            error_kind=error_kind, error_message=error_message,
            on_arrival=state is State.SUPERSEDED,
        )  # fmt: skip
        if req.subject_key is not None:
            self._pending_keys.add((req.queue, req.job_type, req.subject_key))
        if req.depends_on:
            self._flush_inserts()
            db.executemany(SQL_INSERT_DEP, [(job_id, dep) for dep in req.depends_on])
            self._no_dependencies_yet = False
        cancelled_later = superseded + superseded_running
        if state is State.SUPERSEDED:
            cancelled_later.append(job_id)
        if cancelled_later:
            self._cancel_dependents(cancelled_later, now)
        return result

    def _store_row(
        self,
        req: EnqueueRequest,
        payload: bytes,
        now: int,
        job_id: str,
        generation: int | None,
        *,
        superseded: list[str],
        superseded_running: list[str] | None = None,
        state: State = State.QUEUED,
        finished_at: int | None = None,
        error_kind: str | None = None,
        error_message: str | None = None,
        on_arrival: bool = False,
    ) -> EnqueueResult:
        """Queue the job's row for insertion; the result holds the row as written."""
        run_after = req.schedule_at if req.schedule_at is not None else now
        mode = _MODES[req.execution_mode]
        self._pending_inserts.append(
            (
                job_id, state.value, req.queue, req.job_type, req.subject_key, generation,
                payload, req.priority, mode.value, req.max_attempts,
                req.backoff_base_ms, req.backoff_factor, req.deadline_ms, req.ttl_ms,
                req.schedule_at, domain.expires_at(req, now), req.wait_for_idle,
                req.require_charging, _json_encode(req.depends_on), req.user_tag,
                req.parent_job_id, req.chain_group_id, _json_encode(req.env),
                now, run_after, finished_at, error_kind, error_message,
            )
        )  # fmt: skip
        # The row as just written; reading it back would cost a query per job.
        job = Job(
            id=job_id, state=state, queue=req.queue, job_type=req.job_type,
            subject_key=req.subject_key, generation=generation, payload=req.payload,
            priority=req.priority, execution_mode=mode, max_attempts=req.max_attempts,
            backoff_base_ms=req.backoff_base_ms, backoff_factor=float(req.backoff_factor),
            deadline_ms=req.deadline_ms, ttl_ms=req.ttl_ms, schedule_at=req.schedule_at,
            wait_for_idle=req.wait_for_idle, require_charging=req.require_charging,
            depends_on=list(req.depends_on), user_tag=req.user_tag,
            parent_job_id=req.parent_job_id, chain_group_id=req.chain_group_id,
            env=dict(req.env), attempt=0, created_at=now, run_after=run_after,
            started_at=None, finished_at=finished_at, runner_pid=None, runner_start_time=None,
            exit_code=None, error_kind=error_kind, error_message=error_message,
            result_summary=None, artifacts=[], progress=None, progress_message=None,
        )  # fmt: skip
        return EnqueueResult(
            job=job,
            superseded_on_arrival=on_arrival,
            superseded_ids=superseded,
            superseded_running_ids=superseded_running or [],
        )

    def _flush_inserts(self) -> None:
        """Insert the job rows gathered so far; one executemany is cheaper than many."""
        if self._pending_inserts:
            rows, self._pending_inserts = self._pending_inserts, []
            self._pending_keys.clear()
            if len(rows) == 1:
                self._db.execute(SQL_INSERT_JOB, rows[0])
            else:
                self._db.executemany(SQL_INSERT_JOB, rows)

    def _check_dependencies(self, depends_on: list[str]) -> None:
        states = dict(self._db.execute(SQL_DEP_STATES, (_json_encode(depends_on),)))
        for dep in depends_on:
            if dep not in states:
                raise ValidationError("depends_on", f"no job {dep!r} exists to depend on")
            state = State(states[dep])
            if state in domain.TERMINAL_STATES and state is not State.DONE:
                raise ValidationError(
                    "depends_on",
                    f"job {dep} already ended {state}, so a job depending on it could never run",
                )

    # ----------------------------------------------------------------- claim

    def claim_next_job(
        self,
        *,
        now: int,
        global_limit: int,
        conditions: Conditions,
        warm_runner: tuple[int, int] | None = None,
        fresh_runner: tuple[int, int] | None = None,
        stopping_keys: Sequence[tuple[str, str, str]] = (),
        claim_warm: bool = True,
        claim_subprocess: bool = True,
    ) -> Job | None:
        """Atomically take the best ready job and mark it RUNNING, or return None.

        Best: priority DESC, then enqueue order. Ready: time and backoff reached, not
        expired, dependencies DONE, conditions met, queue not paused and under its
        concurrency, no RUNNING job of the same key, newest generation of its key; and
        fewer than `global_limit` jobs RUNNING in all.

        The claim commits without an fsync of its own: a claim lost to a power cut
        leaves the job QUEUED, which is what recovery would make of it anyway (its
        runner died with the machine). The next durable commit covers it.

        `warm_runner` (pid, start time): the idle WARM worker that would run a WARM
        job; `fresh_runner`: the process forked ahead that would run a SUBPROCESS
        job. The one for the claimed job's mode is recorded with the claim. Other
        jobs get their runner recorded once their process exists (`record_runner`).

        `stopping_keys` (queue, job_type, subject_key): subjects whose cancelled or
        superseded job's process is still being stopped; none of their jobs starts.

        `claim_warm` / `claim_subprocess` False: if the best job is of that mode, it
        is not taken (its runner process is not there yet: it would count as RUNNING
        without one), and neither is any other in its place; None is returned.
        `next_claim_mode` says which mode the best job is.
        """
        pid, start_time = warm_runner if warm_runner is not None else (None, None)
        fresh_pid, fresh_start_time = fresh_runner if fresh_runner is not None else (None, None)
        args = {
            **_ready_args(now, conditions, stopping_keys),
            "global_limit": global_limit,
            "warm_pid": pid,
            "warm_start_time": start_time,
            "fresh_pid": fresh_pid,
            "fresh_start_time": fresh_start_time,
            "claim_warm": claim_warm,
            "claim_subprocess": claim_subprocess,
        }
        with self._no_fsync(), self._tx:  # (see below for gated_waiting)
            rows = self._db.execute(SQL_CLAIM_NEXT_JOB, args).fetchall()
        if not rows:
            return None
        job = _row_to_job(rows[0])
        self._writing_ungated(job)  # a gated job is no longer QUEUED: ask again
        return job

    def next_claim_mode(
        self,
        *,
        now: int,
        conditions: Conditions,
        stopping_keys: Sequence[tuple[str, str, str]] = (),
    ) -> domain.ExecutionMode | None:
        """The execution mode of the job `claim_next_job` would take now if every kind
        of runner process were there (None: no job is ready): what to get ready."""
        args = _ready_args(now, conditions, stopping_keys)
        rows = self._db.execute(SQL_NEXT_CLAIM_MODE, args).fetchall()
        return domain.ExecutionMode(rows[0][0]) if rows else None

    def on_dependents_cancelled(self, tell: Callable[[list[str]], None] | None) -> None:
        """Call `tell(ids)` after each commit that cancelled jobs because a job they
        depend on will never be DONE (it failed, was cancelled, superseded or expired),
        whichever call did it: so that their waiters and the log hear of it."""
        self._tx.on_dependents = tell

    def transaction(self) -> _Transaction:
        """`with store.transaction():` makes the store calls inside one transaction
        (each call's own becomes a savepoint): one commit for several changes."""
        return self._tx

    @contextlib.contextmanager
    def _no_fsync(self):
        if self._synchronous in ("OFF", "NORMAL") or self.needs_sync or self._db.in_transaction:
            yield  # commits do not fsync here anyway (or an outer transaction decides)
            return
        self._db.execute("PRAGMA synchronous = NORMAL")
        try:
            yield
        finally:
            self._db.execute(f"PRAGMA synchronous = {self._synchronous}")

    def record_runner(self, job_id: str, pid: int, start_time: int) -> bool:
        """Remember which process runs a RUNNING job (PID + start time tell PID reuse).

        False when the job is no longer RUNNING (cancelled meanwhile): nothing is
        recorded, and the caller's process is about to be stopped anyway.
        """
        with self._writing():
            self._db.execute(SQL_RECORD_RUNNER, (pid, start_time, job_id))
            return self._db.changes() == 1

    def fail_running(self, job_id: str, message: str, *, now: int) -> bool:
        """The last resort when an attempt's end cannot be recorded (record_end fails
        on the row itself): the RUNNING job is marked FAILED with error_kind
        'internal' by one plain UPDATE, none of record_end's rules (retry, supersede,
        dependents). False if it was not RUNNING."""
        with self._writing():
            self._db.execute(
                "UPDATE jobs SET state = 'FAILED', finished_at = ?, error_kind = 'internal',"
                " error_message = ?, runner_pid = NULL, runner_start_time = NULL"
                " WHERE id = ? AND state = 'RUNNING'",
                (now, message, job_id),
            )
            if self._db.changes() != 1:
                return False
            try:  # what depends on it can never run (SPEC §3), if that can be recorded
                with self._tx:
                    self._cancel_dependents([job_id], now)
            except Exception as exc:
                log.error("dependents_not_cancelled", job_id=job_id, error=repr(exc))
            return True

    def set_progress(self, job_id: str, fraction: float, message: str | None) -> None:
        """Store a running job's progress (0.0-1.0) and message; ignored once it ended."""
        if not 0.0 <= fraction <= 1.0:
            raise ValidationError("progress", f"must be between 0.0 and 1.0, got {fraction}")
        with self._writing():
            self._db.execute(SQL_SET_PROGRESS, (fraction, message, job_id))

    # ----------------------------------------------------------------- finish

    def finish(
        self,
        job_id: str,
        outcome: Outcome,
        *,
        now: int,
        rng: random.Random,
        attempt: int | None = None,
    ) -> Job:
        """Record how a RUNNING job's attempt ended: DONE, retry later, FAILED or SUPERSEDED.

        A job that was cancelled or superseded while it ran keeps that final state:
        the attempt's outcome is no longer wanted and is dropped. So is a report for
        another `attempt` than the job's current one (a late or duplicate report).
        """
        return self.record_end(job_id, outcome, now=now, rng=rng, attempt=attempt)[0]

    def record_end(
        self,
        job_id: str,
        outcome: Outcome,
        *,
        now: int,
        rng: random.Random,
        attempt: int | None = None,
        claimed: Job | None = None,
    ) -> tuple[Job, bool]:
        """`finish`, also saying whether this changed the job (False: it had moved on,
        cancelled or superseded meanwhile, and is returned as it is).

        `claimed`: the job as its claim returned it (the dispatcher has it), so that
        it need not be read again (its attempt is the one meant); what can change
        since (a cancel, a supersede) is checked by the UPDATE itself.
        """
        known = claimed if claimed is not None and claimed.state is State.RUNNING else None
        with self._writing_ungated(known):
            if known is not None:
                job = known
                attempt = known.attempt
            else:
                job = self._get(job_id)
            if job.is_terminal or (attempt is not None and attempt != job.attempt):
                return job, False
            newer = self._newer_request_exists(job)
            state, run_after = domain.state_after_attempt(
                job, outcome, newer_request_exists=newer, now_ms=now, rng=rng
            )
            domain.check_transition(job.state, state, job_id)
            error_message = outcome.error_message
            if state is State.SUPERSEDED:
                error_message = (
                    f"{error_message}; not retried: a newer request for its subject exists"
                )
            rows = self._db.execute(
                SQL_FINISH,
                {
                    "id": job_id,
                    "state": state.value,
                    "run_after": run_after,
                    "now": now,
                    "exit_code": outcome.exit_code,
                    "error_kind": outcome.error_kind,
                    "error_message": error_message,
                    "result_summary": None
                    if outcome.result_summary is None
                    else _json_encode(outcome.result_summary),
                    "artifacts": _json_encode(outcome.artifacts),
                    "attempt": attempt,
                },
            ).fetchall()
            if not rows:  # it changed since the claim: cancelled, superseded, or retried
                return self._get(job_id), False
            if state in (State.FAILED, State.SUPERSEDED):
                self._cancel_dependents([job_id], now)
            return _row_to_job(rows[0]), True

    def requeue(self, job_id: str, *, now: int, attempt: int) -> Job:
        """Put a RUNNING job back in its queue without counting the attempt (the daemon
        stopped it while draining). A job no longer in that attempt is left alone."""
        with self._writing():
            job = self._get(job_id)
            if job.state is not State.RUNNING or job.attempt != attempt:
                return job
            if self._newer_request_exists(job):  # SPEC §3 rule 4: never back in line
                domain.check_transition(job.state, State.SUPERSEDED, job_id)
                rows = self._db.execute(SQL_SUPERSEDE_INTERRUPTED, {"id": job_id, "now": now})
                rows = rows.fetchall()
                self._cancel_dependents([job_id], now)
                return _row_to_job(rows[0])
            domain.check_transition(job.state, State.QUEUED, job_id)
            rows = self._db.execute(SQL_REQUEUE, {"id": job_id, "now": now}).fetchall()
        return _row_to_job(rows[0])

    def _newer_request_exists(self, job: Job) -> bool:
        """Whether a newer request for the job's subject exists (a newer generation, or
        another job of its key waiting): then the job is never queued again."""
        if job.subject_key is None:
            return False
        args = {
            "queue": job.queue,
            "job_type": job.job_type,
            "subject_key": job.subject_key,
            "generation": job.generation,
        }
        return bool(self._db.execute(SQL_NEWER_REQUEST_EXISTS, args).fetchall()[0][0])

    def next_due_times(self, *, now: int) -> tuple[int | None, int | None]:
        """(earliest future run_after, earliest future expiry) among QUEUED jobs."""
        run_after = self._db.execute(SQL_NEXT_RUN_AFTER, {"now": now}).fetchall()[0][0]
        expiry = self._db.execute(SQL_NEXT_EXPIRY, {"now": now}).fetchall()[0][0]
        return run_after, expiry

    def wait_facts(
        self,
        job: Job,
        *,
        now: int,
        global_limit: int,
        stopping: Mapping[tuple[str, str, str], str] | None = None,
    ) -> domain.WaitFacts:
        """What holds a QUEUED job back now (see domain.waiting_reason). `stopping`:
        as `claim_next_job`'s stopping_keys, each with its job's id."""
        db = self._db
        paused, limit, queue_running = db.execute(SQL_WAIT_QUEUE, (job.queue,)).fetchall()[0]
        latest, running_same = None, None
        if job.subject_key is not None:
            latest, running_same = db.execute(
                SQL_WAIT_SUBJECT,
                {"queue": job.queue, "job_type": job.job_type, "subject_key": job.subject_key},
            ).fetchall()[0]
            if running_same is None and stopping:
                running_same = stopping.get((job.queue, job.job_type, job.subject_key))
        seq = db.execute("SELECT seq FROM jobs WHERE id = ?", (job.id,)).fetchall()[0][0]
        ahead = db.execute(
            SQL_WAIT_AHEAD,
            {"now": now, "priority": job.priority, "seq": seq, "cap": WAIT_AHEAD_CAP},
        ).fetchall()[0][0]
        return domain.WaitFacts(
            queue_paused=bool(paused),
            queue_limit=limit,
            queue_running=queue_running,
            global_limit=global_limit,
            global_running=self.count_running(),
            unfinished_dependencies=[
                (dep, state) for dep, state in db.execute(SQL_WAIT_DEPS, (job.id,))
            ],
            latest_generation=latest,
            running_same_subject=running_same,
            ahead=ahead,
        )

    def gated_waiting(self) -> tuple[bool, bool]:
        """Whether any QUEUED job waits for (CPU idle, AC power): the sensors are read
        only while one does.

        Asked before every claim, so the answer is kept until a write could change it:
        every write forgets it (`_writing`), except a claim or an end of a job that
        waits on neither condition (`_writing_ungated`), the dispatcher's usual pair,
        which cannot change which QUEUED jobs wait on one. An answer read inside a
        transaction is not kept: it may yet be rolled back."""
        if self._gated is not None:
            return self._gated
        idle, charging = self._db.execute(SQL_GATED_WAITING).fetchall()[0]
        answer = bool(idle), bool(charging)
        if not self._db.in_transaction:  # kept only once committed: a rollback undoes
            self._gated = answer
        return answer

    # ----------------------------------------------------------------- cancel

    def cancel(
        self,
        *,
        job_id: str | None = None,
        tag: str | None = None,
        chain: str | None = None,
        now: int,
    ) -> CancelResult:
        """Cancel one job by id, or every unfinished job with a tag or in a chain.

        By id, a job already in a final state is an IllegalTransition. Jobs that were
        RUNNING are listed in `was_running`: the caller stops their processes. Jobs
        waiting on a cancelled job are cancelled too (`dependents_cancelled`).
        """
        if sum(x is not None for x in (job_id, tag, chain)) != 1:
            raise ValidationError("id", "give exactly one of id, tag or chain")
        if job_id is not None:
            column, value, why = "id", job_id, "cancelled by request"
        elif tag is not None:
            column, value, why = "user_tag", tag, f"cancelled by request (tag {tag})"
        else:
            column, value, why = "chain_group_id", chain, f"cancelled by request (chain {chain})"
        with self._writing():
            if job_id is not None:
                job = self._get(job_id)
                domain.check_transition(job.state, State.CANCELLED, job_id)
            was_running = [
                r[0] for r in self._db.execute(SQL_RUNNING_MATCHING.format(column=column), (value,))
            ]
            cancelled = [
                r[0]
                for r in self._db.execute(
                    SQL_CANCEL_MATCHING.format(column=column),
                    {"value": value, "now": now, "why": why},
                )
            ]
            dependents = self._cancel_dependents(cancelled, now) if cancelled else []
        return CancelResult(
            cancelled=cancelled, was_running=was_running, dependents_cancelled=dependents
        )

    def _cancel_dependents(self, ids: list[str], now: int) -> list[str]:
        if not self._dependencies_exist():
            return []
        encoded = _json_encode(ids)
        # The recursive update is costly to plan and run; most jobs have no dependents.
        if not self._db.execute(SQL_HAS_DEPENDENTS, (encoded,)).fetchall()[0][0]:
            return []
        self._gated = None  # a gated job may be among them
        rows = self._db.execute(SQL_CANCEL_DEPENDENTS, {"ids": encoded, "now": now})
        cancelled = [r[0] for r in rows]
        self._tx.dependents += cancelled  # told once committed (see on_dependents_cancelled)
        return cancelled

    def expire_overdue(self, *, now: int) -> list[str]:
        """Mark QUEUED jobs whose ttl has passed EXPIRED; return their ids."""
        with self._writing():
            expired = [r[0] for r in self._db.execute(SQL_EXPIRE_OVERDUE, {"now": now})]
            if expired:
                self._cancel_dependents(expired, now)
        return expired

    # ----------------------------------------------------------------- queues

    def configure_queue(self, name: str, *, concurrency: int | None, now: int) -> QueueInfo:
        """Set a queue's own concurrency limit (None: only the global limit applies)."""
        domain.check_name("queue", name)
        if concurrency is not None:
            domain._check_int("concurrency", concurrency, 1, 1_000_000)
        with self._writing():
            self._db.execute(SQL_ENSURE_QUEUE, (name, now))
            self._db.execute(
                "UPDATE queues SET concurrency = ? WHERE name = ?", (concurrency, name)
            )
        return self.queue(name)

    def set_queue_paused(self, name: str, paused: bool, *, now: int) -> QueueInfo:
        """Pause (no new claims; running jobs finish) or resume a queue."""
        domain.check_name("queue", name)
        with self._writing():
            self._db.execute(SQL_ENSURE_QUEUE, (name, now))
            self._db.execute(SQL_SET_QUEUE_PAUSED, (int(paused), name))
        self._paused = None  # read again when next asked
        return self.queue(name)

    def is_paused(self, name: str) -> bool:
        """Whether a queue is paused, from memory: this store is its only writer."""
        if self._paused is None:
            self._paused = {row[0] for row in self._db.execute(SQL_PAUSED_QUEUES)}
        return name in self._paused

    def queues(self) -> list[QueueInfo]:
        """Every queue with its limit, paused flag and job counts by state."""
        return [
            QueueInfo(
                name=name,
                concurrency=concurrency,
                paused=bool(paused),
                counts=_json_decode(counts) if counts else {},
            )
            for name, concurrency, paused, counts in self._db.execute(SQL_QUEUES)
        ]

    def queue(self, name: str) -> QueueInfo:
        for info in self.queues():
            if info.name == name:
                return info
        raise NotFound("queue", name)

    # ----------------------------------------------------------------- reads

    def get(self, job_id: str) -> Job:
        """The job with this id; NotFound if there is none."""
        return self._get(job_id)

    def _get(self, job_id: str) -> Job:
        rows = self._db.execute(SQL_GET, (job_id,)).fetchall()
        if not rows:
            raise NotFound("job", job_id)
        return _row_to_job(rows[0])

    def list(
        self, filters: JobFilter | None = None, *, limit: int = 100, cursor: str | None = None
    ) -> tuple[list[Job], str | None]:
        """Jobs matching every given filter, newest first, `limit` at a time.

        Pass the returned cursor back to get the next page; None means no more.
        """
        filters = filters or JobFilter()
        if not 1 <= limit <= LIST_LIMIT_MAX:
            raise ValidationError("limit", f"must be between 1 and {LIST_LIMIT_MAX}, got {limit}")
        where, args = [], []
        for column, value in (
            ("job_type", filters.job_type.lower() if filters.job_type else None),
            ("user_tag", filters.tag),
            ("chain_group_id", filters.chain),
            ("subject_key", filters.subject),
            ("parent_job_id", filters.parent),
        ):
            if value is not None:
                where.append(f"{column} = ?")
                args.append(value)
        if cursor is not None:
            # ASCII digits only (isdigit() takes '²'), and within SQLite's integers.
            if not (cursor.isascii() and cursor.isdigit() and len(cursor) <= 18):
                raise ValidationError("cursor", "is not a cursor this server returned")
            where.append("seq < ?")
            args.append(int(cursor))
        by_label = any((filters.tag, filters.chain, filters.subject, filters.parent))
        if (filters.state is not None or filters.queue is not None) and not by_label:
            rows = self._list_by_queue_state(filters, where, args, limit + 1)
        else:  # newest first along seq, or along the (label, seq) index of the label
            for column, value in (
                ("state", filters.state.value if filters.state else None),
                ("queue", filters.queue),
            ):
                if value is not None:
                    where.append(f"{column} = ?")
                    args.append(value)
            sql = f"SELECT seq, {JOB_COLUMNS} FROM jobs"
            if where:
                sql += " WHERE " + " AND ".join(where)
            sql += " ORDER BY seq DESC LIMIT ?"
            rows = self._db.execute(sql, (*args, limit + 1)).fetchall()
        jobs = [_row_to_job(row[1:]) for row in rows[:limit]]
        next_cursor = str(rows[limit - 1][0]) if len(rows) > limit else None
        return jobs, next_cursor

    def _list_by_queue_state(
        self, filters: JobFilter, where: list[str], args: list[Any], limit: int
    ) -> list[Any]:
        """Newest first, jobs of one state, of one queue or both (and the filters in
        `where`, which no index serves): the newest `limit` of each (queue, state)
        pair from jobs_queue_state (queue, state, seq), merged. Without this, one
        queue's jobs were sorted whole (230 ms for 100,000), and one state's found by
        a walk over all jobs. An index on (state, seq) would serve a state alone, but
        every commit would pay for it with one more page in the WAL."""
        sql = (
            "SELECT seq FROM jobs INDEXED BY jobs_queue_state WHERE queue = ? AND state = ?"
            + "".join(f" AND {condition}" for condition in where)
            + " ORDER BY seq DESC LIMIT ?"
        )
        states = [filters.state] if filters.state is not None else list(State)
        # One read transaction: a job changing state between two of these reads
        # (another connection writing) would be in two lists, or in none.
        with self._db:
            if filters.queue is not None:
                queues = [filters.queue]
            else:
                queues = [row[0] for row in self._db.execute("SELECT name FROM queues")]
            per_pair = [
                [row[0] for row in self._db.execute(sql, (queue, state.value, *args, limit))]
                for queue in queues
                for state in states
            ]
            newest = list(itertools.islice(heapq.merge(*per_pair, reverse=True), limit))
            return self._db.execute(SQL_JOBS_BY_SEQ, (_json_encode(newest),)).fetchall()

    def check_integrity(self, check: str = "quick_check") -> list[str]:
        """Run PRAGMA quick_check or integrity_check; return the problems (empty: healthy).

        Uses its own read-only connection, so it may run in a worker thread while the
        daemon's connection keeps serving.
        """
        if check not in ("quick_check", "integrity_check"):
            raise ValueError("check must be quick_check or integrity_check")
        reader = apsw.Connection(self.path, flags=apsw.SQLITE_OPEN_READONLY)
        try:
            reader.set_busy_timeout(BUSY_TIMEOUT_MS)
            rows = [r[0] for r in reader.execute(f"PRAGMA {check}")]
        finally:
            reader.close()
        return [] if rows == ["ok"] else rows

    def running_jobs(self) -> list[Job]:
        """Every RUNNING job with its runner PID and start time, for crash recovery."""
        return [_row_to_job(row) for row in self._db.execute(SQL_RUNNING_JOBS)]

    def count_running(self) -> int:
        return self._db.execute(SQL_COUNT_RUNNING).fetchall()[0][0]

    def stats(self) -> Stats:
        """Job counts by state and by queue, jobs running, and the database's size."""
        by_state: dict[str, int] = {s.value: 0 for s in State}
        by_queue: dict[str, dict[str, int]] = {}
        for queue, state, count in self._db.execute(SQL_STATS):
            by_state[state] += count
            by_queue.setdefault(queue, {})[state] = count
        page_count = self._db.execute("PRAGMA page_count").fetchall()[0][0]
        page_size = self._db.execute("PRAGMA page_size").fetchall()[0][0]
        return Stats(
            by_state=by_state,
            by_queue=by_queue,
            running=by_state[State.RUNNING.value],
            db_size_bytes=page_count * page_size,
        )

    # ----------------------------------------------------------------- maintenance

    def finished_before(self, cutoff_ms: int, limit: int) -> list[str]:
        """Ids of up to `limit` finished jobs that ended before `cutoff_ms`."""
        return [
            row[0]
            for row in self._db.execute(SQL_FINISHED_BEFORE, {"cutoff": cutoff_ms, "limit": limit})
        ]

    def delete_jobs(self, ids: list[str]) -> int:
        """Delete finished jobs (their dependency rows go with them). A job that is not
        finished is never deleted, whatever the caller passed."""
        with self._writing():
            self._db.execute(SQL_DELETE_FINISHED, (_json_encode(ids),))
            return self._db.changes()

    def existing_ids(self, ids: list[str]) -> set[str]:
        """Which of these ids are jobs (orphaned files, a retry's dependencies still kept)."""
        return {row[0] for row in self._db.execute(SQL_EXISTING_IDS, (_json_encode(ids),))}

    def page_stats(self) -> tuple[int, int, int, bool]:
        """(pages, free pages, page size, whether free pages can be released in steps)."""
        db = self._db
        pages = db.execute("PRAGMA page_count").fetchall()[0][0]
        free = db.execute("PRAGMA freelist_count").fetchall()[0][0]
        size = db.execute("PRAGMA page_size").fetchall()[0][0]
        incremental = db.execute("PRAGMA auto_vacuum").fetchall()[0][0] == 2
        return pages, free, size, incremental

    def release_free_pages(self, pages: int) -> None:
        """Give up to `pages` free pages back to the file system (a short write)."""
        with self._writing():
            self._db.execute(f"PRAGMA incremental_vacuum({int(pages)})").fetchall()

    def vacuum(self) -> None:
        """Rebuild the whole file (and make later vacuums incremental). Holds the
        database for as long as it takes: only on request or for an old-format file."""
        try:
            self._db.execute("PRAGMA auto_vacuum = INCREMENTAL")
            self._db.execute("VACUUM")
        except (apsw.FullError, apsw.IOError, apsw.ReadOnlyError) as exc:
            raise StorageUnavailable(_storage_advice(exc)) from exc

    def backup_to(self, dest: str | os.PathLike[str]) -> int:
        """A consistent copy of the database at `dest` (which must not exist), through
        SQLite's backup API on a connection of its own, so it may run in a worker
        thread while the owner keeps writing. Returns the copy's size in bytes."""
        dest = os.fspath(dest)
        tmp = f"{dest}.partial"
        source = apsw.Connection(self.path, flags=apsw.SQLITE_OPEN_READONLY)
        try:
            source.set_busy_timeout(BUSY_TIMEOUT_MS)
            copy = apsw.Connection(tmp)
            try:
                with copy.backup("main", source, "main") as backup:
                    backup.step(-1)  # all pages in one read transaction: one snapshot
                copy.execute("PRAGMA journal_mode = DELETE")  # one self-contained file
            finally:
                copy.close()
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, dest)
            _fsync_dir(os.path.dirname(os.path.abspath(dest)))
        except (apsw.FullError, apsw.IOError, OSError) as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError) and exc.errno != errno.ENOSPC:
                raise
            raise StorageUnavailable(
                f"the backup to {dest} failed: {_storage_advice(exc)}"
            ) from exc
        finally:
            source.close()
        return os.path.getsize(dest)

    # ----------------------------------------------------------------- helpers

    def _writing(self) -> _Transaction:
        self._gated = None  # this write may add, queue again or end a gated job
        return self._tx

    def _writing_ungated(self, job: Job | None) -> _Transaction:
        """`_writing` for a claim or end of `job`: one that waits on no condition
        leaves gated_waiting's answer as it was (None: unknown job, forget it)."""
        if job is None or job.wait_for_idle or job.require_charging:
            self._gated = None
        return self._tx


# As SQLite syncs on Linux: the data and the size needed to read it back, not the
# inode's times. macOS has no fdatasync.
_datasync = getattr(os, "fdatasync", os.fsync)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_STORAGE_ERRORS = (apsw.FullError, apsw.ReadOnlyError, apsw.IOError, apsw.CantOpenError)


class _Transaction:
    """`with db:` that counts commits and turns storage failures into StorageUnavailable
    (SPEC error 5003). Reused: one per store."""

    __slots__ = ("_db", "_marks", "after_commit", "commits", "dependents", "on_dependents")

    def __init__(self, db: apsw.Connection) -> None:
        self._db = db
        self.commits = 0
        # Run once after the next commit; set by the WAL hook (checkpoint_elsewhere).
        self.after_commit: Callable[[], None] | None = None
        # Jobs cancelled because what they depend on will never be DONE, in this
        # transaction; told to `on_dependents` once it commits (dropped if the part
        # that cancelled them rolls back).
        self.dependents: list[str] = []
        self._marks: list[int] = []
        self.on_dependents: Callable[[list[str]], None] | None = None

    def __enter__(self) -> None:
        self._db.__enter__()
        self._marks.append(len(self.dependents))

    def __exit__(self, exc_type, exc, tb) -> bool:
        mark = self._marks.pop()
        if exc is not None:  # rolled back: what it cancelled stays as it was
            del self.dependents[mark:]
        try:
            self._db.__exit__(exc_type, exc, tb)
        except BaseException as err:  # the commit failed: nothing of it stands
            del self.dependents[mark:]
            if isinstance(err, _STORAGE_ERRORS):
                raise StorageUnavailable(_storage_advice(err, self._db.system_errno)) from err
            raise
        if isinstance(exc, _STORAGE_ERRORS):
            raise StorageUnavailable(_storage_advice(exc, self._db.system_errno)) from exc
        if exc is None and not self._db.in_transaction:  # a commit, not a savepoint's release
            self.commits += 1
            if (run := self.after_commit) is not None:
                self.after_commit = None
                run()
            if self.dependents:
                dependents, self.dependents = self.dependents, []
                if (tell := self.on_dependents) is not None:
                    try:  # committed: nothing may make it look as if it were not
                        tell(dependents)
                    except Exception as err:
                        log.error("job_change_not_announced", job_ids=dependents, error=repr(err))
        return False


def _storage_advice(err: BaseException, os_errno: int = 0) -> str:
    """What to do about a write the disk refused. SQLite reports many of these as a
    generic I/O error; the OS error number behind it (when known) says which."""
    if isinstance(err, apsw.FullError) or os_errno in (errno.ENOSPC, errno.EDQUOT):
        return (
            "the disk holding the database is full: free space there; Semantica resumes by itself"
        )
    if isinstance(err, apsw.ReadOnlyError) or os_errno in (errno.EROFS, errno.EPERM, errno.EACCES):
        return "the database file is read-only: check its permissions and the filesystem mount"
    return f"the database cannot be written ({err}): check the disk and its free space"
