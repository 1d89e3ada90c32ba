"""The pure core: transition table, validation, backoff, the retry decision."""

from __future__ import annotations

import itertools
import random

import msgspec
import pytest

from semantica import domain
from semantica.domain import (
    TERMINAL_STATES,
    TRANSITIONS,
    EnqueueRequest,
    IllegalTransition,
    Outcome,
    State,
    ValidationError,
)

LEGAL = {
    (State.QUEUED, State.RUNNING),
    (State.QUEUED, State.CANCELLED),
    (State.QUEUED, State.SUPERSEDED),
    (State.QUEUED, State.EXPIRED),
    (State.RUNNING, State.DONE),
    (State.RUNNING, State.FAILED),
    (State.RUNNING, State.QUEUED),
    (State.RUNNING, State.CANCELLED),
    (State.RUNNING, State.SUPERSEDED),
}


@pytest.mark.parametrize(("current", "target"), list(itertools.product(State, State)))
def test_transition_table_allows_exactly_the_spec_moves(current, target):
    if (current, target) in LEGAL:
        assert domain.check_transition(current, target) is target
    else:
        with pytest.raises(IllegalTransition) as info:
            domain.check_transition(current, target, "job-1")
        assert "job-1" in str(info.value)
        assert str(current) in str(info.value)


def test_terminal_states_are_exactly_those_with_no_exit():
    assert {
        State.DONE,
        State.FAILED,
        State.CANCELLED,
        State.SUPERSEDED,
        State.EXPIRED,
    } == TERMINAL_STATES
    for state in TERMINAL_STATES:
        assert TRANSITIONS[state] == frozenset()


def test_illegal_transition_from_terminal_says_it_is_final():
    with pytest.raises(IllegalTransition, match="DONE is final"):
        domain.check_transition("DONE", "QUEUED")


def test_states_that_may_become():
    assert domain.states_that_may_become(State.RUNNING) == (State.QUEUED,)
    assert set(domain.states_that_may_become(State.CANCELLED)) == {State.QUEUED, State.RUNNING}


def req(**fields) -> EnqueueRequest:
    fields.setdefault("job_type", "noop")
    return EnqueueRequest(**fields)


def test_defaults_match_the_spec():
    r = req()
    assert (r.queue, r.priority, r.max_attempts, r.backoff_base_ms, r.backoff_factor) == (
        "default",
        0,
        3,
        1000,
        2.0,
    )
    assert r.deadline_ms == 60_000
    assert r.execution_mode is domain.ExecutionMode.SUBPROCESS
    assert r.payload == {} and r.depends_on == [] and r.env == {}
    assert domain.validate_enqueue(r) == b"{}"


BAD_FIELDS = [
    ({"queue": ""}, "queue", "not a valid name"),
    ({"queue": "a" * 65}, "queue", "1-64"),
    ({"queue": "has space"}, "queue", "not a valid name"),
    ({"job_type": "rm -rf"}, "job_type", "not a valid name"),
    ({"subject_key": "a\x00b"}, "subject_key", "NUL"),
    ({"subject_key": "é" * 513}, "subject_key", "1024 bytes"),
    ({"subject_key": ""}, "subject_key", "empty"),
    ({"subject_key": "k", "generation": -1}, "generation", "between 0"),
    ({"generation": 3}, "generation", "subject_key"),
    ({"priority": 1001}, "priority", "-1000 and 1000"),
    ({"priority": -1001}, "priority", "-1000 and 1000"),
    ({"max_attempts": 0}, "max_attempts", "between 1"),
    ({"backoff_base_ms": -1}, "backoff_base_ms", "between 0"),
    ({"backoff_factor": 0.5}, "backoff_factor", "between 1.0"),
    ({"backoff_factor": float("nan")}, "backoff_factor", "between"),
    ({"deadline_ms": 0}, "deadline_ms", "between 1"),
    ({"ttl_ms": 0}, "ttl_ms", "between 1"),
    ({"schedule_at": -5}, "schedule_at", "between 0"),
    ({"supersede_running": True}, "supersede_running", "subject_key"),
    ({"depends_on": ["a", "a"]}, "depends_on", "twice"),
    ({"depends_on": ["x"] * 0 + [f"j{i}" for i in range(1001)]}, "depends_on", "at most 1000"),
    ({"user_tag": "t\x00"}, "user_tag", "NUL"),
    ({"user_tag": "t" * 257}, "user_tag", "256"),
    ({"chain_group_id": ""}, "chain_group_id", "empty"),
    ({"parent_job_id": "p" * 300}, "parent_job_id", "256"),
    ({"env": {"SECRET_TOKEN": "x"}}, "env", "not on the allowlist"),
    ({"env": {"1BAD": "x"}}, "env", "not a valid environment variable name"),
    ({"env": {"LANG": "a\x00"}}, "env", "without NUL"),
    ({"payload": {"blob": "x" * domain.PAYLOAD_MAX_BYTES}}, "payload", "limit is"),
]


