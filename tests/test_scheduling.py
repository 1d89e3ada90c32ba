"""Scheduling end to end: order, limits, time, conditions, dependencies and the
waiting reason, observed on a real daemon with real runner processes.

The CPU-idle and AC-power sensors are the one thing replaced: the daemon reads them
from `SEMANTICA_CONDITIONS_FILE`, which the tests rewrite while jobs wait.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
import time
import uuid
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import msgspec
import psutil
import pytest
import trio
from harness import make_home, remove_home, start_daemon

import semantica
from semantica import config, protocol
from semantica.domain import EnqueueRequest, Outcome, State
from semantica.probe import CPU_IDLE_BELOW_PERCENT, FRESH_FOR_S, SAMPLE_EVERY_S, SystemProbe
from semantica.scheduler import ALL_CONDITIONS, Dispatcher
from semantica.store import Conditions, JobFilter, StorageUnavailable, Store

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


@pytest.mark.parametrize("mode", ["SUBPROCESS", "WARM"])
def test_a_new_daemons_first_scheduled_job_starts_on_time(mode):
    """No process of the job's kind exists yet (the zygote, a WARM worker: 100-300 ms
    to start): it is got ready ahead of the job's time, not when the job is due."""
    d = start_daemon()
    try:
        with d.client() as c:
            at = now_ms() + 2_000  # its process is got ready from 1 s before
            job = c.enqueue(job_type="noop", execution_mode=mode, schedule_at=at)
            time.sleep(0.3)
            assert "scheduled" in c.get(job.id).waiting_reason  # nothing is started yet
            events = [json.loads(line)["event"] for line in d.log().splitlines()]
            assert "zygote_started" not in events and "warm_worker_started" not in events
            ran = c.wait(job.id, timeout_ms=10_000)
        assert ran.state is State.DONE
        started = {"SUBPROCESS": "zygote_started", "WARM": "warm_worker_started"}[mode]
        [ready] = [e for e in map(json.loads, d.log().splitlines()) if e["event"] == started]
        ready_ms = datetime.fromisoformat(ready["ts"].replace("Z", "+00:00")).timestamp() * 1000
        assert ready_ms < at, f"its process was ready {ready_ms - at:.0f} ms after its time"
        assert at <= ran.started_at <= at + 50, ran.started_at - at
    finally:
        d.stop()
        remove_home(d.home)


def test_a_ttl_that_passed_before_the_enqueue_was_answered_still_expires(client):
    """The expiry time was dropped when it had passed by the time the dispatcher
    heard of the job (ttl_ms=1: the enqueue's own commit takes longer), and nothing
    expired the job after: QUEUED for good, 'ready: starting now' (an audit found it)."""
    client.pause("tiny-ttl")
    # A batch: its commit takes longer than 1 ms, so the expiry has passed by then.
    batch = [{"job_type": "noop", "queue": "tiny-ttl", "ttl_ms": 1} for _ in range(300)]
    last = client.enqueue_batch(batch).jobs[-1]
    ended = client.wait(last.id, timeout_ms=2_000)
    assert ended.state is State.EXPIRED, ended.waiting_reason
    assert client.stats().jobs_by_queue["tiny-ttl"].get("QUEUED", 0) == 0


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


def test_a_dependent_cancelled_by_a_failure_wakes_its_waiter_and_is_logged(daemon, client):
    client.pause("dep-wake")
    root = client.enqueue(job_type="fail", queue="dep-wake", payload={"mode": "permanent"})
    leaf = client.enqueue(job_type="noop", queue="dep-wake", depends_on=[root.id])
    client.resume("dep-wake")
    began = time.monotonic()
    ended = client.wait(leaf.id, timeout_ms=30_000)  # woken by the cancel, not the timeout
    assert ended.state is State.CANCELLED and ended.error_kind == "dependency_failed"
    assert time.monotonic() - began < 15
    changes = [
        json.loads(line) for line in daemon.log().splitlines() if "job_state_changed" in line
    ]
    logged = [(e["state"], e.get("error_kind")) for e in changes if e["job_id"] == leaf.id]
    assert logged == [("CANCELLED", "dependency_failed")]
    order = [e["job_id"] for e in changes if e["job_id"] in (root.id, leaf.id)]
    assert order[-2:] == [root.id, leaf.id]  # the cause's end first, then what it doomed
    # A user's cancel: the cancelled job is logged before its dependent.
    client.pause("dep-wake")
    cause = client.enqueue(job_type="noop", queue="dep-wake")
    doomed = client.enqueue(job_type="noop", queue="dep-wake", depends_on=[cause.id])
    assert client.cancel(cause.id).dependents_cancelled == [doomed.id]
    lines = daemon.log().splitlines()
    at = {
        job_id: max(i for i, line in enumerate(lines) if job_id in line and "CANCELLED" in line)
        for job_id in (cause.id, doomed.id)
    }
    assert at[cause.id] < at[doomed.id]
    client.resume("dep-wake")


