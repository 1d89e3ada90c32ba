"""The store on real SQLite files: supersede, claim, finish, cancel, expiry, reads."""

from __future__ import annotations

import itertools
import os
import random

import apsw
import pytest
from conftest import ALL_MET, snapshot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from semantica import domain
from semantica import store as store_module
from semantica.domain import EnqueueRequest, IllegalTransition, Outcome, State, ValidationError
from semantica.store import Conditions, JobFilter, NotFound, Store

NOW = 1_000_000


def enqueue(store, now=NOW, **fields):
    fields.setdefault("job_type", "noop")
    return store.enqueue(EnqueueRequest(**fields), now=now)


def claim(store, now=NOW, limit=100, conditions=ALL_MET):
    return store.claim_next_job(now=now, global_limit=limit, conditions=conditions)


def fail(error_kind="exception", **fields):
    return Outcome(error_kind=error_kind, error_message="it broke", **fields)


# --------------------------------------------------------------------------- open


def test_open_sets_wal_foreign_keys_and_synchronous(tmp_path):
    s = Store.open(tmp_path / "a.db", synchronous="normal")
    db = s.connection
    assert db.execute("PRAGMA journal_mode").fetchall()[0][0] == "wal"
    assert db.execute("PRAGMA foreign_keys").fetchall()[0][0] == 1
    assert db.execute("PRAGMA synchronous").fetchall()[0][0] == 1  # NORMAL
    s.close()
    s = Store.open(tmp_path / "a.db")
    assert s.connection.execute("PRAGMA synchronous").fetchall()[0][0] == 2  # FULL by default
    s.close()


def test_unknown_synchronous_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="synchronous must be one of"):
        Store.open(tmp_path / "a.db", synchronous="sometimes")


def test_acknowledged_jobs_survive_reopen(tmp_path):
    s = Store.open(tmp_path / "a.db")
    ids = [enqueue(s, subject_key=f"k{i}").job.id for i in range(5)]
    s.close()
    s = Store.open(tmp_path / "a.db")
    assert [s.get(i).state for i in ids] == [State.QUEUED] * 5
    s.close()


# --------------------------------------------------------------------------- enqueue


def test_enqueue_returns_the_stored_job_with_every_field(store):
    job = enqueue(
        store,
        queue="build",
        subject_key="src/main.rs",
        payload={"path": "src/main.rs"},
        priority=5,
        max_attempts=4,
        ttl_ms=500,
        schedule_at=NOW + 10,
        wait_for_idle=True,
        user_tag="agent-1",
        parent_job_id="p",
        chain_group_id="c",
        env={"LANG": "C"},
        execution_mode="WARM",
    ).job
    assert store.get(job.id) == job
    assert job.state is State.QUEUED
    assert (job.queue, job.subject_key, job.generation, job.priority) == (
        "build",
        "src/main.rs",
        1,
        5,
    )
    assert job.payload == {"path": "src/main.rs"}
    assert job.execution_mode is domain.ExecutionMode.WARM
    assert (job.created_at, job.run_after, job.schedule_at) == (NOW, NOW + 10, NOW + 10)
    assert (job.user_tag, job.parent_job_id, job.chain_group_id) == ("agent-1", "p", "c")
    assert job.env == {"LANG": "C"} and job.wait_for_idle and not job.require_charging
    assert job.attempt == 0 and job.finished_at is None


def test_enqueue_result_equals_the_stored_row_in_every_case(store):
    dep = enqueue(store).job
    results = [
        enqueue(store, subject_key="k", generation=5, backoff_factor=3),
        enqueue(store, subject_key="k", generation=2),  # superseded on arrival
        enqueue(store, depends_on=[dep.id], ttl_ms=10, env={"TERM": "dumb"}),
        enqueue(store, queue="new-queue", payload={"nested": [1, {"a": None}]}),
    ]
    for result in results:
        assert store.get(result.job.id) == result.job


def test_three_enqueues_of_one_subject_collapse_to_one_queued_job(store):
    a = enqueue(store, subject_key="src/main.rs").job
    b = enqueue(store, subject_key="src/main.rs")
    c = enqueue(store, subject_key="src/main.rs")
    assert b.superseded_ids == [a.id] and c.superseded_ids == [b.job.id]
    assert [store.get(x).state for x in (a.id, b.job.id, c.job.id)] == [
        State.SUPERSEDED,
        State.SUPERSEDED,
        State.QUEUED,
    ]
    assert [a.generation, b.job.generation, c.job.generation] == [1, 2, 3]
    assert store.get(a.id).error_kind == "superseded"
    assert b.job.id in store.get(a.id).error_message


def test_supersede_is_per_queue_job_type_and_subject(store):
    a = enqueue(store, subject_key="k").job
    enqueue(store, subject_key="k", queue="other")
    enqueue(store, subject_key="k", job_type="sleep")
    enqueue(store, subject_key="other")
    enqueue(store)  # keyless jobs never supersede anything
    assert store.get(a.id).state is State.QUEUED
    assert store.stats().by_state["QUEUED"] == 5


def test_out_of_order_generation_is_superseded_on_arrival(store):
    new = enqueue(store, subject_key="k", generation=7).job
    old = enqueue(store, subject_key="k", generation=5)
    assert old.superseded_on_arrival
    assert old.job.state is State.SUPERSEDED and old.job.finished_at == NOW
    assert "older than the latest (7)" in old.job.error_message
    assert store.get(new.id).state is State.QUEUED
    # The server-assigned generation continues after the highest seen.
    assert enqueue(store, subject_key="k").job.generation == 8


def test_newer_explicit_generation_supersedes_queued(store):
    a = enqueue(store, subject_key="k", generation=1).job
    b = enqueue(store, subject_key="k", generation=2)
    assert not b.superseded_on_arrival and b.superseded_ids == [a.id]


def test_newer_generation_waits_while_older_runs(store, rng):
    old = enqueue(store, subject_key="k").job
    assert claim(store).id == old.id
    new = enqueue(store, subject_key="k").job
    assert store.get(old.id).state is State.RUNNING
    assert claim(store) is None  # one at a time per key
    store.finish(old.id, Outcome(), now=NOW, rng=rng)
    assert claim(store).id == new.id