@pytest.mark.parametrize(("fields", "field", "fragment"), BAD_FIELDS)
def test_validation_names_the_field_and_what_is_allowed(fields, field, fragment):
    with pytest.raises(ValidationError) as info:
        domain.validate_enqueue(req(**fields))
    assert info.value.field == field
    assert fragment in str(info.value)


def test_payload_limit_is_exact():
    overhead = len(b'{"blob":""}')
    at_limit = {"blob": "x" * (domain.PAYLOAD_MAX_BYTES - overhead)}
    assert len(domain.validate_enqueue(req(payload=at_limit))) == domain.PAYLOAD_MAX_BYTES
    over = {"blob": "x" * (domain.PAYLOAD_MAX_BYTES - overhead + 1)}
    with pytest.raises(ValidationError, match="payload"):
        domain.validate_enqueue(req(payload=over))


def test_env_allowlist_is_configurable():
    r = req(env={"MY_TOOL_HOME": "/opt"})
    with pytest.raises(ValidationError):
        domain.validate_enqueue(r)
    allow = domain.DEFAULT_ENV_ALLOWLIST | {"MY_TOOL_HOME"}
    assert domain.validate_enqueue(r, env_allowlist=allow) == b"{}"


def test_unknown_fields_are_rejected_by_the_decoder():
    with pytest.raises(msgspec.ValidationError, match="unknown field `colour`"):
        msgspec.json.decode(b'{"job_type": "noop", "colour": "red"}', type=EnqueueRequest)


def test_wrong_types_are_rejected_by_the_decoder():
    with pytest.raises(msgspec.ValidationError, match=r"\$\.priority"):
        msgspec.json.decode(b'{"job_type": "noop", "priority": "high"}', type=EnqueueRequest)


# --------------------------------------------------------------------------- backoff


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8])
def test_backoff_is_exponential_within_25_percent_jitter(attempt):
    rng = random.Random(attempt)
    nominal = 1000 * 2 ** (attempt - 1)
    delays = [domain.retry_delay_ms(attempt, base_ms=1000, factor=2.0, rng=rng) for _ in range(500)]
    assert min(delays) >= nominal * 0.75
    assert max(delays) <= nominal * 1.25
    # The jitter really spreads: not all the same, and both halves of the range are used.
    assert min(delays) < nominal * 0.9 and max(delays) > nominal * 1.1


def test_backoff_is_capped_even_for_huge_exponents():
    rng = random.Random(0)
    delay = domain.retry_delay_ms(900, base_ms=1000, factor=100.0, rng=rng)
    assert domain.BACKOFF_CAP_MS * 0.75 <= delay <= domain.BACKOFF_CAP_MS * 1.25


def test_backoff_is_deterministic_for_a_seeded_source():
    a = [domain.retry_delay_ms(2, base_ms=500, factor=3, rng=random.Random(7)) for _ in range(3)]
    assert len(set(a)) == 1


def test_zero_base_means_immediate_retry():
    assert domain.retry_delay_ms(4, base_ms=0, factor=2, rng=random.Random()) == 0


# --------------------------------------------------------------------------- after an attempt


