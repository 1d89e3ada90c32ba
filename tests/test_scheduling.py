"""Scheduling end to end: order, limits, time, conditions, dependencies and the
waiting reason, observed on a real daemon with real runner processes.

The CPU-idle and AC-power sensors are the one thing replaced: the daemon reads them
from `SEMANTICA_CONDITIONS_FILE`, which the tests rewrite while jobs wait.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from harness import remove_home, start_daemon

import semantica
from semantica.domain import State

WORKERS = 3


@pytest.fixture(scope="module")
def daemon():
    d = start_daemon(
        SEMANTICA_WORKERS=str(WORKERS),
        SEMANTICA_CONDITIONS_FILE="/nonexistent-until-a-test-writes-it",
    )
    yield d
    d.stop()
    remove_home(d.home)


@pytest.fixture
def client(daemon):
    with daemon.client() as c:
        yield c


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def wait_state(client, job_id: str, *states: State, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if job.state in states:
            return job
        time.sleep(0.02)
    pytest.fail(f"job {job_id} is {client.get(job_id).state}, not {states}")


def overlap(jobs) -> int:
    """The most jobs that ran at the same moment, from recorded start/finish times."""
    edges = sorted([(j.started_at, 1) for j in jobs] + [(j.finished_at, -1) for j in jobs])
    most = running = 0
    for _, step in edges:
        running += step
        most = max(most, running)
    return most


def test_priority_then_fifo_order_end_to_end(client):
    client.pause("order")
    client.configure_queue("order", concurrency=1)
    ids = {}
    for name, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1)]:
        ids[name] = client.enqueue(job_type="noop", queue="order", priority=priority).id
    client.resume("order")
    done = {name: client.wait(job_id, timeout_ms=20_000) for name, job_id in ids.items()}
    started = sorted(done, key=lambda name: done[name].started_at)
    assert started == ["b", "d", "a", "c", "e"]


def test_queue_and_global_limits_are_never_exceeded(client):
    client.configure_queue("narrow", concurrency=2)
    narrow = [
        client.enqueue(job_type="sleep", queue="narrow", payload={"seconds": 0.15})
        for _ in range(6)
    ]
    wide = [
        client.enqueue(job_type="sleep", queue="wide", payload={"seconds": 0.15}) for _ in range(6)
    ]
    narrow = [client.wait(j.id, timeout_ms=30_000) for j in narrow]
    wide = [client.wait(j.id, timeout_ms=30_000) for j in wide]
    assert all(j.state is State.DONE for j in narrow + wide)
    assert overlap(narrow) <= 2
    assert overlap(narrow + wide) <= WORKERS


def test_pause_holds_and_resume_releases(client):
    client.pause("held")
    job = client.enqueue(job_type="noop", queue="held")
    time.sleep(0.3)
    held = client.get(job.id)
    assert held.state is State.QUEUED and "paused" in held.waiting_reason
    assert "semantica-cli resume held" in held.waiting_reason
    client.resume("held")
    assert client.wait(job.id, timeout_ms=10_000).state is State.DONE


def test_schedule_at_and_ttl_are_kept_to_within_50_ms(client):
    at = now_ms() + 500
    scheduled = client.enqueue(job_type="noop", schedule_at=at, queue="timely")
    assert "scheduled" in client.get(scheduled.id).waiting_reason
    client.pause("expiring")
    doomed = client.enqueue(job_type="noop", queue="expiring", ttl_ms=400)
    ran = client.wait(scheduled.id, timeout_ms=10_000)
    assert at <= ran.started_at <= at + 50, ran.started_at - at
    expired = client.wait(doomed.id, timeout_ms=10_000)
    assert expired.state is State.EXPIRED
    assert doomed.created_at + 400 <= expired.finished_at <= doomed.created_at + 450


def test_waiting_reasons_for_a_busy_queue_a_running_subject_and_a_dependency(client):
    client.configure_queue("busy", concurrency=1)
    first = client.enqueue(job_type="sleep", queue="busy", payload={"seconds": 1.5})
    wait_state(client, first.id, State.RUNNING)
    second = client.enqueue(job_type="noop", queue="busy")
    assert client.get(second.id).waiting_reason == "queue 'busy' is full: 1 of 1 running"

    old = client.enqueue(
        job_type="sleep", queue="subjects", subject_key="k", payload={"seconds": 1.5}
    )
    wait_state(client, old.id, State.RUNNING)
    new = client.enqueue(job_type="sleep", queue="subjects", subject_key="k", payload={})
    reason = client.get(new.id).waiting_reason
    assert "older generation of subject 'k' is still running" in reason and old.id in reason

    dependent = client.enqueue(job_type="noop", queue="deps", depends_on=[first.id])
    reason = client.get(dependent.id).waiting_reason
    assert reason == f"waiting for dependency {first.id} (RUNNING)"
    assert client.wait(dependent.id, timeout_ms=20_000).state is State.DONE
    assert client.wait(second.id, timeout_ms=20_000).state is State.DONE
    assert client.wait(new.id, timeout_ms=20_000).state is State.DONE
    assert client.get(dependent.id).started_at >= client.get(first.id).finished_at


def test_waiting_reason_during_retry_backoff(client):
    job = client.enqueue(
        job_type="fail", payload={"mode": "exception"}, max_attempts=2, backoff_base_ms=5000
    )
    deadline = time.monotonic() + 10
    while (current := client.get(job.id)).attempt < 1 or current.state is not State.QUEUED:
        assert time.monotonic() < deadline, current
        time.sleep(0.02)
    assert current.waiting_reason.startswith("retry backoff: attempt 2 starts in")
    client.cancel(job.id)


def test_a_three_level_chain_fails_transitively_and_cycles_cannot_be_named(client):
    client.pause("chain")
    root = client.enqueue(job_type="fail", queue="chain", payload={"mode": "permanent"})
    middle = client.enqueue(job_type="noop", queue="chain", depends_on=[root.id])
    leaf = client.enqueue(job_type="noop", queue="chain", depends_on=[middle.id])
    client.resume("chain")
    assert client.wait(root.id, timeout_ms=10_000).state is State.FAILED
    for job, cause in ((middle, root), (leaf, middle)):
        ended = client.wait(job.id, timeout_ms=10_000)
        assert ended.state is State.CANCELLED and ended.error_kind == "dependency_failed"
        assert cause.id in ended.error_message
    # A job can only depend on jobs that exist already, so a cycle cannot be written;
    # an unknown id (the way a cycle would have to start) is refused.
    with pytest.raises(semantica.ValidationFailed, match="depends_on"):
        client.enqueue(job_type="noop", depends_on=["01a00000-0000-7000-8000-000000000000"])


def write_conditions(path: Path, **conditions: bool) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(conditions))
    tmp.replace(path)


def test_cpu_idle_and_ac_power_gates_open_when_the_conditions_change(daemon):
    # A daemon of its own: its conditions file is the one this test rewrites.
    conditions = daemon.home.parent / "conditions.json"
    write_conditions(conditions, cpu_idle=False, on_ac_power=False)
    gated = start_daemon(SEMANTICA_WORKERS="2", SEMANTICA_CONDITIONS_FILE=str(conditions))
    try:
        with gated.client() as c:
            idle = c.enqueue(job_type="noop", wait_for_idle=True)
            power = c.enqueue(job_type="noop", require_charging=True)
            free = c.enqueue(job_type="noop")
            assert c.wait(free.id, timeout_ms=10_000).state is State.DONE
            time.sleep(0.5)
            assert c.get(idle.id).waiting_reason == "waiting for the CPU to be idle (wait_for_idle)"
            assert "AC power" in c.get(power.id).waiting_reason
            write_conditions(conditions, cpu_idle=True, on_ac_power=False)
            assert c.wait(idle.id, timeout_ms=5_000).state is State.DONE
            assert c.get(power.id).state is State.QUEUED
            write_conditions(conditions, cpu_idle=True, on_ac_power=True)
            assert c.wait(power.id, timeout_ms=5_000).state is State.DONE
    finally:
        gated.stop()
        remove_home(gated.home)


def test_waiting_reason_when_every_worker_is_busy(client):
    busy = [
        client.enqueue(job_type="sleep", queue="fill", payload={"seconds": 1.5})
        for _ in range(WORKERS)
    ]
    for job in busy:
        wait_state(client, job.id, State.RUNNING)
    waiting = client.enqueue(job_type="noop", queue="elsewhere")
    assert client.get(waiting.id).waiting_reason == f"all {WORKERS} workers are busy"
    assert client.wait(waiting.id, timeout_ms=20_000).state is State.DONE