def test_supersede_running_marks_the_running_job_superseded(store, rng):
    old = enqueue(store, subject_key="k").job
    claim(store)
    result = enqueue(store, subject_key="k", supersede_running=True)
    assert result.superseded_running_ids == [old.id]
    assert store.get(old.id).state is State.SUPERSEDED
    # The killed runner's late report does not resurrect it.
    assert store.finish(old.id, fail("signal"), now=NOW, rng=rng).state is State.SUPERSEDED
    assert claim(store).id == result.job.id


def test_enqueue_batch_is_in_order(store):
    results = store.enqueue_batch(
        [EnqueueRequest(job_type="noop", subject_key=f"k{i % 2}") for i in range(4)], now=NOW
    )
    assert [r.job.generation for r in results] == [1, 1, 2, 2]
    assert results[2].superseded_ids == [results[0].job.id]


def test_enqueue_batch_is_all_or_nothing(store):
    enqueue(store, subject_key="seed")
    before = snapshot(store)
    batch = [
        EnqueueRequest(job_type="noop", subject_key="seed"),
        EnqueueRequest(job_type="noop", depends_on=["no-such-job"]),
    ]
    with pytest.raises(ValidationError, match="no job 'no-such-job'"):
        store.enqueue_batch(batch, now=NOW)
    assert snapshot(store) == before


def test_a_batch_into_new_queues_writes_each_queue_row_once(store):
    statements: list[str] = []

    def trace(_cursor, sql, _bindings):
        statements.append(sql)
        return True

    store.connection.exec_trace = trace
    batch = [EnqueueRequest(job_type="noop", queue=f"q{i % 2}") for i in range(50)]
    store.enqueue_batch(batch, now=NOW)
    store.connection.exec_trace = None
    assert sum("INSERT INTO queues" in sql for sql in statements) == 2
    assert {q.name for q in store.queues()} >= {"q0", "q1"}


def test_a_refused_batch_leaves_no_queue_row_behind(store):
    batch = [
        EnqueueRequest(job_type="noop", queue="fresh"),
        EnqueueRequest(job_type="noop", queue="fresh", depends_on=["no-such-job"]),
    ]
    with pytest.raises(ValidationError):
        store.enqueue_batch(batch, now=NOW)
    assert "fresh" not in {q.name for q in store.queues()}
    assert enqueue(store, queue="fresh").job.queue == "fresh"  # and it is created later


def test_enqueue_batch_names_the_bad_job(store):
    batch = [EnqueueRequest(job_type="noop"), EnqueueRequest(job_type="noop", priority=5000)]
    with pytest.raises(ValidationError) as info:
        store.enqueue_batch(batch, now=NOW)
    assert info.value.field == "jobs[1].priority"


@pytest.mark.parametrize("size", [1, 3])
def test_enqueue_batch_names_the_job_with_a_missing_dependency(store, size):
    batch = [EnqueueRequest(job_type="noop") for _ in range(size - 1)]
    batch.append(EnqueueRequest(job_type="noop", depends_on=["no-such-job"]))
    with pytest.raises(ValidationError) as info:
        store.enqueue_batch(batch, now=NOW)
    assert info.value.field == f"jobs[{size - 1}].depends_on"
    assert "no job 'no-such-job' exists" in str(info.value)


BAD_REQUESTS = [
    {"subject_key": "nul\x00inside"},
    {"payload": {"x": "y" * (10_000_001 - len('{"x":""}'))}},  # 10 MB + 1 encoded
    {"queue": "bad queue!"},
    {"job_type": "../etc"},
    {"priority": 1001},
    {"env": {"AWS_SECRET_ACCESS_KEY": "x"}},
    {"depends_on": ["missing"]},
]


@pytest.mark.parametrize("fields", BAD_REQUESTS)
def test_bad_input_is_rejected_and_changes_nothing(store, fields):
    enqueue(store, subject_key="existing")
    before = snapshot(store)
    with pytest.raises(ValidationError):
        enqueue(store, **fields)
    assert snapshot(store) == before


def test_depending_on_a_failed_job_is_refused(store, rng):
    dep = enqueue(store, max_attempts=1).job
    claim(store)
    store.finish(dep.id, fail(), now=NOW, rng=rng)
    with pytest.raises(ValidationError, match="already ended FAILED"):
        enqueue(store, depends_on=[dep.id])


# --------------------------------------------------------------------------- the schema


def test_schema_forbids_two_queued_jobs_of_one_key(store):
    job = enqueue(store, subject_key="k").job
    with pytest.raises(apsw.ConstraintError):
        store.connection.execute(
            "INSERT INTO jobs (id, state, queue, job_type, subject_key, generation, payload, "
            "priority, execution_mode, max_attempts, backoff_base_ms, backoff_factor, "
            "deadline_ms, wait_for_idle, require_charging, created_at, run_after) "
            "SELECT 'x', state, queue, job_type, subject_key, generation + 1, payload, "
            "priority, execution_mode, max_attempts, backoff_base_ms, backoff_factor, "
            "deadline_ms, wait_for_idle, require_charging, created_at, run_after "
            "FROM jobs WHERE id = ?",
            (job.id,),
        )


def test_schema_forbids_two_running_jobs_of_one_key(store):
    a = enqueue(store, subject_key="k").job
    claim(store)
    b = enqueue(store, subject_key="k").job
    with pytest.raises(apsw.ConstraintError):
        store.connection.execute("UPDATE jobs SET state = 'RUNNING' WHERE id = ?", (b.id,))
    assert store.get(a.id).state is State.RUNNING


def test_schema_keeps_terminal_states_final(store):
    job = enqueue(store).job
    store.cancel(job_id=job.id, now=NOW)
    with pytest.raises(apsw.ConstraintError, match="terminal"):
        store.connection.execute("UPDATE jobs SET state = 'QUEUED' WHERE id = ?", (job.id,))