def job(**fields) -> domain.Job:
    base = dict(
        id="j",
        state=State.RUNNING,
        queue="default",
        job_type="noop",
        subject_key=None,
        generation=None,
        payload={},
        priority=0,
        execution_mode=domain.ExecutionMode.SUBPROCESS,
        max_attempts=3,
        backoff_base_ms=1000,
        backoff_factor=2.0,
        deadline_ms=60000,
        ttl_ms=None,
        schedule_at=None,
        wait_for_idle=False,
        require_charging=False,
        depends_on=[],
        user_tag=None,
        parent_job_id=None,
        chain_group_id=None,
        env={},
        attempt=1,
        created_at=0,
        run_after=0,
        started_at=0,
        finished_at=None,
        runner_pid=None,
        runner_start_time=None,
        exit_code=None,
        error_kind=None,
        error_message=None,
        result_summary=None,
        artifacts=[],
        progress=None,
        progress_message=None,
    )
    base.update(fields)
    return domain.Job(**base)


FAILED_ATTEMPT = Outcome(error_kind="exception", error_message="boom")


def decide(j, outcome, newer=False, now=10_000):
    return domain.state_after_attempt(
        j, outcome, newer_request_exists=newer, now_ms=now, rng=random.Random(1)
    )


def test_success_is_done():
    assert decide(job(), Outcome(result_summary={"ok": 1}))[0] is State.DONE


def test_failure_with_attempts_left_is_requeued_after_backoff():
    state, run_after = decide(job(attempt=2), FAILED_ATTEMPT)
    assert state is State.QUEUED
    assert 10_000 + 1500 <= run_after <= 10_000 + 2500


def test_failure_on_last_attempt_is_failed():
    assert decide(job(attempt=3), FAILED_ATTEMPT)[0] is State.FAILED


def test_permanent_failure_is_never_retried():
    permanent = Outcome(error_kind="exception", permanent=True)
    assert decide(job(attempt=1), permanent)[0] is State.FAILED


def test_retry_after_overrides_backoff():
    outcome = Outcome(error_kind="exception", retry_after_ms=42)
    assert decide(job(attempt=1), outcome) == (State.QUEUED, 10_042)


def test_failure_with_newer_request_is_superseded_not_retried():
    assert decide(job(attempt=1), FAILED_ATTEMPT, newer=True)[0] is State.SUPERSEDED


def test_success_with_newer_request_still_counts_as_done():
    assert decide(job(), Outcome(), newer=True)[0] is State.DONE


def test_execution_mode_must_be_known():
    with pytest.raises(ValidationError, match="SUBPROCESS or WARM"):
        domain.validate_enqueue(req(execution_mode="TURBO"))


# --------------------------------------------------------------------------- waiting reason

NOW = 10_000


def queued(**fields) -> domain.Job:
    base = dict(state=State.QUEUED, attempt=0, started_at=None, queue="q", run_after=NOW)
    return job(**{**base, **fields})


def keyed(**fields) -> domain.Job:
    return queued(subject_key="src/a.py", generation=3, **fields)


WAITING_REASONS = [
    ("time", queued(run_after=NOW + 2500), {}, "scheduled: schedule_at is in 2.5s"),
    (
        "backoff",
        queued(attempt=1, run_after=NOW + 1200),
        {},
        "retry backoff: attempt 2 starts in 1.2s",
    ),
    (
        "dependency",
        queued(depends_on=["dep-1"]),
        {"unfinished_dependencies": [("dep-1", "RUNNING")]},
        "waiting for dependency dep-1 (RUNNING)",
    ),
    (
        "dependencies",
        queued(depends_on=["dep-1", "dep-2", "dep-3"]),
        {"unfinished_dependencies": [("dep-2", "QUEUED"), ("dep-1", "QUEUED"), ("d", "QUEUED")]},
        "waiting for dependency dep-2 (QUEUED) and 2 more",
    ),
    (
        "cpu not idle",
        queued(wait_for_idle=True),
        {"cpu_idle": False},
        "waiting for the CPU to be idle (wait_for_idle)",
    ),
    (
        "on battery",
        queued(require_charging=True),
        {"on_ac_power": False},
        "waiting for AC power: on battery (require_charging)",
    ),
    (
        "queue paused",
        queued(),
        {"queue_paused": True},
        "queue 'q' is paused: resume it with `semantica-cli resume q`",
    ),
    (
        "queue full",
        queued(),
        {"queue_limit": 2, "queue_running": 2},
        "queue 'q' is full: 2 of 2 running",
    ),
    (
        "newer generation",
        keyed(),
        {"latest_generation": 5},
        "a newer generation (5) of subject 'src/a.py' exists: this one will not run",
    ),
    (
        "older generation running",
        keyed(),
        {"latest_generation": 3, "running_same_subject": "old-1"},
        "an older generation of subject 'src/a.py' is still running (job old-1)",
    ),
    (
        "workers busy",
        queued(),
        {"global_limit": 4, "global_running": 4},
        "all 4 workers are busy",
    ),
    ("behind others", queued(), {"ahead": 3}, "ready: 3 job(s) ahead of it by priority and age"),
    (
        "behind many",
        queued(),
        {"ahead": 1000},
        "ready: 1000+ job(s) ahead of it by priority and age",
    ),
    (
        "process starting",
        queued(),
        {"runner_starting": "a WARM worker is starting"},
        "ready: it starts once its process is there (a WARM worker is starting)",
    ),
    (
        "workers busy before the process",
        queued(),
        {"global_limit": 2, "global_running": 2, "runner_starting": "a WARM worker is starting"},
        "all 2 workers are busy",
    ),
    ("ready", queued(), {}, "ready: starting now"),
]