def test_a_retry_waits_for_the_same_dependencies(client):
    # A job cancelled because its dependency failed is not retried without it: the
    # retry is refused, saying what to do; nothing is enqueued.
    client.pause("retry-deps")
    root = client.enqueue(job_type="fail", queue="retry-deps", payload={"mode": "permanent"})
    leaf = client.enqueue(job_type="noop", queue="retry-deps", depends_on=[root.id])
    client.resume("retry-deps")
    assert client.wait(leaf.id, timeout_ms=10_000).error_kind == "dependency_failed"
    before = client.stats().jobs_by_state
    with pytest.raises(semantica.ValidationFailed) as info:
        client.retry(leaf.id)
    assert f"job {root.id} already ended FAILED" in str(info.value)
    assert f"cannot retry job {leaf.id}: job {root.id} already ended FAILED" in str(info.value)
    assert "Retry that job first" in str(info.value)
    assert info.value.data["field"] == "depends_on"
    assert client.stats().jobs_by_state == before
    # With a dependency that is DONE, the retry keeps it and runs.
    client.pause("retry-deps")
    done = client.enqueue(job_type="noop", queue="retry-deps")
    gate = client.enqueue(job_type="sleep", queue="retry-deps", payload={"seconds": 30})
    waits = client.enqueue(job_type="noop", queue="retry-deps", depends_on=[done.id, gate.id])
    client.resume("retry-deps")
    assert client.wait(done.id, timeout_ms=10_000).state is State.DONE
    client.cancel(waits.id)
    again = client.retry(waits.id)
    assert again.depends_on == [done.id, gate.id]
    assert client.get(again.id).waiting_reason.startswith(f"waiting for dependency {gate.id}")
    client.cancel(gate.id)
    assert client.wait(again.id, timeout_ms=10_000).error_kind == "dependency_failed"


def write_conditions(path: Path, **conditions: bool) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(conditions))
    tmp.replace(path)


def test_an_idle_gated_job_held_for_the_next_reading_says_so(daemon):
    """One idle-gated job is admitted per reading; the next one said 'ready: starting
    now' for the second it waited (an audit found it)."""
    conditions = daemon.home.parent / "conditions-held.json"
    write_conditions(conditions, cpu_idle=True, on_ac_power=True)
    gated = start_daemon(SEMANTICA_WORKERS="2", SEMANTICA_CONDITIONS_FILE=str(conditions))
    try:
        with gated.client() as c:
            first = c.enqueue(job_type="sleep", payload={"seconds": 3}, wait_for_idle=True)
            while c.get(first.id).state is not State.RUNNING:
                time.sleep(0.01)
            second = c.enqueue(job_type="noop", wait_for_idle=True)
            held = c.get(second.id)
            if held.state is State.QUEUED:  # else the next reading came already
                assert held.waiting_reason == "waiting for the CPU to be idle (wait_for_idle)"
            assert c.wait(second.id, timeout_ms=5_000).state is State.DONE
            c.cancel(first.id)
    finally:
        gated.stop()
        remove_home(gated.home)


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
            assert (
                c.get(power.id).waiting_reason
                == "waiting for AC power: on battery (require_charging)"
            )
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


# --------------------------------------------------------------------------- dependencies


def test_a_dependent_of_an_expired_a_cancelled_or_a_superseded_job_is_cancelled(client):
    client.pause("dep-held")
    expiring = client.enqueue(job_type="noop", queue="dep-held", ttl_ms=100)
    cancelled = client.enqueue(job_type="noop", queue="dep-held")
    older = client.enqueue(job_type="noop", queue="dep-held", subject_key="dep-subject")
    dependents = {
        cause.id: client.enqueue(job_type="noop", queue="dep-free", depends_on=[cause.id])
        for cause in (expiring, cancelled, older)
    }
    assert client.cancel(cancelled.id).dependents_cancelled == [dependents[cancelled.id].id]
    newer = client.enqueue(job_type="noop", queue="dep-held", subject_key="dep-subject")
    assert client.get(older.id).state is State.SUPERSEDED
    assert client.wait(expiring.id, timeout_ms=5_000).state is State.EXPIRED
    for cause, ended_as in ((expiring, "EXPIRED"), (cancelled, "CANCELLED"), (older, "SUPERSEDED")):
        dependent = client.wait(dependents[cause.id].id, timeout_ms=5_000)
        assert dependent.state is State.CANCELLED, (ended_as, dependent)
        assert dependent.error_kind == "dependency_failed"
        assert dependent.error_message == (
            f"dependency {cause.id} ended {ended_as}, so this job cannot run"
        )
        assert dependent.started_at is None
    client.cancel(newer.id)


