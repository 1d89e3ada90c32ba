"""The job model: states, the transition table, validation and backoff.

Pure: no I/O, no clock, no hidden randomness. Time (`now`) and random sources are
passed in by the caller, so every rule here is a plain function tests can call.
"""

from __future__ import annotations

import enum
import math
import random
import re
from typing import Any

import msgspec

from semantica.plugins import RETRY_AFTER_MAX_MS

# --------------------------------------------------------------------------- states


class State(enum.StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    SUPERSEDED = "SUPERSEDED"
    EXPIRED = "EXPIRED"


# Every state change goes through this table. RUNNING -> QUEUED is a retry.
TRANSITIONS: dict[State, frozenset[State]] = {
    State.QUEUED: frozenset({State.RUNNING, State.CANCELLED, State.SUPERSEDED, State.EXPIRED}),
    State.RUNNING: frozenset(
        {State.DONE, State.FAILED, State.QUEUED, State.CANCELLED, State.SUPERSEDED}
    ),
    State.DONE: frozenset(),
    State.FAILED: frozenset(),
    State.CANCELLED: frozenset(),
    State.SUPERSEDED: frozenset(),
    State.EXPIRED: frozenset(),
}

TERMINAL_STATES: frozenset[State] = frozenset(s for s, nxt in TRANSITIONS.items() if not nxt)


class IllegalTransition(Exception):
    """A state change the transition table does not allow (e.g. from a terminal state)."""

    def __init__(self, current: State, target: State, job_id: str | None = None) -> None:
        self.current = State(current)
        self.target = State(target)
        self.job_id = job_id
        who = f"job {job_id}" if job_id else "job"
        if self.current in TERMINAL_STATES:
            why = f"{self.current} is final and never changes"
        else:
            allowed = ", ".join(sorted(TRANSITIONS[self.current])) or "nothing"
            why = f"from {self.current} it can only become {allowed}"
        super().__init__(f"{who} cannot go from {self.current} to {self.target}: {why}")


def check_transition(current: State | str, target: State | str, job_id: str | None = None) -> State:
    """Return `target` if the table allows current -> target, else raise IllegalTransition."""
    current, target = State(current), State(target)
    if target not in TRANSITIONS[current]:
        raise IllegalTransition(current, target, job_id)
    return target


def states_that_may_become(target: State) -> tuple[State, ...]:
    """The states from which `target` is legal; the store builds its WHERE clauses from this."""
    return tuple(sorted(s for s, nxt in TRANSITIONS.items() if target in nxt))


class ExecutionMode(enum.StrEnum):
    SUBPROCESS = "SUBPROCESS"
    WARM = "WARM"


# --------------------------------------------------------------------------- limits

NAME_PATTERN = re.compile(r"[A-Za-z0-9_.-]{1,64}")
ENV_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
SUBJECT_KEY_MAX_BYTES = 1024
PAYLOAD_MAX_BYTES = 10_000_000  # SPEC §3: 10 MB encoded
LABEL_MAX_CHARS = 256  # user_tag, parent_job_id, chain_group_id
PRIORITY_MIN, PRIORITY_MAX = -1000, 1000
GENERATION_MAX = 2**63 - 1
MAX_ATTEMPTS_MAX = 1000
BACKOFF_BASE_MAX_MS = 24 * 3600 * 1000
BACKOFF_FACTOR_MIN, BACKOFF_FACTOR_MAX = 1.0, 100.0
BACKOFF_CAP_MS = 3600 * 1000
BACKOFF_JITTER = 0.25
DEADLINE_MAX_MS = 7 * 24 * 3600 * 1000
TTL_MAX_MS = 365 * 24 * 3600 * 1000
TIME_MAX_MS = 2**53  # far beyond any real clock, small enough for every JSON reader
DEPENDS_ON_MAX = 1000
ENV_MAX_ENTRIES = 256
ENV_VALUE_MAX_BYTES = 32 * 1024
DEFAULT_ENV_ALLOWLIST: frozenset[str] = frozenset(
    {"PATH", "HOME", "USER", "LANG", "TERM", "TMPDIR"}
)

# --------------------------------------------------------------------------- structs


class EnqueueRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What a client sends to enqueue one job (SPEC §3)."""

    job_type: str
    queue: str = "default"
    subject_key: str | None = None
    generation: int | None = None
    payload: dict[str, Any] = msgspec.field(default_factory=dict)
    priority: int = 0
    execution_mode: ExecutionMode = ExecutionMode.SUBPROCESS
    max_attempts: int = 3
    backoff_base_ms: int = 1000
    backoff_factor: float = 2.0
    deadline_ms: int = 60_000
    ttl_ms: int | None = None
    schedule_at: int | None = None
    wait_for_idle: bool = False
    require_charging: bool = False
    depends_on: list[str] = msgspec.field(default_factory=list)
    user_tag: str | None = None
    parent_job_id: str | None = None
    chain_group_id: str | None = None
    env: dict[str, str] = msgspec.field(default_factory=dict)
    supersede_running: bool = False


class Job(msgspec.Struct, kw_only=True):
    """A stored job: every field of the request plus what the daemon adds."""

    id: str
    state: State
    queue: str
    job_type: str
    subject_key: str | None
    generation: int | None
    payload: dict[str, Any]
    priority: int
    execution_mode: ExecutionMode
    max_attempts: int
    backoff_base_ms: int
    backoff_factor: float
    deadline_ms: int
    ttl_ms: int | None
    schedule_at: int | None
    wait_for_idle: bool
    require_charging: bool
    depends_on: list[str]
    user_tag: str | None
    parent_job_id: str | None
    chain_group_id: str | None
    env: dict[str, str]
    attempt: int
    created_at: int
    run_after: int
    started_at: int | None
    finished_at: int | None
    runner_pid: int | None
    runner_start_time: int | None  # Unix ms, like every time
    exit_code: int | None
    error_kind: str | None
    error_message: str | None
    result_summary: Any
    artifacts: list[str]
    progress: float | None
    progress_message: str | None
    waiting_reason: str | None = None

    @property
    def is_terminal(self) -> bool:
        return self.state in TERMINAL_STATES


class Outcome(msgspec.Struct, kw_only=True, frozen=True):
    """How one attempt ended, as reported by whoever ran it.

    `error_kind` is None for success. `permanent` means do not retry;
    `retry_after_ms` overrides the backoff delay for a retryable failure.
    """

    error_kind: str | None = None
    error_message: str | None = None
    exit_code: int | None = None
    result_summary: Any = None
    artifacts: list[str] = msgspec.field(default_factory=list)
    permanent: bool = False
    retry_after_ms: int | None = None

    @property
    def succeeded(self) -> bool:
        return self.error_kind is None


# --------------------------------------------------------------------------- validation


class ValidationError(ValueError):
    """One field broke one rule. `field` names it; the message says what is allowed."""

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.reason = message
        super().__init__(f"{field}: {message}")


def _check_int(field: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be an integer, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValidationError(field, f"must be between {low} and {high}, got {value}")


def _check_label(field: str, value: str | None) -> None:
    if value is None:
        return
    if not value:
        raise ValidationError(field, "must not be empty; leave it out instead")
    if len(value) > LABEL_MAX_CHARS:
        raise ValidationError(field, f"must be at most {LABEL_MAX_CHARS} characters")
    if "\x00" in value:
        raise ValidationError(field, "must not contain NUL characters")


_names_seen_valid: set[str] = set()


def check_name(field: str, value: str) -> None:
    """Queue and job type names: 1-64 of letters, digits, '_', '.', '-'."""
    if type(value) is str and value in _names_seen_valid:
        return
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise ValidationError(
            field, f"{value!r} is not a valid name: use 1-64 of A-Z a-z 0-9 _ . -"
        )
    if len(_names_seen_valid) < 10_000:  # a few queues and job types; bounded all the same
        _names_seen_valid.add(value)


# Integer fields: (name, lowest, highest). Checked inline on the hot path; the
# detailed message comes from _check_int only when a value is out of line.
_INT_FIELDS = (
    ("priority", PRIORITY_MIN, PRIORITY_MAX),
    ("max_attempts", 1, MAX_ATTEMPTS_MAX),
    ("backoff_base_ms", 0, BACKOFF_BASE_MAX_MS),
    ("deadline_ms", 1, DEADLINE_MAX_MS),
)
_OPTIONAL_INT_FIELDS = (
    ("generation", 0, GENERATION_MAX),
    ("ttl_ms", 1, TTL_MAX_MS),
    ("schedule_at", 0, TIME_MAX_MS),
)


def validate_enqueue(
    req: EnqueueRequest, *, env_allowlist: frozenset[str] = DEFAULT_ENV_ALLOWLIST
) -> bytes:
    """Check every field rule of SPEC §3; return the encoded payload.

    Raises ValidationError naming the first offending field. The encoded payload is
    returned because measuring its size needs it, and the store stores exactly it.
    """
    check_name("job_type", req.job_type)
    check_name("queue", req.queue)
    key = req.subject_key
    if key is not None:
        if type(key) is not str or "\x00" in key:
            raise ValidationError("subject_key", "must be a string without NUL characters")
        if not key:
            raise ValidationError("subject_key", "must not be empty; leave it out instead")
        if len(key) * 4 > SUBJECT_KEY_MAX_BYTES and (
            len(key.encode("utf-8", "surrogatepass")) > SUBJECT_KEY_MAX_BYTES
        ):
            raise ValidationError(
                "subject_key", f"must be at most {SUBJECT_KEY_MAX_BYTES} bytes in UTF-8"
            )
    elif req.generation is not None:
        raise ValidationError("generation", "only makes sense with a subject_key")
    for field, low, high in _INT_FIELDS:
        value = getattr(req, field)
        if type(value) is not int or not low <= value <= high:
            _check_int(field, value, low, high)
    for field, low, high in _OPTIONAL_INT_FIELDS:
        value = getattr(req, field)
        if value is not None and (type(value) is not int or not low <= value <= high):
            _check_int(field, value, low, high)
    if req.execution_mode not in ExecutionMode.__members__:
        raise ValidationError(
            "execution_mode", f"must be SUBPROCESS or WARM, got {req.execution_mode!r}"
        )
    factor = req.backoff_factor
    if not (
        isinstance(factor, int | float)
        and math.isfinite(factor)
        and BACKOFF_FACTOR_MIN <= factor <= BACKOFF_FACTOR_MAX
    ):
        raise ValidationError(
            "backoff_factor",
            f"must be between {BACKOFF_FACTOR_MIN} and {BACKOFF_FACTOR_MAX}, got {factor}",
        )
    if req.supersede_running and key is None:
        raise ValidationError("supersede_running", "only makes sense with a subject_key")
    if req.depends_on:
        _check_depends_on(req.depends_on)
    for field in ("user_tag", "parent_job_id", "chain_group_id"):
        if (value := getattr(req, field)) is not None:
            _check_label(field, value)
    if req.env:
        _check_env(req.env, env_allowlist)
    return _encode_payload(req.payload)


def _check_depends_on(depends_on: list[str]) -> None:
    if len(depends_on) > DEPENDS_ON_MAX:
        raise ValidationError("depends_on", f"may name at most {DEPENDS_ON_MAX} jobs")
    if len(set(depends_on)) != len(depends_on):
        raise ValidationError("depends_on", "names the same job twice")
    for job_id in depends_on:
        _check_label("depends_on", job_id)


def _check_env(env: dict[str, str], allowlist: frozenset[str]) -> None:
    if len(env) > ENV_MAX_ENTRIES:
        raise ValidationError("env", f"may set at most {ENV_MAX_ENTRIES} variables")
    for name, value in env.items():
        if not ENV_NAME_PATTERN.fullmatch(name):
            raise ValidationError("env", f"{name!r} is not a valid environment variable name")
        if name not in allowlist:
            allowed = ", ".join(sorted(allowlist))
            raise ValidationError(
                "env",
                f"{name} is not on the allowlist ({allowed}); "
                "ask the operator to add it with SEMANTICA_ENV_ALLOWLIST",
            )
        if "\x00" in value or len(value.encode("utf-8", "surrogatepass")) > ENV_VALUE_MAX_BYTES:
            raise ValidationError(
                "env", f"{name} must be at most {ENV_VALUE_MAX_BYTES} bytes, without NUL"
            )


_encoder = msgspec.json.Encoder()


def _encode_payload(payload: dict[str, Any]) -> bytes:
    if not isinstance(payload, dict):
        raise ValidationError("payload", "must be a JSON object")
    try:
        encoded = _encoder.encode(payload)
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValidationError("payload", f"is not JSON-serialisable: {exc}") from None
    if len(encoded) > PAYLOAD_MAX_BYTES:
        raise ValidationError(
            "payload",
            f"is {len(encoded)} bytes encoded; the limit is {PAYLOAD_MAX_BYTES} bytes (10 MB). "
            "Pass a path or reference to large data instead",
        )
    return encoded


# --------------------------------------------------------------------------- rules


def retry_delay_ms(
    attempt: int, *, base_ms: int, factor: float, rng: random.Random, cap_ms: int = BACKOFF_CAP_MS
) -> int:
    """Delay before retrying after failed attempt number `attempt` (1-based).

    base * factor^(attempt-1), capped at `cap_ms`, then spread by ±25 % jitter drawn
    from `rng` so that many jobs failing together do not retry together.
    """
    if attempt < 1:
        raise ValueError("attempt is 1-based")
    exponent = attempt - 1
    # Cap before multiplying out: factor**exponent may overflow a float.
    if base_ms == 0:
        nominal = 0.0
    elif factor > 1 and exponent * math.log(factor) > math.log(cap_ms / base_ms + 1):
        nominal = float(cap_ms)
    else:
        nominal = min(float(cap_ms), base_ms * factor**exponent)
    jitter = rng.uniform(1 - BACKOFF_JITTER, 1 + BACKOFF_JITTER)
    return round(nominal * jitter)


def expires_at(req: EnqueueRequest, now_ms: int) -> int | None:
    """When a job still queued stops being worth running (ttl counts from enqueue)."""
    return None if req.ttl_ms is None else now_ms + req.ttl_ms


def state_after_attempt(
    job: Job, outcome: Outcome, *, newer_request_exists: bool, now_ms: int, rng: random.Random
) -> tuple[State, int]:
    """Where a RUNNING job goes when its attempt ends, and from when it may run again.

    Success is DONE. A failure is SUPERSEDED when a newer request for its key exists
    (never retried), FAILED when permanent or out of attempts, else QUEUED again after
    the plugin's `retry_after_ms` or the backoff delay.
    """
    if outcome.succeeded:
        return State.DONE, job.run_after
    if newer_request_exists:
        return State.SUPERSEDED, job.run_after
    if outcome.permanent or job.attempt >= job.max_attempts:
        return State.FAILED, job.run_after
    if outcome.retry_after_ms is not None:  # the runner's own number: held to a year
        delay = min(max(0, outcome.retry_after_ms), RETRY_AFTER_MAX_MS)
    else:
        delay = retry_delay_ms(
            job.attempt, base_ms=job.backoff_base_ms, factor=job.backoff_factor, rng=rng
        )
    return State.QUEUED, now_ms + delay


# --------------------------------------------------------------------------- waiting


class WaitFacts(msgspec.Struct, kw_only=True, frozen=True):
    """What stands between a QUEUED job and a worker, as the store sees it now.

    Each field mirrors one condition of the claim (store.SQL_CLAIM); `waiting_reason`
    turns them into the answer `jobs.get.v1` gives.
    """

    queue_paused: bool = False
    queue_limit: int | None = None
    queue_running: int = 0
    global_limit: int = 1
    global_running: int = 0
    unfinished_dependencies: list[tuple[str, str]] = msgspec.field(default_factory=list)
    latest_generation: int | None = None
    running_same_subject: str | None = None
    cpu_idle: bool = True
    on_ac_power: bool = True
    ahead: int = 0  # ready jobs that the claim order puts first
    # The daemon's: what the job's kind of process waits for (a WARM worker, the
    # zygote's spare) while it is got ready; a job is claimed only with its process.
    runner_starting: str | None = None


def waiting_reason(job: Job, facts: WaitFacts, now_ms: int) -> str | None:
    """Why a QUEUED job has not started yet, in words a person can act on; None when
    it is not QUEUED. The first reason that applies is given (each alone holds it)."""
    if job.state is not State.QUEUED:
        return None
    if job.run_after > now_ms:
        wait = f"{(job.run_after - now_ms) / 1000:.1f}s"
        if job.attempt > 0:
            return f"retry backoff: attempt {job.attempt + 1} starts in {wait}"
        return f"scheduled: schedule_at is in {wait}"
    if facts.unfinished_dependencies:
        dep, state = facts.unfinished_dependencies[0]
        more = len(facts.unfinished_dependencies) - 1
        return f"waiting for dependency {dep} ({state})" + (f" and {more} more" if more else "")
    if (
        job.generation is not None
        and facts.latest_generation is not None
        and facts.latest_generation > job.generation
    ):
        return (
            f"a newer generation ({facts.latest_generation}) of subject "
            f"{job.subject_key!r} exists: this one will not run"
        )
    if facts.running_same_subject is not None:
        return (
            f"an older generation of subject {job.subject_key!r} is still running "
            f"(job {facts.running_same_subject})"
        )
    if facts.queue_paused:
        return f"queue {job.queue!r} is paused: resume it with `semantica-cli resume {job.queue}`"
    if facts.queue_limit is not None and facts.queue_running >= facts.queue_limit:
        return f"queue {job.queue!r} is full: {facts.queue_running} of {facts.queue_limit} running"
    if job.wait_for_idle and not facts.cpu_idle:
        return "waiting for the CPU to be idle (wait_for_idle)"
    if job.require_charging and not facts.on_ac_power:
        return "waiting for AC power: on battery (require_charging)"
    if facts.global_running >= facts.global_limit:
        return f"all {facts.global_limit} workers are busy"
    if facts.ahead:
        count = f"{facts.ahead}+" if facts.ahead >= 1000 else str(facts.ahead)
        return f"ready: {count} job(s) ahead of it by priority and age"
    if facts.runner_starting is not None:
        return f"ready: it starts once its process is there ({facts.runner_starting})"
    return "ready: starting now"