@pytest.mark.parametrize(
    ("j", "facts", "reason"),
    [case[1:] for case in WAITING_REASONS],
    ids=[case[0] for case in WAITING_REASONS],
)
def test_waiting_reason_names_each_cause(j, facts, reason):
    assert domain.waiting_reason(j, domain.WaitFacts(**facts), NOW) == reason


def test_waiting_reason_is_none_unless_queued():
    facts = domain.WaitFacts(queue_paused=True)
    for state in State:
        if state is not State.QUEUED:
            assert domain.waiting_reason(queued(state=state), facts, NOW) is None


def test_conditions_hold_back_only_the_jobs_that_ask_for_them():
    bad_conditions = domain.WaitFacts(cpu_idle=False, on_ac_power=False)
    assert domain.waiting_reason(queued(), bad_conditions, NOW) == "ready: starting now"
    assert "CPU" in domain.waiting_reason(queued(wait_for_idle=True), bad_conditions, NOW)
    assert "AC power" in domain.waiting_reason(queued(require_charging=True), bad_conditions, NOW)


def test_waiting_reason_edges():
    # Due exactly now is not waiting for its time; a queue without a limit is never full;
    # the same generation as the latest is not "newer".
    assert domain.waiting_reason(queued(run_after=NOW), domain.WaitFacts(), NOW) == (
        "ready: starting now"
    )
    no_limit = domain.WaitFacts(queue_limit=None, queue_running=50, global_limit=100)
    assert domain.waiting_reason(queued(), no_limit, NOW) == "ready: starting now"
    same = domain.WaitFacts(latest_generation=3)
    assert domain.waiting_reason(keyed(), same, NOW) == "ready: starting now"


def test_the_first_cause_that_applies_is_given():
    everything = domain.WaitFacts(
        queue_paused=True,
        queue_limit=1,
        queue_running=1,
        global_limit=1,
        global_running=1,
        unfinished_dependencies=[("dep-1", "QUEUED")],
        running_same_subject="old-1",
        cpu_idle=False,
        on_ac_power=False,
    )
    gated = dict(wait_for_idle=True, require_charging=True)
    late = keyed(run_after=NOW + 1000, **gated)
    assert domain.waiting_reason(late, everything, NOW).startswith("scheduled")
    now_due = keyed(**gated)
    assert domain.waiting_reason(now_due, everything, NOW).startswith("waiting for dependency")
    no_deps = msgspec.structs.replace(everything, unfinished_dependencies=[])
    assert "older generation" in domain.waiting_reason(now_due, no_deps, NOW)
    free_key = msgspec.structs.replace(no_deps, running_same_subject=None)
    assert "paused" in domain.waiting_reason(now_due, free_key, NOW)
    resumed = msgspec.structs.replace(free_key, queue_paused=False)
    assert "full" in domain.waiting_reason(now_due, resumed, NOW)
    room = msgspec.structs.replace(resumed, queue_limit=None)
    assert "CPU" in domain.waiting_reason(now_due, room, NOW)
    idle = msgspec.structs.replace(room, cpu_idle=True)
    assert "AC power" in domain.waiting_reason(now_due, idle, NOW)
    plugged = msgspec.structs.replace(idle, on_ac_power=True)
    assert domain.waiting_reason(now_due, plugged, NOW) == "all 1 workers are busy"