def runner_gone(pid: int, start_time_ms: int | None) -> bool:
    """The runner process no longer exists (or only as an unreaped zombie, or its pid
    now belongs to a newer process)."""
    try:
        proc = psutil.Process(pid)
        if start_time_ms and proc.create_time() * 1000 > start_time_ms + 10:
            return True
        return proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_cancel_by_chain_cancels_every_unfinished_member_and_stops_the_running_one(client):
    chain = f"chain-{uuid.uuid4()}"
    done = client.enqueue(job_type="noop", queue="chain-run", chain_group_id=chain)
    assert client.wait(done.id, timeout_ms=10_000).state is State.DONE
    running = client.enqueue(
        job_type="sleep", queue="chain-run", chain_group_id=chain, payload={"seconds": 30}
    )
    running = wait_state(client, running.id, State.RUNNING)
    deadline = time.monotonic() + 5
    while running.runner_pid is None:
        assert time.monotonic() < deadline, running
        time.sleep(0.01)
        running = client.get(running.id)
    assert not runner_gone(running.runner_pid, running.runner_start_time)
    client.pause("chain-held")
    queued = client.enqueue(job_type="noop", queue="chain-held", chain_group_id=chain)
    later = client.enqueue(job_type="noop", chain_group_id=chain, schedule_at=now_ms() + 60_000)
    waiting = client.enqueue(job_type="noop", chain_group_id=chain, depends_on=[running.id])
    outsider = client.enqueue(job_type="noop", queue="chain-held")

    result = client.cancel(chain=chain)
    members = {running.id, queued.id, later.id, waiting.id}
    assert set(result.cancelled) | set(result.dependents_cancelled) == members
    deadline = time.monotonic() + 5
    while not runner_gone(running.runner_pid, running.runner_start_time):
        assert time.monotonic() < deadline, f"runner {running.runner_pid} still runs"
        time.sleep(0.01)
    time.sleep(0.05)  # the runner's end is recorded: it must not undo the cancel
    for job_id in members:
        assert client.get(job_id).state is State.CANCELLED, job_id
    assert client.get(done.id).state is State.DONE
    assert client.get(outsider.id).state is State.QUEUED
    listed = {j.id: j.state for j in client.list(chain=chain).jobs}
    assert listed == {done.id: State.DONE, **dict.fromkeys(members, State.CANCELLED)}
    client.cancel(outsider.id)


# --------------------------------------------------------------------------- parent filter


def test_the_store_lists_the_children_of_a_parent(tmp_path):
    store = Store.open(tmp_path / "meta.db")
    try:
        parent = store.enqueue(EnqueueRequest(job_type="noop"), now=1).job
        kids = [
            store.enqueue(
                EnqueueRequest(job_type="noop", queue=queue, parent_job_id=parent.id), now=2 + i
            ).job
            for i, queue in enumerate(["a", "b", "a"])
        ]
        store.enqueue(EnqueueRequest(job_type="noop", parent_job_id="someone-else"), now=9)

        def ids(**filters):
            return [j.id for j in store.list(JobFilter(**filters))[0]]

        assert ids(parent=parent.id) == [k.id for k in reversed(kids)]  # newest first
        assert ids(parent=parent.id, queue="a") == [kids[2].id, kids[0].id]
        assert ids(parent=parent.id, queue="b", state=State.DONE) == []
        assert ids(parent="nobody") == []
        assert len(ids()) == 5
        first, cursor = store.list(JobFilter(parent=parent.id), limit=2)
        rest, end = store.list(JobFilter(parent=parent.id), limit=2, cursor=cursor)
        assert [j.id for j in first + rest] == [k.id for k in reversed(kids)] and end is None
        plan = store.connection.execute(
            "EXPLAIN QUERY PLAN SELECT * FROM jobs WHERE parent_job_id = ? ORDER BY seq DESC",
            ("x",),
        ).fetchall()
        assert "jobs_parent" in str(plan)
    finally:
        store.close()
    params = msgspec.json.decode(b'{"parent": "p-1", "limit": 5}', type=protocol.ListParams)
    assert params.parent == "p-1" and params.limit == 5