# --------------------------------------------------------------------------- claim


def test_claim_order_is_priority_then_fifo(store):
    low = enqueue(store, priority=-5).job
    first = enqueue(store, priority=10).job
    second = enqueue(store, priority=10).job
    mid = enqueue(store).job
    order = [claim(store).id for _ in range(4)]
    assert order == [first.id, second.id, mid.id, low.id]
    assert claim(store) is None


def test_claim_marks_running_and_counts_the_attempt(store):
    enqueue(store)
    job = claim(store, now=NOW + 5)
    assert job.state is State.RUNNING and job.attempt == 1 and job.started_at == NOW + 5
    assert store.get(job.id) == job


def test_claim_waits_for_schedule_at(store):
    job = enqueue(store, schedule_at=NOW + 100).job
    assert claim(store, now=NOW + 99) is None
    assert claim(store, now=NOW + 100).id == job.id


def test_claim_skips_expired_and_expire_overdue_marks_them(store):
    job = enqueue(store, ttl_ms=50).job
    assert claim(store, now=NOW + 50) is None
    assert store.expire_overdue(now=NOW + 49) == []
    assert store.expire_overdue(now=NOW + 50) == [job.id]
    assert store.get(job.id).state is State.EXPIRED


def test_claim_respects_the_global_limit(store):
    for _ in range(3):
        enqueue(store)
    assert claim(store, limit=2) and claim(store, limit=2)
    assert claim(store, limit=2) is None
    assert store.count_running() == 2


def test_claim_respects_queue_concurrency_and_pause(store):
    store.configure_queue("q", concurrency=1, now=NOW)
    a = enqueue(store, queue="q").job
    enqueue(store, queue="q")
    other = enqueue(store, queue="other").job
    assert claim(store).id == a.id
    assert claim(store).id == other.id  # q is full, other is not
    assert claim(store) is None
    store.configure_queue("q", concurrency=None, now=NOW)
    store.set_queue_paused("q", True, now=NOW)
    assert claim(store) is None
    store.set_queue_paused("q", False, now=NOW)
    assert claim(store) is not None
    info = store.queue("q")
    assert info.concurrency is None and not info.paused and info.counts == {"RUNNING": 2}


def test_claim_checks_conditions(store):
    idle = enqueue(store, wait_for_idle=True).job
    ac = enqueue(store, require_charging=True).job
    busy_on_battery = Conditions(cpu_idle=False, on_ac_power=False)
    assert claim(store, conditions=busy_on_battery) is None
    assert claim(store, conditions=Conditions(cpu_idle=False, on_ac_power=True)).id == ac.id
    assert claim(store, conditions=Conditions(cpu_idle=True, on_ac_power=False)).id == idle.id


def test_gated_waiting_follows_every_change_of_the_gated_jobs(store, rng):
    """The answer is kept between writes that cannot change it (the claims and ends
    of ungated jobs); every change to which QUEUED jobs wait on a condition shows."""
    assert store.gated_waiting() == (False, False)
    plain = enqueue(store).job
    assert store.gated_waiting() == (False, False)
    store.record_end(plain.id, Outcome(), now=NOW, rng=rng, claimed=claim(store))
    assert store.gated_waiting() == (False, False)

    idle = enqueue(store, wait_for_idle=True, max_attempts=2).job
    assert store.gated_waiting() == (True, False)
    running = claim(store)
    assert running.id == idle.id and store.gated_waiting() == (False, False)
    store.record_end(idle.id, fail(), now=NOW, rng=rng, claimed=running)  # back in line
    assert store.gated_waiting() == (True, False)
    store.cancel(job_id=idle.id, now=NOW)
    assert store.gated_waiting() == (False, False)

    # Cancelled because a dependency failed, by the end of an ungated job.
    dep = enqueue(store, priority=9).job
    enqueue(store, require_charging=True, depends_on=[dep.id])
    assert store.gated_waiting() == (False, True)
    failing = claim(store)
    assert failing.id == dep.id
    store.record_end(dep.id, fail(permanent=True), now=NOW, rng=rng, claimed=failing)
    assert store.gated_waiting() == (False, False)

    # A gated job stored in a transaction that rolls back was never there.
    seen = []

    def store_and_roll_back():
        with store.transaction():
            enqueue(store, wait_for_idle=True)
            seen.append(store.gated_waiting())
            raise RuntimeError("rolled back")

    with pytest.raises(RuntimeError):
        store_and_roll_back()
    assert seen == [(True, False)] and store.gated_waiting() == (False, False)


def test_claim_waits_for_dependencies(store, rng):
    dep = enqueue(store, priority=-1).job
    child = enqueue(store, priority=5, depends_on=[dep.id]).job
    assert claim(store).id == dep.id
    assert claim(store) is None
    store.finish(dep.id, Outcome(), now=NOW, rng=rng)
    assert claim(store).id == child.id


def test_claim_never_takes_an_older_generation(store):
    enqueue(store, subject_key="k", generation=3)
    enqueue(store, subject_key="k", generation=2)  # superseded on arrival
    assert claim(store).generation == 3


# --------------------------------------------------------------------------- finish


def test_finish_success_stores_the_result(store, rng):
    job = enqueue(store).job
    claim(store)
    done = store.finish(
        job.id, Outcome(result_summary={"lines": 3}, artifacts=["a.txt"]), now=NOW + 7, rng=rng
    )
    assert done.state is State.DONE and done.finished_at == NOW + 7
    assert done.result_summary == {"lines": 3} and done.artifacts == ["a.txt"]


def test_failed_attempts_retry_with_backoff_then_fail(store, rng):
    job = enqueue(store, max_attempts=2, backoff_base_ms=1000).job
    claim(store)
    retried = store.finish(job.id, fail(exit_code=2, error_kind="exit"), now=NOW, rng=rng)
    assert retried.state is State.QUEUED and retried.finished_at is None
    assert NOW + 750 <= retried.run_after <= NOW + 1250
    assert (retried.error_kind, retried.exit_code) == ("exit", 2)
    assert claim(store, now=retried.run_after - 1) is None
    assert claim(store, now=retried.run_after).attempt == 2
    final = store.finish(job.id, fail(), now=NOW + 2000, rng=rng)
    assert final.state is State.FAILED and final.attempt == 2


def test_permanent_error_fails_at_once(store, rng):
    job = enqueue(store, max_attempts=5).job
    claim(store)
    assert store.finish(job.id, fail(permanent=True), now=NOW, rng=rng).state is State.FAILED


def test_retry_after_sets_the_delay(store, rng):
    job = enqueue(store).job
    claim(store)
    assert store.finish(job.id, fail(retry_after_ms=5), now=NOW, rng=rng).run_after == NOW + 5


def test_failure_with_newer_generation_ends_superseded(store, rng):
    old = enqueue(store, subject_key="k").job
    claim(store)
    new = enqueue(store, subject_key="k").job
    ended = store.finish(old.id, fail(), now=NOW, rng=rng)
    assert ended.state is State.SUPERSEDED and "newer request" in ended.error_message
    assert claim(store).id == new.id


def test_finish_of_a_queued_job_is_illegal(store, rng):
    job = enqueue(store).job
    with pytest.raises(IllegalTransition):
        store.finish(job.id, Outcome(), now=NOW, rng=rng)


def test_finish_of_unknown_job_is_not_found(store, rng):
    with pytest.raises(NotFound, match="no job 'nope'"):
        store.finish("nope", Outcome(), now=NOW, rng=rng)


def test_record_runner_and_running_jobs(store):
    job = enqueue(store).job
    claim(store)
    store.record_runner(job.id, 4242, 1_764_600_000_123)
    [running] = store.running_jobs()
    recorded = (running.id, running.runner_pid, running.runner_start_time)
    assert recorded == (job.id, 4242, 1_764_600_000_123)
    queued = enqueue(store).job
    assert store.record_runner(queued.id, 1, 1_000) is False  # not running: nothing recorded
    assert store.get(queued.id).runner_pid is None


def test_progress_is_stored_while_running(store):
    job = enqueue(store).job
    claim(store)
    store.set_progress(job.id, 0.5, "half way")
    got = store.get(job.id)
    assert (got.progress, got.progress_message) == (0.5, "half way")
    with pytest.raises(ValidationError, match="progress"):
        store.set_progress(job.id, 1.5, None)


# --------------------------------------------------------------------------- cancel


def test_cancel_by_id(store):
    job = enqueue(store).job
    result = store.cancel(job_id=job.id, now=NOW)
    assert result.cancelled == [job.id] and result.was_running == []
    got = store.get(job.id)
    assert got.state is State.CANCELLED and got.error_kind == "cancelled"


def test_cancel_of_finished_job_is_illegal_and_changes_nothing(store):
    job = enqueue(store).job
    store.cancel(job_id=job.id, now=NOW)
    before = snapshot(store)
    with pytest.raises(IllegalTransition, match="CANCELLED is final"):
        store.cancel(job_id=job.id, now=NOW)
    assert snapshot(store) == before


def test_cancel_by_tag_reports_running_jobs(store):
    a = enqueue(store, user_tag="t", priority=1).job
    b = enqueue(store, user_tag="t").job
    untouched = enqueue(store, user_tag="u").job
    claim(store)
    result = store.cancel(tag="t", now=NOW)
    assert sorted(result.cancelled) == sorted([a.id, b.id])
    assert result.was_running == [a.id]
    assert store.get(untouched.id).state is State.QUEUED


def test_cancel_by_chain(store):
    ids = [enqueue(store, chain_group_id="c1").job.id for _ in range(3)]
    enqueue(store, chain_group_id="c2")
    assert sorted(store.cancel(chain="c1", now=NOW).cancelled) == sorted(ids)


def test_cancel_needs_exactly_one_selector(store):
    with pytest.raises(ValidationError, match="exactly one"):
        store.cancel(tag="a", chain="b", now=NOW)


def test_failure_cancels_dependents_transitively(store, rng):
    a = enqueue(store, max_attempts=1).job
    b = enqueue(store, depends_on=[a.id]).job
    c = enqueue(store, depends_on=[b.id]).job
    claim(store)
    store.finish(a.id, fail(), now=NOW, rng=rng)
    got_b, got_c = store.get(b.id), store.get(c.id)
    assert (got_b.state, got_b.error_kind) == (State.CANCELLED, "dependency_failed")
    assert a.id in got_b.error_message and "FAILED" in got_b.error_message
    assert (got_c.state, got_c.error_kind) == (State.CANCELLED, "dependency_failed")
    assert b.id in got_c.error_message


def test_cancel_reports_cancelled_dependents(store):
    a = enqueue(store).job
    b = enqueue(store, depends_on=[a.id]).job
    assert store.cancel(job_id=a.id, now=NOW).dependents_cancelled == [b.id]


def test_supersede_cancels_dependents_of_the_superseded_job(store):
    a = enqueue(store, subject_key="k").job
    b = enqueue(store, depends_on=[a.id]).job
    enqueue(store, subject_key="k")
    assert store.get(b.id).state is State.CANCELLED


# --------------------------------------------------------------------------- reads


def test_get_unknown_is_not_found(store):
    with pytest.raises(NotFound):
        store.get("missing")


def test_list_filters(store):
    enqueue(store, queue="a", user_tag="t1", subject_key="x")
    enqueue(store, queue="a", job_type="sleep", chain_group_id="c")
    enqueue(store, queue="b", user_tag="t1")

    def ids(**f):
        return len(store.list(JobFilter(**f))[0])

    assert ids() == 3
    assert ids(queue="a") == 2
    assert ids(job_type="sleep") == 1
    assert ids(tag="t1") == 2
    assert ids(chain="c") == 1
    assert ids(subject="x") == 1
    assert ids(state=State.QUEUED, queue="b") == 1
    assert ids(state=State.DONE) == 0