def test_cli_list_parent_shows_only_that_jobs_children(daemon, client):
    client.pause("family")
    parent = client.enqueue(job_type="noop", queue="family")
    kids = [
        client.enqueue(job_type="noop", queue="family", parent_job_id=parent.id) for _ in range(2)
    ]
    client.enqueue(job_type="noop", queue="family", parent_job_id="someone-else")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMANTICA_")}
    env["SEMANTICA_HOME"] = str(daemon.home)
    done = subprocess.run(
        [str(Path(sys.executable).with_name("semantica-cli")), "list", "--parent", parent.id,
         "--json"],
        capture_output=True, text=True, env=env, timeout=30,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    page = json.loads(done.stdout)
    assert [j["id"] for j in page["jobs"]] == [kids[1].id, kids[0].id]
    assert all(j["parent_job_id"] == parent.id for j in page["jobs"])
    client.cancel(parent.id)
    for job in kids:
        client.cancel(job.id)


# --------------------------------------------------------------------------- queues


def test_a_queues_concurrency_persists_across_a_restart():
    home = make_home()
    try:
        first = start_daemon(home, SEMANTICA_WORKERS="3")
        try:
            with first.client() as c:
                c.configure_queue("persisted", concurrency=1)
                c.configure_queue("unlimited", concurrency=2)
                c.configure_queue("unlimited", concurrency=None)
        finally:
            first.stop()
        second = start_daemon(home, SEMANTICA_WORKERS="3")
        try:
            with second.client() as c:
                queues = {q.name: q for q in c.queues().queues}
                assert queues["persisted"].concurrency == 1 and not queues["persisted"].paused
                assert queues["unlimited"].concurrency is None
                jobs = [
                    c.enqueue(job_type="sleep", queue="persisted", payload={"seconds": 0.1})
                    for _ in range(3)
                ]
                ended = [c.wait(j.id, timeout_ms=10_000) for j in jobs]
                assert all(j.state is State.DONE for j in ended)
                assert overlap(ended) == 1  # the limit is kept, not only shown
        finally:
            second.stop()
    finally:
        remove_home(home)


# --------------------------------------------------------------------------- the probe


class FakeSensors:
    """psutil's cpu_percent(interval=None) and sensors_battery(), on a clock the test
    moves: the CPU figure is the mean load since the previous call, like psutil's."""

    def __init__(self, clock, load: float = 0.0, battery=None) -> None:
        self.clock = clock
        self.battery = battery
        self._changes = [(clock(), load)]
        self._last_call = clock()
        self.reads: list[float] = []  # when cpu_percent was called

    def set_load(self, load: float) -> None:
        self._changes.append((self.clock(), load))

    def _load_at(self, t: float) -> float:
        return [load for since, load in self._changes if since <= t][-1]

    def cpu_percent(self, interval=None) -> float:
        assert interval is None, "the probe must never block the dispatcher"
        start, end = self._last_call, self.clock()
        self._last_call = end
        self.reads.append(end)
        if end <= start:
            return self._load_at(end)
        edges = sorted({start, end, *(t for t, _ in self._changes if start < t < end)})
        busy = sum(self._load_at(a) * (b - a) for a, b in itertools.pairwise(edges))
        return busy / (end - start)

    def sensors_battery(self):
        return self.battery


class Clock:
    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def ms(self) -> int:
        return int(self.t * 1000)


def battery(plugged):
    return SimpleNamespace(percent=50.0, secsleft=3600, power_plugged=plugged)


def test_probe_without_a_battery_counts_as_on_ac_power():
    clock = Clock()
    probe = SystemProbe(sensors=FakeSensors(clock, battery=None), clock=clock)
    assert probe.conditions().on_ac_power
    # psutil has no sensors_battery at all on some platforms
    no_function = SimpleNamespace(cpu_percent=FakeSensors(clock).cpu_percent)
    assert SystemProbe(sensors=no_function, clock=clock).conditions().on_ac_power


def test_probe_reads_the_battery_plugged_and_unplugged():
    clock = Clock()
    sensors = FakeSensors(clock, battery=battery(True))
    probe = SystemProbe(sensors=sensors, clock=clock)
    assert probe.conditions().on_ac_power
    sensors.battery = battery(False)
    assert probe.conditions().on_ac_power, "within the interval the reading is reused"
    clock.t += SAMPLE_EVERY_S
    assert not probe.conditions().on_ac_power
    sensors.battery = battery(None)  # psutil cannot tell: like a machine without sensors
    clock.t += SAMPLE_EVERY_S
    assert probe.conditions().on_ac_power
    sensors.battery = battery(True)
    clock.t += SAMPLE_EVERY_S
    assert probe.conditions().on_ac_power


@pytest.mark.parametrize(
    ("threshold", "load", "idle"),
    [(None, 29.9, True), (None, 30.0, False), (50.0, 49.0, True), (50.0, 51.0, False),
     (5.0, 10.0, False)],
)  # fmt: skip
def test_probe_cpu_idle_is_below_the_threshold(threshold, load, idle):
    clock = Clock()
    sensors = FakeSensors(clock, load=load)
    kwargs = {} if threshold is None else {"idle_below_percent": threshold}
    probe = SystemProbe(sensors=sensors, clock=clock, **kwargs)
    clock.t += SAMPLE_EVERY_S
    assert probe.conditions().cpu_idle is idle


def test_the_threshold_is_a_setting_of_30_percent_by_default(tmp_path):
    env = {"SEMANTICA_HOME": str(tmp_path)}
    assert config.load(env).cpu_idle_percent == CPU_IDLE_BELOW_PERCENT == 30.0
    assert config.load({**env, "SEMANTICA_CPU_IDLE_PERCENT": "55"}).cpu_idle_percent == 55.0
    with pytest.raises(config.ConfigError, match="SEMANTICA_CPU_IDLE_PERCENT"):
        config.load({**env, "SEMANTICA_CPU_IDLE_PERCENT": "0"})


def test_probe_caches_its_reading_for_an_interval():
    clock = Clock()
    sensors = FakeSensors(clock, load=80.0)
    probe = SystemProbe(sensors=sensors, clock=clock)
    assert sensors.reads == [100.0]  # the constructor only starts the measurement
    clock.t += 1.0
    assert not probe.conditions().cpu_idle
    sensors.set_load(0.0)
    clock.t += FRESH_FOR_S / 2
    assert not probe.conditions().cpu_idle and len(sensors.reads) == 2
    clock.t += FRESH_FOR_S
    assert probe.conditions().cpu_idle and len(sensors.reads) == 3


def test_probe_resample_counts_the_cpu_busy_until_a_full_interval_is_measured():
    clock = Clock()
    sensors = FakeSensors(clock, load=5.0)
    probe = SystemProbe(sensors=sensors, clock=clock)
    clock.t += 1.0
    assert probe.conditions().cpu_idle
    probe.resample()  # an idle-gated job just started
    admitted_at = clock.t
    sensors.set_load(80.0)
    assert sensors.reads[-1] == admitted_at, "the next reading is measured from the admission"
    clock.t += 0.05
    assert not probe.conditions().cpu_idle and sensors.reads[-1] == admitted_at
    clock.t = admitted_at + SAMPLE_EVERY_S
    assert not probe.conditions().cpu_idle  # 80 % measured over [admission, now]
    assert sensors.reads[-1] == admitted_at + SAMPLE_EVERY_S


# --------------------------------------------------------------------------- the dispatcher


class NoIdleWorkers:
    """A WARM pool with no idle worker to reserve for a claim."""

    def reserve(self):
        return None


class LauncherDouble:
    """What the dispatcher asks of a launcher before a claim: no idle WARM worker, no
    process forked ahead, and none to wait for (jobs are claimed without one)."""

    warm = NoIdleWorkers()

    def reserve_fresh_runner(self):
        return None

    def claims_without_runner(self, mode):
        return True

    def stop_getting_ready(self):
        pass  # it gets nothing ready

    def give_back_fresh_runner(self, pid):
        pass  # a job's end, with the pid it recorded (never a reserved one here)

    def has_runner_ready(self, mode):
        return True  # there is never a process to get ready ahead


class HeldLauncher(LauncherDouble):
    """Starts nothing: every admitted job stays RUNNING until the test ends."""

    async def run(self, job, **_):
        await trio.sleep_forever()


def dispatcher_with_probe(tmp_path, clock: Clock, sensors: FakeSensors, *, probe_clock=None):
    store = Store.open(tmp_path / "meta.db")
    probe = SystemProbe(sensors=sensors, clock=probe_clock or clock)
    dispatcher = Dispatcher(
        store,
        HeldLauncher(),
        workers=4,
        clock=clock.ms,
        conditions=probe.conditions,
        on_job_changed=lambda job: None,
    )
    return store, probe, dispatcher


def look(dispatcher: Dispatcher, jobs: trio.Nursery) -> None:
    """What the dispatcher's loop does when something wakes it (here: the test)."""
    dispatcher.wake()
    dispatcher.step(jobs)


def enqueue_idle_gated(store, clock: Clock, n: int = 2) -> list[str]:
    return [
        store.enqueue(EnqueueRequest(job_type="noop", wait_for_idle=True), now=clock.ms()).job.id
        for _ in range(n)
    ]


async def test_idle_gate_recheck_never_reuses_the_reading_from_before_the_admission(tmp_path):
    # The dispatcher's clock counts whole milliseconds; the probe's does not. The look
    # one interval after an admission can come a fraction of a millisecond less than an
    # interval after the reading that admitted it: that reading must not be reused.
    clock = Clock(100.0009)
    sensors = FakeSensors(clock, load=5.0)
    store, _probe, dispatcher = dispatcher_with_probe(tmp_path, clock, sensors)
    first, second = enqueue_idle_gated(store, clock)
    try:
        async with trio.open_nursery() as jobs:
            look(dispatcher, jobs)
            assert [j.id for j in store.running_jobs()] == [first]
            sensors.set_load(80.0)  # the first job's own load
            clock.t = 101.0  # the dispatcher asked to look again at admission + 1000 ms
            look(dispatcher, jobs)
            assert [j.id for j in store.running_jobs()] == [first]
            assert sensors.reads[-1] == 101.0, "a reading taken after the admission decides"
            sensors.set_load(5.0)
            clock.t += SAMPLE_EVERY_S
            look(dispatcher, jobs)
            assert {j.id for j in store.running_jobs()} == {first, second}
            jobs.cancel_scope.cancel()
    finally:
        store.close()


async def test_idle_gate_admits_the_next_job_only_on_a_reading_made_after_the_first_started(
    tmp_path,
):
    clock = Clock(100.0)
    sensors = FakeSensors(clock, load=5.0)
    store, probe, dispatcher = dispatcher_with_probe(tmp_path, clock, sensors)
    store.set_queue_paused("default", True, now=clock.ms())
    first, second = enqueue_idle_gated(store, clock)
    try:
        async with trio.open_nursery() as jobs:
            look(dispatcher, jobs)  # reads the sensors (idle), but the queue is paused
            assert store.running_jobs() == [] and sensors.reads[-1] == 100.0
            clock.t = 100.9
            store.set_queue_paused("default", False, now=clock.ms())
            look(dispatcher, jobs)  # admits one on the cached reading
            assert [j.id for j in store.running_jobs()] == [first]
            sensors.set_load(80.0)  # the first job's own load
            clock.t = 100.96  # someone asks why the second waits: the answer is not idle
            assert not probe.conditions().cpu_idle
            clock.t = 101.9  # one interval after the admission
            look(dispatcher, jobs)
            assert [j.id for j in store.running_jobs()] == [first]
            measured = [t for t in sensors.reads if t > 100.9]
            assert measured == [101.9], "one reading, covering the interval since the admission"
            sensors.set_load(5.0)
            clock.t += SAMPLE_EVERY_S
            look(dispatcher, jobs)
            assert {j.id for j in store.running_jobs()} == {first, second}
            jobs.cancel_scope.cancel()
    finally:
        store.close()


async def test_the_sensors_are_read_only_while_a_gated_job_waits(tmp_path):
    clock = Clock(100.0)
    sensors = FakeSensors(clock, load=90.0, battery=battery(True))
    store, _probe, dispatcher = dispatcher_with_probe(tmp_path, clock, sensors)
    try:
        async with trio.open_nursery() as jobs:
            store.enqueue(EnqueueRequest(job_type="noop"), now=clock.ms())
            for _ in range(3):
                clock.t += SAMPLE_EVERY_S
                look(dispatcher, jobs)
            assert sensors.reads == [100.0]  # only the constructor's
            assert math.isinf(dispatcher._seconds_to_next_due())  # and no wake-up planned
            gated = store.enqueue(
                EnqueueRequest(job_type="noop", wait_for_idle=True), now=clock.ms()
            ).job
            for _ in range(3):
                clock.t += SAMPLE_EVERY_S
                look(dispatcher, jobs)
            assert len(sensors.reads) == 4 and store.get(gated.id).state is State.QUEUED
            assert dispatcher._seconds_to_next_due() == pytest.approx(SAMPLE_EVERY_S, abs=0.01)
            store.cancel(job_id=gated.id, now=clock.ms())
            for _ in range(3):
                clock.t += SAMPLE_EVERY_S
                look(dispatcher, jobs)
            assert len(sensors.reads) == 4
            assert math.isinf(dispatcher._seconds_to_next_due())
            jobs.cancel_scope.cancel()
    finally:
        store.close()


async def test_a_gated_job_waiting_on_its_condition_does_not_spin_the_dispatcher(tmp_path):
    store = Store.open(tmp_path / "meta.db")
    reads = []

    def busy_cpu() -> Conditions:
        reads.append(time.monotonic())
        return Conditions(cpu_idle=False, on_ac_power=True)

    dispatcher = Dispatcher(
        store,
        HeldLauncher(),
        workers=2,
        clock=lambda: time.time_ns() // 1_000_000,
        conditions=busy_cpu,
        on_job_changed=lambda job: None,
    )
    store.enqueue(EnqueueRequest(job_type="noop", wait_for_idle=True), now=now_ms())
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            await trio.sleep(0.3)
            # One look at the start (and one more at most for the wake-up it asks for);
            # the next is one sample interval later, not at once and again.
            assert dispatcher.wakeups <= 2 and len(reads) <= 2, (dispatcher.wakeups, len(reads))
            nursery.cancel_scope.cancel()
    finally:
        store.close()


async def test_a_failing_store_with_a_runner_to_get_ready_does_not_spin(tmp_path):
    """A time to get a runner ready that has passed leaves the heap first, as a due
    time does: if the look then fails (here: the store, at every look's catch-up),
    the next look waits for the back-off instead of running again at once."""
    store = Store.open(tmp_path / "meta.db")

    def disk_full(**_):
        raise StorageUnavailable("the disk is full (a test)")

    store.expire_overdue = disk_full
    dispatcher = Dispatcher(
        store,
        HeldLauncher(),
        workers=2,
        clock=lambda: time.time_ns() // 1_000_000,
        conditions=lambda: ALL_CONDITIONS,
        on_job_changed=lambda job: None,
    )
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            await trio.sleep(0.05)
            before = dispatcher.wakeups
            dispatcher.runner_needed_at(now_ms() + 500)  # due within the lead already
            await trio.sleep(0.3)
            assert dispatcher.wakeups - before <= 2, dispatcher.wakeups - before
            nursery.cancel_scope.cancel()
    finally:
        store.close()


class UnplugsAndFailsOnce(LauncherDouble):
    """The first attempt unplugs the charger, then fails asking to be retried at once."""

    def __init__(self, power: dict[str, bool]) -> None:
        self.power = power
        self.attempts: list[int] = []

    async def run(self, job, **_):
        self.attempts.append(job.attempt)
        if job.attempt == 1:
            self.power["plugged"] = False
            return Outcome(error_kind="retryable", error_message="again", retry_after_ms=0)
        return Outcome(result_summary={"ok": True})


async def test_a_gated_jobs_retry_due_at_once_waits_for_its_condition_again(tmp_path):
    """The look that records an attempt's end also claims: a gated job put back in
    line by that end must be held to its condition, although no gated job was QUEUED
    when the look began (and so the sensors had not been read for it)."""
    store = Store.open(tmp_path / "meta.db")
    power = {"plugged": True}
    launcher = UnplugsAndFailsOnce(power)
    dispatcher = Dispatcher(
        store,
        launcher,
        workers=1,
        clock=now_ms,
        conditions=lambda: Conditions(cpu_idle=True, on_ac_power=power["plugged"]),
        on_job_changed=lambda job: None,
    )
    job = store.enqueue(
        EnqueueRequest(job_type="noop", require_charging=True, max_attempts=3), now=now_ms()
    ).job
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            with trio.fail_after(10):
                while store.get(job.id).attempt < 1 or store.get(job.id).state is State.RUNNING:
                    await trio.sleep(0.01)
            await trio.sleep(0.2)  # looks enough to claim the retry, were it let in
            assert launcher.attempts == [1]
            assert store.get(job.id).state is State.QUEUED
            power["plugged"] = True
            dispatcher.wake()
            with trio.fail_after(10):
                while store.get(job.id).state is not State.DONE:
                    await trio.sleep(0.01)
            assert launcher.attempts == [1, 2]
            nursery.cancel_scope.cancel()
    finally:
        store.close()


def one_worker_dispatcher(store, launcher, on_job_changed=lambda job: None) -> Dispatcher:
    return Dispatcher(
        store,
        launcher,
        workers=1,
        clock=now_ms,
        conditions=lambda: ALL_CONDITIONS,
        on_job_changed=on_job_changed,
    )


async def run_until(dispatcher: Dispatcher, done, timeout: float = 10) -> None:
    """Run the dispatcher's loop until `done()`; fail after `timeout` seconds."""
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        with trio.fail_after(timeout):
            while not done():
                await trio.sleep(0.01)
        nursery.cancel_scope.cancel()


class InstantLauncher(LauncherDouble):
    """Every attempt ends at once, successfully."""

    async def run(self, job, **_):
        return Outcome(result_summary={"ok": True})


async def test_an_ended_attempt_is_recorded_with_its_successors_claim_and_announced_once_durable(
    tmp_path,
):
    store = Store.open(tmp_path / "meta.db")
    events: list[tuple[str, str]] = []

    async def durable() -> None:
        events.append(("durable", ""))

    dispatcher = one_worker_dispatcher(
        store, InstantLauncher(), lambda job: events.append((job.state.value, job.id))
    )
    dispatcher.durable = durable
    ids = [store.enqueue(EnqueueRequest(job_type="noop"), now=now_ms()).job.id for _ in range(3)]
    try:
        await run_until(dispatcher, lambda: sum(e[0] == "DONE" for e in events) >= 3)
    finally:
        jobs = [store.get(i) for i in ids]
        store.close()
    assert all(j.state is State.DONE for j in jobs)
    for done in (e for e in events if e[0] == "DONE"):
        # A job's end is told to waiters only after a sync that followed its commit.
        assert ("durable", "") in events[: events.index(done)]
    # Each successor started in the look that recorded its predecessor's end.
    assert [j.started_at for j in jobs[1:]] == [j.finished_at for j in jobs[:-1]]


class SpareLauncher(InstantLauncher):
    """A process is forked ahead for the next SUBPROCESS job: (pid, start time)."""

    def __init__(self) -> None:
        self.spare: tuple[int, int] | None = (4242, 1_764_600_000_456)
        self.given_back = 0
        self.ran = []

    def reserve_fresh_runner(self):
        spare, self.spare = self.spare, None
        return spare

    def give_back_fresh_runner(self, pid):
        if pid == 4242 and self.spare is None and not any(j.runner_pid == 4242 for j in self.ran):
            self.given_back += 1  # reserved for a claim that took another mode's job
            self.spare = (4242, 1_764_600_000_456)

    async def run(self, job, **_):
        self.ran.append(job)
        return await super().run(job)


async def test_a_subprocess_job_is_claimed_with_the_process_forked_ahead_for_it(tmp_path):
    store = Store.open(tmp_path / "meta.db")
    launcher = SpareLauncher()
    dispatcher = one_worker_dispatcher(store, launcher, lambda job: None)
    warm = store.enqueue(EnqueueRequest(job_type="noop", execution_mode="WARM"), now=now_ms())
    fresh = store.enqueue(EnqueueRequest(job_type="noop"), now=now_ms() + 1)
    try:
        await run_until(dispatcher, lambda: len(launcher.ran) == 2)
    finally:
        store.close()
    claimed = {job.id: job for job in launcher.ran}
    # The WARM job's claim gave the spare back; the SUBPROCESS one counted as RUNNING
    # with it recorded, before its process was asked for.
    assert launcher.given_back == 1 and claimed[warm.job.id].runner_pid is None
    assert (claimed[fresh.job.id].runner_pid, claimed[fresh.job.id].runner_start_time) == (
        4242,
        1_764_600_000_456,
    )
    assert launcher.spare is None


class FailsOnceLauncher(LauncherDouble):
    """The first attempt of every job fails, asking to be retried at once."""

    async def run(self, job, **_):
        if job.attempt == 1:
            return Outcome(error_kind="retryable", error_message="again", retry_after_ms=0)
        return Outcome(result_summary={"ok": True})


async def test_a_retry_due_at_once_is_told_after_the_end_of_the_attempt_before_it(tmp_path):
    store = Store.open(tmp_path / "meta.db")
    told: list[tuple[str, int]] = []
    released = trio.Event()

    async def slow_durable() -> None:  # the sync of the first end is still going on
        await released.wait()

    dispatcher = one_worker_dispatcher(
        store, FailsOnceLauncher(), lambda job: told.append((job.state.value, job.attempt))
    )
    dispatcher.durable = slow_durable
    store.enqueue(EnqueueRequest(job_type="noop", max_attempts=3), now=now_ms())
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(dispatcher.run)
            with trio.fail_after(10):
                while ("RUNNING", 2) not in told:
                    await trio.sleep(0.01)
                released.set()
                while ("DONE", 2) not in told:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    finally:
        store.close()
    assert told == [("RUNNING", 1), ("QUEUED", 1), ("RUNNING", 2), ("DONE", 2)]


async def _assert_failed_internally(dispatcher, store, bad: str, after: str, says: str) -> None:
    """The job enqueued `after` the `bad` one runs, and `bad` ends FAILED/internal."""
    try:
        await run_until(dispatcher, lambda: store.get(after).state is State.DONE)
        failed = store.get(bad)
        assert (failed.state, failed.error_kind) == (State.FAILED, "internal")
        assert says in failed.error_message
    finally:
        store.close()


async def test_an_end_the_store_cannot_take_is_recorded_as_internal_and_stalls_nothing(
    tmp_path,
):
    """One outcome the database refused (an integer past 64 bits, as a plugin's
    retry_after_ms of 10**19 made) failed every look after it: nothing started until
    a restart (an audit found it)."""
    store = Store.open(tmp_path / "meta.db")

    class OverflowingLauncher(LauncherDouble):
        async def run(self, job, **_):
            if job.user_tag == "bad":
                return Outcome(error_kind="exit", error_message="x", exit_code=2**70)
            return Outcome(result_summary={"ok": True})

    dispatcher = one_worker_dispatcher(store, OverflowingLauncher())
    bad = store.enqueue(
        EnqueueRequest(job_type="noop", user_tag="bad", max_attempts=1), now=now_ms()
    ).job.id
    after = store.enqueue(EnqueueRequest(job_type="noop"), now=now_ms() + 1).job.id
    says = "could not record how this attempt ended"
    await _assert_failed_internally(dispatcher, store, bad, after, says)


async def test_an_end_that_cannot_be_recorded_at_all_stalls_nothing_either(tmp_path):
    """When even the fallback fails (the row itself, not the outcome), the job is
    marked FAILED by one plain UPDATE: left RUNNING, it held a worker slot for good."""
    store = Store.open(tmp_path / "meta.db")
    bad = store.enqueue(EnqueueRequest(job_type="noop", user_tag="bad"), now=now_ms()).job.id
    after = store.enqueue(EnqueueRequest(job_type="noop"), now=now_ms() + 1).job.id
    record_end = store.record_end

    def refusing(job_id, *args, **kwargs):
        if job_id == bad:
            raise ValueError("a row this store cannot read")
        return record_end(job_id, *args, **kwargs)

    store.record_end = refusing
    dispatcher = one_worker_dispatcher(store, InstantLauncher())
    await _assert_failed_internally(dispatcher, store, bad, after, "a row this store cannot read")


async def test_an_end_recorded_late_keeps_the_time_the_attempt_ended(tmp_path):
    """After the store refused an end (a full disk), it was recorded with the time of
    the look that could: a 2 s job showed 12 s on an audit's full tmpfs (fixed)."""
    store = Store.open(tmp_path / "meta.db")
    job_id = store.enqueue(EnqueueRequest(job_type="noop"), now=now_ms()).job.id
    record_end, refused = store.record_end, []

    def full_disk_once(*args, **kwargs):
        if not refused:
            refused.append(now_ms())
            raise StorageUnavailable("the disk is full")
        return record_end(*args, **kwargs)

    store.record_end = full_disk_once
    dispatcher = one_worker_dispatcher(store, InstantLauncher())
    try:
        await run_until(dispatcher, lambda: store.get(job_id).state is State.DONE)
        done = store.get(job_id)
        # The look after the refusal comes RETRY_FIRST_S (1 s) later.
        assert done.finished_at <= refused[0], (done.finished_at, refused[0])
    finally:
        store.close()


async def test_the_end_of_a_job_deleted_while_it_ran_does_not_stall_the_dispatcher(tmp_path):
    store = Store.open(tmp_path / "meta.db")

    class DeletingLauncher(LauncherDouble):
        async def run(self, job, **_):
            if job.user_tag == "doomed":  # cancelled, then removed by maintenance
                store.cancel(job_id=job.id, now=now_ms())
                store.delete_jobs([job.id])
            return Outcome(result_summary={"ok": True})

    dispatcher = one_worker_dispatcher(store, DeletingLauncher())
    store.enqueue(EnqueueRequest(job_type="noop", user_tag="doomed"), now=now_ms())
    after = store.enqueue(EnqueueRequest(job_type="noop"), now=now_ms() + 1).job.id
    try:
        await run_until(dispatcher, lambda: store.get(after).state is State.DONE)
    finally:
        store.close()