def test_list_pages_newest_first_with_a_cursor(store):
    made = [enqueue(store).job.id for _ in range(7)]
    seen, cursor = [], None
    while True:
        page, cursor = store.list(limit=3, cursor=cursor)
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert seen == made[::-1]


@pytest.mark.parametrize(("limit", "cursor"), [(0, None), (1001, None), (5, "abc")])
def test_list_rejects_bad_paging(store, limit, cursor):
    with pytest.raises(ValidationError):
        store.list(limit=limit, cursor=cursor)


def test_stats_counts_by_state_and_queue(store):
    enqueue(store, queue="a")
    enqueue(store, queue="b")
    claim(store)
    stats = store.stats()
    assert stats.by_state["QUEUED"] == 1 and stats.by_state["RUNNING"] == 1
    assert stats.running == 1
    assert sum(sum(q.values()) for q in stats.by_queue.values()) == 2
    assert stats.db_size_bytes > 0


def test_a_rolled_back_group_does_not_leave_its_queue_remembered(store):
    # The first request creates queue "fresh" and then fails, so its savepoint drops the row.
    with pytest.raises(ValidationError):
        enqueue(store, queue="fresh", depends_on=["missing"])
    assert enqueue(store, queue="fresh").job.queue == "fresh"


def test_job_ids_are_uuid7_ordered_by_time():
    import uuid

    from semantica.store import new_job_id

    ids = [new_job_id(1_700_000_000_000 + i) for i in range(50)]
    parsed = [uuid.UUID(i) for i in ids]
    assert all(u.version == 7 and u.variant == uuid.RFC_4122 for u in parsed)
    assert ids == sorted(ids) and len(set(ids)) == 50
    assert int(ids[0].replace("-", "")[:12], 16) == 1_700_000_000_000
    same_ms = {new_job_id(5) for _ in range(1000)}
    assert len(same_ms) == 1000


def test_a_forked_process_draws_other_job_ids_than_its_parent():
    from semantica.store import new_job_id

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its ids, through the pipe
        os.close(read_end)
        os.write(write_end, "\n".join(new_job_id(5) for _ in range(20)).encode())
        os._exit(0)
    os.close(write_end)
    parent_ids = {new_job_id(5) for _ in range(20)}
    with os.fdopen(read_end, "rb") as pipe:
        child_ids = set(pipe.read().decode().split("\n"))
    os.waitpid(pid, 0)
    assert len(child_ids) == 20 and not parent_ids & child_ids


def test_group_sync_defers_fsync_to_sync_wal(tmp_path):
    s = Store.open(tmp_path / "g.db", group_sync=True)
    try:
        assert s.needs_sync
        assert s.connection.execute("PRAGMA synchronous").fetchall()[0][0] == 1  # NORMAL
        before = s.commits
        enqueue(s)
        enqueue(s)
        assert s.commits == before + 2
        s.sync_wal()  # fsyncs the WAL that holds both commits
        assert s._wal_fd is not None
    finally:
        s.close()
    normal = Store.open(tmp_path / "n.db", synchronous="NORMAL", group_sync=True)
    assert not normal.needs_sync  # NORMAL promises no fsync per commit
    normal.close()


def test_store_calls_inside_one_transaction_count_as_one_commit(store):
    before = store.commits
    with store.transaction():
        enqueue(store)
        enqueue(store)  # each call's own transaction is a savepoint here
        assert store.commits == before
    assert store.commits == before + 1


def test_claim_does_not_change_the_durability_of_other_writes(store):
    enqueue(store)
    claim(store)
    assert store.connection.execute("PRAGMA synchronous").fetchall()[0][0] == 2  # FULL again


def test_checkpoints_can_move_out_of_commits(store):
    grown: list[int] = []
    store.checkpoint_elsewhere(grown.append, threshold_pages=5)
    for i in range(40):
        enqueue(store, subject_key=f"k{i}")
    assert grown and max(grown) >= 5  # SQLite's own checkpoint would have kept it small
    frames, copied = store.checkpoint("TRUNCATE")
    assert frames == 0 and copied == 0  # TRUNCATE empties the WAL after copying
    assert os.path.getsize(store.path + "-wal") == 0


def test_a_grown_wal_is_reported_again_only_after_it_grows_further(store):
    grown: list[int] = []
    store.checkpoint_elsewhere(grown.append, threshold_pages=30, limit_pages=10_000)
    for i in range(100):
        enqueue(store, subject_key=f"k{i}")
    # Not once per commit past the threshold: a background checkpoint that cannot keep
    # up would otherwise be asked for again after every commit.
    assert 3 <= len(grown) < 50
    assert all(b >= a + 30 for a, b in itertools.pairwise(grown))


def test_a_checkpointer_that_falls_behind_cannot_let_the_wal_grow_without_bound(store):
    store.checkpoint_elsewhere(lambda pages: None, threshold_pages=5, limit_pages=20)
    page = store.connection.execute("PRAGMA page_size").fetchall()[0][0]
    for i in range(300):  # several WAL pages each: 1,000+ frames without a checkpoint
        enqueue(store, subject_key=f"k{i}")
    # At 20 pages the committing thread checkpoints, so the next commit starts the WAL
    # over: the file never holds much more than the limit.
    frames = (os.path.getsize(store.path + "-wal") - 32) // (page + 24)
    assert frames < 40
    assert store.get(enqueue(store).job.id).state is State.QUEUED


def test_a_writer_checkpoint_that_cannot_finish_waits_for_more_growth(store):
    store.checkpoint_elsewhere(lambda pages: None, threshold_pages=30, limit_pages=60)
    attempts = []
    checkpoint = store._checkpoint_after_commit
    store._checkpoint_after_commit = lambda: (attempts.append(1), checkpoint())
    reader = apsw.Connection(store.path)  # holds a snapshot: no checkpoint can finish
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM jobs").fetchall()
    for i in range(200):  # about 1,000 WAL frames
        enqueue(store, subject_key=f"k{i}")
    assert 0 < len(attempts) < 60  # once per 30 pages of growth, not after every commit
    assert store.checkpoints_inline == 0  # none finished: none counted
    reader.execute("COMMIT")
    reader.close()
    for i in range(20):
        enqueue(store, subject_key=f"later{i}")
    assert store.checkpoints_inline >= 1


def test_a_failing_writer_checkpoint_never_fails_the_commit_before_it(store):
    store.checkpoint_elsewhere(lambda pages: None, threshold_pages=5, limit_pages=10)
    enqueue(store)
    enqueue(store)
    cursor = store.connection.cursor()  # a read left open: a checkpoint here fails
    cursor.execute("SELECT seq FROM jobs")
    next(cursor)
    stored = [enqueue(store, subject_key=f"k{i}").job.id for i in range(30)]
    cursor.close()
    assert [store.get(job_id).state for job_id in stored] == [State.QUEUED] * 30


def test_ttl_bounds_only_the_first_start_so_retries_do_not_expire(store, rng):
    job = enqueue(store, ttl_ms=1000).job
    claim(store, now=NOW + 10)
    retried = store.finish(job.id, fail(retry_after_ms=5000), now=NOW + 20, rng=rng)
    assert store.expire_overdue(now=retried.run_after) == []
    assert claim(store, now=retried.run_after).attempt == 2


def test_a_report_for_another_attempt_is_ignored(store, rng):
    job = enqueue(store).job
    claim(store)
    store.finish(job.id, fail(), now=NOW, rng=rng)
    claim(store, now=NOW + 10_000)
    stale = store.finish(job.id, Outcome(result_summary="old"), now=NOW, rng=rng, attempt=1)
    assert stale.state is State.RUNNING and stale.attempt == 2
    done = store.finish(job.id, Outcome(result_summary="new"), now=NOW, rng=rng, attempt=2)
    assert done.state is State.DONE and done.result_summary == "new"


# ------------------------------------------------------------- a batch is its jobs in order

_batch_request = st.builds(
    lambda key, gen, queue: EnqueueRequest(
        job_type="noop", queue=queue, subject_key=key, generation=gen if key else None
    ),
    key=st.sampled_from([None, "a", "b", "c"]),
    gen=st.one_of(st.none(), st.none(), st.integers(0, 6)),
    queue=st.sampled_from(["default", "other"]),
)


def _outcome_by_position(store: Store, results) -> list[tuple]:
    """Each job's stored state, generation and error, with job ids replaced by the
    position of that job in the request list (ids differ between two stores)."""
    position = {r.job.id: i for i, r in enumerate(results)}
    rows = []
    for r in results:
        job = store.get(r.job.id)
        message = job.error_message or ""
        for job_id, i in position.items():
            message = message.replace(job_id, f"#{i}")
        rows.append((job.state, job.generation, job.error_kind, message))
    return rows


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    first=st.lists(_batch_request, max_size=4),
    batch=st.lists(_batch_request, min_size=2, max_size=12),
)
def test_a_batch_stores_what_its_jobs_one_by_one_would(tmp_path_factory, first, batch):
    """enqueue_batch takes shortcuts for keys it names repeatedly; the outcome must be
    exactly that of enqueueing the same jobs one at a time, in order."""
    home = tmp_path_factory.mktemp("batch")
    one_by_one, batched = Store.open(home / "a.db"), Store.open(home / "b.db")
    try:
        for store in (one_by_one, batched):
            for req in first:
                store.enqueue(req, now=NOW)
        singles = [one_by_one.enqueue(req, now=NOW + 1) for req in batch]
        together = batched.enqueue_batch(batch, now=NOW + 1)
        assert _outcome_by_position(batched, together) == _outcome_by_position(one_by_one, singles)
        assert [
            (sorted(p(r.superseded_ids, together)), r.superseded_on_arrival) for r in together
        ] == [(sorted(p(r.superseded_ids, singles)), r.superseded_on_arrival) for r in singles]
        for table in ("subjects", "queues"):
            assert snapshot(batched)[table] == snapshot(one_by_one)[table]
    finally:
        one_by_one.close()
        batched.close()


def p(ids, results):
    """Ids as positions in this request list, or -1 for jobs enqueued before it."""
    position = {r.job.id: i for i, r in enumerate(results)}
    return [position.get(i, -1) for i in ids]


def test_a_job_stopped_by_shutdown_is_requeued_unless_a_newer_request_waits(store):
    """Draining puts running jobs back in line, but never ahead of, or beside, a newer
    request for the same subject (SPEC §3 rule 4; the schema allows one QUEUED per key)."""
    alone = enqueue(store, subject_key="alone").job
    older = enqueue(store, subject_key="k").job
    for _ in range(2):
        claim(store)
    newer = enqueue(store, subject_key="k").job  # waits while the older one runs
    dependent = enqueue(store, depends_on=[older.id]).job
    assert store.requeue(alone.id, now=NOW + 5, attempt=1).state is State.QUEUED
    ended = store.requeue(older.id, now=NOW + 5, attempt=1)
    assert ended.state is State.SUPERSEDED and "newer request" in ended.error_message
    assert store.get(newer.id).state is State.QUEUED
    assert store.get(dependent.id).state is State.CANCELLED


def test_the_job_type_filter_ignores_case_as_job_types_do(store):
    job = enqueue(store, job_type="noop").job
    jobs, _ = store.list(JobFilter(job_type="NOOP"))
    assert [j.id for j in jobs] == [job.id]


def test_every_filter_combination_lists_as_a_scan_would_newest_first(store, rng):
    """Whichever index serves a filter (a merge over queues and states, a label's
    index, or seq), the pages are what filtering every job would give, newest first."""
    pick = random.Random(3)
    for i in range(60):
        enqueue(
            store,
            queue=pick.choice(["a", "b", "c"]),
            job_type=pick.choice(["noop", "sleep"]),
            user_tag=pick.choice([None, "t"]),
            subject_key=pick.choice([None, None, f"k{i % 4}"]),
            now=NOW + i,
        )
    for _ in range(8):
        claim(store, now=NOW + 100)  # some run, and some of those end
    for job in store.list(JobFilter(state=State.RUNNING))[0][:4]:
        store.finish(job.id, Outcome(), now=NOW + 100, rng=rng)
    everything = store.list(limit=1000)[0]
    assert len({j.state for j in everything}) >= 4
    filters = {
        "state": [State.QUEUED, State.DONE, State.RUNNING],
        "queue": ["a", "c"],
        "job_type": ["sleep"],
        "tag": ["t"],
        "subject": ["k1"],
    }
    for combo in itertools.chain.from_iterable(
        itertools.combinations(filters, n) for n in range(1, 4)
    ):
        for values in itertools.product(*(filters[name] for name in combo)):
            given = dict(zip(combo, values, strict=True))
            expected = [
                j.id
                for j in everything
                if all(
                    getattr(j, {"tag": "user_tag", "subject": "subject_key"}.get(k, k)) == v
                    for k, v in given.items()
                )
            ]
            seen, cursor = [], None
            while True:
                page, cursor = store.list(JobFilter(**given), limit=4, cursor=cursor)
                seen += [j.id for j in page]
                if cursor is None:
                    break
            assert seen == expected, given


def test_listing_by_state_merges_the_queues_newest_first_and_pages(store):
    jobs = []
    for i in range(12):
        queue = ("a", "b", "c")[i % 3] if i % 4 else "b"
        jobs.append(enqueue(store, queue=queue, now=NOW + i, job_type="noop").job)
    for job in jobs[::5]:  # some leave QUEUED
        store.cancel(job_id=job.id, now=NOW + 20)
    expected = [j.id for j in reversed(jobs) if store.get(j.id).state is State.QUEUED]
    seen, cursor = [], None
    while True:
        page, cursor = store.list(JobFilter(state=State.QUEUED), limit=2, cursor=cursor)
        assert len(page) <= 2
        seen += [j.id for j in page]
        if cursor is None:
            break
    assert seen == expected
    plan = store.connection.execute(
        "EXPLAIN QUERY PLAN SELECT seq FROM jobs INDEXED BY jobs_queue_state "
        "WHERE queue = ? AND state = ? ORDER BY seq DESC LIMIT ?",
        ("a", "QUEUED", 3),
    ).fetchall()
    assert not any("TEMP B-TREE" in row[-1] for row in plan), plan


def test_jobs_ahead_counts_the_ready_ones_before_it_in_unpaused_queues(store):
    """The waiting reason's "N job(s) ahead": ready QUEUED jobs that the claim order
    puts first (higher priority, or the same and older) in queues not paused,
    counted from two index ranges per queue, never from a scan of all jobs."""
    rng = random.Random(7)
    for i in range(300):
        enqueue(
            store,
            queue=rng.choice(["a", "b", "held"]),
            priority=rng.choice([-1, 0, 0, 5]),
            schedule_at=rng.choice([None, None, None, NOW + 1_000]),
            now=NOW + i,
        )
    store.set_queue_paused("held", True, now=NOW + 400)
    queued, _ = store.list(JobFilter(state=State.QUEUED), limit=500)
    seq = dict(store.connection.execute("SELECT id, seq FROM jobs"))

    def ahead_by_model(job):
        return sum(
            1
            for other in queued
            if other.queue != "held"
            and other.run_after <= NOW + 500
            and (
                other.priority > job.priority
                or (other.priority == job.priority and seq[other.id] < seq[job.id])
            )
        )

    for job in rng.sample(queued, 40):
        facts = store.wait_facts(job, now=NOW + 500, global_limit=0)
        assert facts.ahead == ahead_by_model(job), job
    plan = str(
        store.connection.execute(
            "EXPLAIN QUERY PLAN " + store_module.SQL_WAIT_AHEAD,
            {"now": NOW, "priority": 0, "seq": 1, "cap": 1000},
        ).fetchall()
    )
    assert plan.count("SEARCH j USING INDEX jobs_queue_claim_order (queue=? AND priority") == 2
    assert "SCAN j" not in plan, plan


def test_a_batch_supersedes_in_request_order_when_dependents_cascade(store):
    """Superseding a job cancels its dependents; a batch must do it in the order its
    requests come, as one-by-one enqueues would: here the batch's first request
    supersedes Y before the repeated key K1 supersedes X (whose dependent Y is)."""
    x = enqueue(store, subject_key="K1").job
    y = enqueue(store, subject_key="K2", depends_on=[x.id]).job
    batch = [EnqueueRequest(job_type="noop", subject_key=k) for k in ("K2", "K1", "K1")]
    results = store.enqueue_batch(batch, now=NOW + 1)
    assert results[0].superseded_ids == [y.id]
    assert store.get(y.id).state is State.SUPERSEDED  # not CANCELLED by the cascade
    assert store.get(x.id).state is State.SUPERSEDED
    assert [r.job.state for r in results] == [State.QUEUED, State.SUPERSEDED, State.QUEUED]


def test_a_warm_claim_records_the_reserved_worker_with_the_job(store):
    warm = enqueue(store, execution_mode="WARM")
    fresh = enqueue(store, now=NOW + 1)
    # A WARM job counts as RUNNING only with its process: the reserved worker's.
    claimed = store.claim_next_job(
        now=NOW + 2, global_limit=10, conditions=ALL_MET, warm_runner=(4242, 1_764_600_000_456)
    )
    assert claimed.id == warm.job.id
    assert (claimed.runner_pid, claimed.runner_start_time) == (4242, 1_764_600_000_456)
    # Any other job gets its process recorded once it exists, not the worker's.
    other = store.claim_next_job(
        now=NOW + 3, global_limit=10, conditions=ALL_MET, warm_runner=(4242, 1_764_600_000_456)
    )
    assert other.id == fresh.job.id and other.runner_pid is None


def test_a_claim_records_the_runner_made_ready_for_the_claimed_jobs_mode(store):
    warm = enqueue(store, execution_mode="WARM")
    fresh = enqueue(store, now=NOW + 1, execution_mode="SUBPROCESS")
    runners = {"warm_runner": (4242, 1_764_600_000_456), "fresh_runner": (4343, 1_764_600_000_789)}
    first = store.claim_next_job(now=NOW + 2, global_limit=10, conditions=ALL_MET, **runners)
    second = store.claim_next_job(now=NOW + 3, global_limit=10, conditions=ALL_MET, **runners)
    assert (first.id, first.runner_pid, first.runner_start_time) == (
        warm.job.id,
        4242,
        1_764_600_000_456,
    )
    assert (second.id, second.runner_pid, second.runner_start_time) == (
        fresh.job.id,
        4343,
        1_764_600_000_789,
    )
    assert store.get(fresh.job.id).runner_pid == 4343


def test_a_finish_frees_its_slot_for_a_claim_in_the_same_transaction(store):
    first = enqueue(store)
    second = enqueue(store, now=NOW + 1)
    job = claim(store, limit=1)
    with store.transaction():
        done = store.finish(
            job.id, Outcome(), now=NOW + 5, rng=random.Random(0), attempt=job.attempt
        )
        successor = claim(store, now=NOW + 5, limit=1)
    assert (done.id, done.state) == (first.job.id, State.DONE)
    assert successor.id == second.job.id
    assert store.get(second.job.id).state is State.RUNNING


def test_a_failing_transaction_keeps_neither_the_finish_nor_the_claim(store):
    enqueue(store)
    second = enqueue(store, now=NOW + 1)
    job = claim(store, limit=1)

    def look_failing_half_way() -> None:
        with store.transaction():
            store.finish(job.id, Outcome(), now=NOW + 5, rng=random.Random(0), attempt=job.attempt)
            claim(store, now=NOW + 5, limit=1)
            raise RuntimeError("the look failed half-way")

    with pytest.raises(RuntimeError):
        look_failing_half_way()
    assert store.get(job.id).state is State.RUNNING
    assert store.get(second.job.id).state is State.QUEUED


def test_finishing_from_the_claimed_job_leaves_a_job_cancelled_meanwhile_alone(store):
    enqueue(store)
    job = claim(store)
    store.cancel(job_id=job.id, now=NOW + 1)
    # The dispatcher's copy still says RUNNING: the UPDATE finds the job moved on.
    ended, changed = store.record_end(
        job.id, Outcome(), now=NOW + 2, rng=random.Random(0), claimed=job
    )
    assert ended.state is State.CANCELLED and ended.finished_at == NOW + 1 and not changed
    assert store.get(job.id).state is State.CANCELLED


def test_finishing_from_the_claimed_job_records_the_outcome(store):
    enqueue(store, max_attempts=2)
    job = claim(store)
    ended, changed = store.record_end(
        job.id, fail(), now=NOW + 2, rng=random.Random(0), claimed=job
    )
    assert ended.state is State.QUEUED and ended.attempt == 1 and ended.error_kind == "exception"
    assert changed


def test_the_end_of_a_job_deleted_while_it_ran_is_not_found(store):
    enqueue(store)
    job = claim(store)
    store.cancel(job_id=job.id, now=NOW + 1)
    store.delete_jobs([job.id])  # maintenance, with a retention of 0 days
    with pytest.raises(NotFound):
        store.record_end(job.id, Outcome(), now=NOW + 2, rng=random.Random(0), claimed=job)


def test_dependents_are_told_once_committed_and_not_when_rolled_back(store):
    from semantica.store import EnqueueGroup

    told: list[list[str]] = []
    store.on_dependents_cancelled(told.append)
    store.set_queue_paused("held", True, now=NOW)
    a = store.enqueue(EnqueueRequest(job_type="noop", subject_key="k", queue="held"), now=NOW)
    b = store.enqueue(EnqueueRequest(job_type="noop", depends_on=[a.job.id], queue="held"), now=NOW)
    # A group commit whose second group supersedes `a` and then fails: rolled back,
    # `b` stays QUEUED, and nothing is told of it.
    out = store.enqueue_groups(
        [
            EnqueueGroup([EnqueueRequest(job_type="noop", queue="held")], batch=False),
            EnqueueGroup(
                [
                    EnqueueRequest(job_type="noop", subject_key="k", queue="held"),
                    EnqueueRequest(job_type="noop", depends_on=["nope"]),
                ],
                batch=True,
            ),
        ],
        now=NOW,
    )
    assert isinstance(out[1], ValidationError)
    assert store.get(b.job.id).state is State.QUEUED and told == []
    # A cancel that commits: told once, after the commit.
    store.cancel(job_id=a.job.id, now=NOW)
    assert told == [[b.job.id]] and store.get(b.job.id).state is State.CANCELLED
    # A claimed job that the last-resort path marks FAILED dooms its dependents too.
    c = store.enqueue(EnqueueRequest(job_type="noop", queue="run"), now=NOW)
    store.set_queue_paused("later", True, now=NOW)
    d = store.enqueue(
        EnqueueRequest(job_type="noop", depends_on=[c.job.id], queue="later"), now=NOW
    )
    assert claim(store).id == c.job.id
    assert store.fail_running(c.job.id, "could not record", now=NOW + 1)
    assert store.get(d.job.id).error_kind == "dependency_failed"
    assert told[-1] == [d.job.id]


def test_a_batch_reply_shows_a_job_the_batch_doomed_as_cancelled(store):
    store.set_queue_paused("held", True, now=NOW)
    old = store.enqueue(EnqueueRequest(job_type="noop", subject_key="kk", queue="held"), now=NOW)
    doomed, newer = store.enqueue_batch(
        [
            EnqueueRequest(job_type="noop", queue="held", depends_on=[old.job.id]),
            EnqueueRequest(job_type="noop", subject_key="kk", queue="held"),
        ],
        now=NOW + 1,
    )
    assert store.get(old.job.id).state is State.SUPERSEDED
    assert doomed.job.state is State.CANCELLED and doomed.job.error_kind == "dependency_failed"
    assert doomed.job == store.get(doomed.job.id)
    assert newer.job.state is State.QUEUED
