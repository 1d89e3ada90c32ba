"""Jobs really run: a real daemon starts real runner processes and records outcomes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import textwrap
import time

import psutil
import pytest
from harness import helper_module, live_group_members, remove_home, start_daemon

import semantica
from semantica.domain import EnqueueRequest, State
from semantica.launcher import process_start_time, start_ms
from semantica.runner import PARENT_GONE_GRACE_S
from semantica.store import Conditions, Store

FAST_RETRY = {"backoff_base_ms": 20, "backoff_factor": 1.0}

# Callables for the `python` runner, imported by the runner from a temporary directory.
HELPERS_SOURCE = textwrap.dedent(
    """
    import os
    import time

    import semantica

    def retry_later(ms):
        raise semantica.RetryableError("not yet", retry_after_ms=ms)


    def wait_for(ctx, path, progress=None):
        \"\"\"Report `progress` ([fraction, message]) if given, then wait (at most 10 s)
        for `path` to exist or for the job to be cancelled.\"\"\"
        if progress is not None:
            ctx.progress(0.25, "a start")
            ctx.progress(*progress)
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and not ctx.cancelled():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path} never appeared")
            time.sleep(0.002)
        return {"attempt": ctx.attempt, "released": os.path.exists(path)}
    """
)


@pytest.fixture(scope="module")
def daemon():
    d = start_daemon(SEMANTICA_WORKERS="4", DAEMON_SECRET_TOKEN="hunter2")
    yield d
    d.stop()
    remove_home(d.home)


@pytest.fixture
def client(daemon):
    with daemon.client() as c:
        yield c


@pytest.fixture(scope="module")
def helpers(tmp_path_factory):
    """The directory of the `exec_helpers` module, for a `python` job's sys_path."""
    return helper_module(tmp_path_factory, "exec_helpers", HELPERS_SOURCE)


def wait_for_payload(helpers, path, **kwargs):
    return {
        "callable": "exec_helpers:wait_for",
        "pass_context": True,
        "sys_path": [helpers],
        "args": [str(path)],
        "kwargs": kwargs,
    }


def live(pid: int) -> bool:
    """Whether the process exists and is not a zombie (a zombie has stopped running)."""
    return psutil.pid_exists(pid) and not is_zombie(pid)


def wait_gone(pids, timeout=5.0) -> None:
    deadline = time.monotonic() + timeout
    while alive := [pid for pid in pids if live(pid)]:
        assert time.monotonic() < deadline, f"still running: {alive}"
        time.sleep(0.01)


def wait_for_state(client, job_id, predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate(job := client.get(job_id)):
        assert time.monotonic() < deadline, f"never reached: {job}"
        time.sleep(0.005)
    return job


def run_to_end(client, timeout_ms=20_000, **fields):
    job = client.enqueue(**fields)
    done = client.wait(job.id, timeout_ms=timeout_ms)
    assert done.is_terminal, f"job still {done.state} after {timeout_ms} ms: {done}"
    return done


def log_text(client, job_id) -> str:
    return "\n".join(client.logs(job_id, n=1000).lines)


def test_a_noop_job_runs_to_done(client, daemon):
    job = run_to_end(client, job_type="noop")
    assert job.state is State.DONE and job.attempt == 1
    assert job.result_summary == {"ok": True}
    assert job.started_at is not None and job.finished_at >= job.started_at
    assert (daemon.home / "logs" / f"{job.id}.log").exists()


def test_job_type_is_case_insensitive(client):
    assert run_to_end(client, job_type="NOOP").state is State.DONE


def test_an_uninstalled_job_type_is_refused_listing_installed_ones(client):
    with pytest.raises(semantica.ValidationFailed, match=r"installed: .*noop") as info:
        client.enqueue(job_type="no_such_runner")
    assert info.value.data == {"field": "job_type"}


def test_exceptions_are_retried_with_backoff_then_fail(client):
    job = run_to_end(
        client, job_type="fail", payload={"mode": "exception"}, max_attempts=3, **FAST_RETRY
    )
    assert job.state is State.FAILED and job.attempt == 3
    assert job.error_kind == "exception" and "raising as asked" in job.error_message
    assert "Traceback" in log_text(client, job.id)


def test_permanent_error_fails_at_once(client):
    job = run_to_end(client, job_type="fail", payload={"mode": "permanent"}, max_attempts=3)
    assert (job.state, job.attempt) == (State.FAILED, 1)


def test_exit_and_signal_are_recorded(client):
    exited = run_to_end(client, job_type="fail", payload={"mode": "exit"}, max_attempts=1)
    assert (exited.error_kind, exited.exit_code) == ("exit", 3)
    killed = run_to_end(client, job_type="fail", payload={"mode": "signal"}, max_attempts=1)
    assert killed.error_kind == "signal" and "SIGKILL" in killed.error_message


@pytest.mark.parametrize("mode", ["SUBPROCESS", "WARM"])
def test_a_failing_shell_command_is_recorded_with_its_status(client, mode):
    """It was error_kind 'exception' with exit_code 0 (the runner's own, fine) before."""
    common = {"job_type": "shell", "execution_mode": mode, "max_attempts": 1}
    failed = run_to_end(client, payload={"argv": ["sh", "-c", "exit 7"]}, **common)
    assert (failed.state, failed.error_kind, failed.exit_code) == (State.FAILED, "exit", 7)
    assert "exited with status 7" in failed.error_message
    killed = run_to_end(client, payload={"argv": ["sh", "-c", "kill -9 $$"]}, **common)
    assert (killed.error_kind, killed.exit_code) == ("signal", -9)
    checked = run_to_end(
        client,
        job_type="python",
        execution_mode=mode,
        max_attempts=1,
        payload={"callable": "subprocess:check_call", "args": [["false"]]},
    )
    assert (checked.error_kind, checked.exit_code) == ("exit", 1)


@pytest.mark.parametrize("ms", [10**19, 1e300])
def test_a_huge_retry_after_is_held_to_a_year_and_stops_nothing(client, helpers, ms):
    job = client.enqueue(
        job_type="python",
        max_attempts=2,
        payload={"callable": "exec_helpers:retry_later", "args": [ms], "sys_path": [helpers]},
    )
    later = wait_for_state(client, job.id, lambda j: j.state is State.QUEUED and j.attempt == 1)
    year = 365 * 24 * 3600 * 1000
    assert later.finished_at is None and year - 60_000 < later.run_after - time.time() * 1000
    assert later.run_after - time.time() * 1000 <= year
    assert run_to_end(client, job_type="noop").state is State.DONE  # the dispatcher goes on
    client.cancel(job.id)


def test_deadline_kills_a_job_that_ignores_sigterm(client):
    job = client.enqueue(job_type="fail", payload={"mode": "hang"}, deadline_ms=500, max_attempts=1)
    pid = wait_until_running(client, job.id).runner_pid
    ended = client.wait(job.id, timeout_ms=15_000)
    assert ended.state is State.FAILED and ended.error_kind == "deadline"
    assert ended.finished_at - ended.started_at < 500 + 5_000  # TERM ignored, then KILL
    assert not psutil.pid_exists(pid) or is_zombie(pid)


def test_the_deadline_kills_grandchildren_that_ignore_sigterm(client):
    script = 'trap "" TERM; sleep 60 & sleep 60'
    job = client.enqueue(
        job_type="shell", payload={"argv": ["sh", "-c", script]}, deadline_ms=500, max_attempts=1
    )
    runner = wait_until_running(client, job.id).runner_pid
    deadline = time.monotonic() + 0.4
    family: list[int] = []  # sh and its two sleeps, one of them in the background
    while len(family) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
        family = [p.pid for p in psutil.Process(runner).children(recursive=True)]
    assert len(family) == 3, f"the job's processes never all started: {family}"
    ended = client.wait(job.id, timeout_ms=15_000)
    assert (ended.state, ended.error_kind) == (State.FAILED, "deadline")
    assert not [pid for pid in [runner, *family] if live(pid)]
    assert live_group_members(runner) == []


def is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


def wait_until_running(client, job_id, timeout=10.0):
    """The job once its runner runs it: recorded (the zygote's spare is recorded with
    the claim, before it has the job) and the runner's first log line written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if job.state is State.RUNNING and job.runner_pid and client.logs(job_id).lines:
            return job
        client.wait(job_id, timeout_ms=50)
    raise AssertionError(f"job {job_id} never started: {client.get(job_id)}")


def test_cancelling_a_running_job_stops_its_process(client):
    job = client.enqueue(job_type="sleep", payload={"seconds": 30})
    running = wait_until_running(client, job.id)
    assert client.cancel(job.id).cancelled == [job.id]
    ended = client.wait(job.id, timeout_ms=10_000)
    assert ended.state is State.CANCELLED
    deadline = time.monotonic() + 10
    while psutil.pid_exists(running.runner_pid) and not is_zombie(running.runner_pid):
        assert time.monotonic() < deadline, "the cancelled job's runner is still alive"
        time.sleep(0.05)


def test_a_cancelled_running_job_is_logged_cancelled_once(daemon, client):
    job = client.enqueue(job_type="sleep", payload={"seconds": 30})
    wait_until_running(client, job.id)
    client.cancel(job.id)
    assert client.wait(job.id, timeout_ms=10_000).state is State.CANCELLED
    done = client.enqueue(job_type="noop")  # the stopped attempt is recorded before this ends
    client.wait(done.id, timeout_ms=10_000)
    time.sleep(0.1)  # the announcer's batch
    events = [json.loads(ln) for ln in daemon.log().splitlines() if job.id in ln]
    told = [e for e in events if e.get("event") == "job_state_changed"]
    assert [e["state"] for e in told] == ["RUNNING", "CANCELLED"], told


def test_a_superseded_job_is_logged_with_its_attempt_and_how_long_it_ran(daemon, client):
    """SPEC §9 names attempt and duration_ms; the supersede lines had neither."""
    old = client.enqueue(job_type="sleep", subject_key="k-logged", payload={"seconds": 30})
    wait_until_running(client, old.id)
    new = client.enqueue(
        job_type="sleep", subject_key="k-logged", supersede_running=True, payload={"seconds": 0}
    )
    assert client.wait(old.id, timeout_ms=10_000).state is State.SUPERSEDED
    client.wait(new.id, timeout_ms=10_000)
    events = [json.loads(ln) for ln in daemon.log().splitlines() if old.id in ln]
    [line] = [e for e in events if e.get("state") == "SUPERSEDED"]
    assert line["attempt"] == 1 and line["superseded_by"] == new.id
    assert line["duration_ms"] >= 0 and line["error_kind"] == "superseded"


def test_a_runner_killed_with_sigkill_is_retried(client, helpers, tmp_path):
    release = tmp_path / "release"
    job = client.enqueue(
        job_type="python", payload=wait_for_payload(helpers, release), max_attempts=2, **FAST_RETRY
    )
    first = wait_until_running(client, job.id)
    os.kill(first.runner_pid, signal.SIGKILL)
    second = wait_for_state(
        client, job.id, lambda j: j.attempt == 2 and j.state is State.RUNNING and j.runner_pid
    )
    # The first attempt's outcome stays on the job while the second one runs.
    assert second.error_kind == "signal" and "SIGKILL" in second.error_message
    assert second.runner_pid != first.runner_pid
    release.touch()
    done = client.wait(job.id, timeout_ms=10_000)
    assert done.state is State.DONE and done.result_summary == {"attempt": 2, "released": True}


def test_supersede_running_stops_the_older_run(client):
    old = client.enqueue(job_type="sleep", subject_key="k-run", payload={"seconds": 30})
    pid = wait_until_running(client, old.id).runner_pid
    new = client.enqueue(
        job_type="sleep", subject_key="k-run", payload={"seconds": 0}, supersede_running=True
    )
    assert client.wait(old.id, timeout_ms=10_000).state is State.SUPERSEDED
    assert client.wait(new.id, timeout_ms=10_000).state is State.DONE
    wait_gone([pid])
    assert live_group_members(pid) == []


# A job that takes its time to stop: on SIGTERM it notes it, cleans up for 0.6 s and
# notes that too, in a file shared with the next job of its subject.
SLOW_TO_STOP = (
    'trap \'echo "A got TERM" >> "$0"; sleep 0.6; echo "A cleaned up" >> "$0"; '
    'echo "A: last words"; exit 0\' TERM; echo "A started" >> "$0"; '
    "while :; do sleep 0.05; done"
)


@pytest.mark.parametrize("how", ["cancel", "supersede_running"])
@pytest.mark.parametrize("mode", ["SUBPROCESS", "WARM"])
def test_the_next_job_of_a_subject_waits_for_the_stopped_ones_process(client, tmp_path, mode, how):
    """SPEC §3: per key, at most one job runs at a time. The newer job started while
    the cancelled or superseded one's process was still stopping (fixed)."""
    trail = tmp_path / "trail"
    key = f"slow-stop-{mode}-{how}"
    old = client.enqueue(
        job_type="shell",
        subject_key=key,
        execution_mode=mode,
        payload={"argv": ["sh", "-c", SLOW_TO_STOP, str(trail)]},
    )
    wait_for_state(client, old.id, lambda j: trail.exists() and j.state is State.RUNNING)
    newer = {"job_type": "shell", "subject_key": key, "execution_mode": mode}
    newer["payload"] = {"argv": ["sh", "-c", 'echo "B started" >> "$0"', str(trail)]}
    if how == "cancel":
        client.cancel(old.id)
        new = client.enqueue(**newer)
    else:
        new = client.enqueue(**newer, supersede_running=True)
    stopped = client.wait(old.id, timeout_ms=10_000)
    assert stopped.state in (State.CANCELLED, State.SUPERSEDED)
    # While the old process cleans up: the log is not over, and the new job waits.
    tail = client.logs(old.id)
    waiting = client.get(new.id)
    if "A cleaned up" not in trail.read_text():
        assert not tail.eof
        assert waiting.state is State.QUEUED
        assert f"is still running (job {old.id})" in (waiting.waiting_reason or "")
    assert client.wait(new.id, timeout_ms=10_000).state is State.DONE
    assert trail.read_text().splitlines() == [
        "A started",
        "A got TERM",
        "A cleaned up",
        "B started",
    ]
    follow = client.logs(old.id, offset=0, wait_ms=5_000)
    assert follow.eof and "A: last words" in follow.lines


@pytest.mark.parametrize("mode", ["SUBPROCESS", "WARM"])
def test_progress_is_shown_while_the_job_runs(client, helpers, tmp_path, mode):
    release = tmp_path / "release"
    job = client.enqueue(
        job_type="python",
        execution_mode=mode,
        payload=wait_for_payload(helpers, release, progress=[0.5, "halfway"]),
    )
    running = wait_for_state(client, job.id, lambda j: j.progress == 0.5)
    assert running.state is State.RUNNING and running.progress_message == "halfway"
    release.touch()
    done = client.wait(job.id, timeout_ms=10_000)
    assert done.state is State.DONE and done.result_summary["released"] is True


def test_the_daemon_environment_never_reaches_a_job(client):
    assert os.environ.get("DAEMON_SECRET_TOKEN") is None  # only the daemon has it
    job = run_to_end(client, job_type="shell", payload={"argv": ["env"]}, env={"LANG": "C.UTF-8"})
    assert job.state is State.DONE
    out = log_text(client, job.id)
    assert "hunter2" not in out and "DAEMON_SECRET_TOKEN" not in out
    assert "LANG=C.UTF-8" in out


def test_progress_and_logs_follow(client):
    job = run_to_end(client, job_type="shell", payload={"argv": ["sh", "-c", "echo one; echo two"]})
    chunk = client.logs(job.id, offset=0)
    assert "one" in chunk.lines and "two" in chunk.lines and chunk.eof
    again = client.logs(job.id, offset=chunk.offset)
    assert again.lines == [] and again.eof


def test_log_lines_are_split_at_newlines_only(client):
    """A carriage return (progress bars) stays in its line: `n` counts newlines."""
    script = "printf 'a\\rb\\rc\\nCRLF line\\r\\nform\\ffeed\\n'"
    job = run_to_end(client, job_type="shell", payload={"argv": ["sh", "-c", script]})
    lines = client.logs(job.id, n=100).lines
    assert "a\rb\rc" in lines and "CRLF line" in lines and "form\ffeed" in lines
    followed = client.logs(job.id, offset=0).lines
    assert "a\rb\rc" in followed and "form\ffeed" in followed


@pytest.mark.parametrize("offset", [2**40, 2**62, 2**63 - 1])
def test_an_offset_past_any_file_reads_nothing(client, offset):
    """A huge offset made the seek fail: -32603 and a traceback (fixed)."""
    job = run_to_end(client, job_type="noop")
    chunk = client.logs(job.id, offset=offset)
    assert chunk.lines == [] and chunk.offset == offset and chunk.eof  # it has ended


def test_job_output_without_newline_and_runner_lines_stay_apart(client):
    job = run_to_end(client, job_type="shell", payload={"argv": ["printf", "no newline"]})
    lines = client.logs(job.id, n=10).lines
    assert "no newline" in lines and "done in" in lines[-1]


def test_following_an_ended_job_returns_its_last_line_without_newline(client, daemon):
    # The runner dies by SIGKILL right after the output: no line of its own follows.
    script = "printf 'one\\nlast words'; kill -9 $PPID; sleep 5"
    job = run_to_end(
        client, job_type="shell", payload={"argv": ["sh", "-c", script]}, max_attempts=1
    )
    assert job.error_kind == "signal"
    path = daemon.home / "logs" / f"{job.id}.log"
    assert path.read_bytes().endswith(b"last words")
    chunk = client.logs(job.id, offset=0)
    assert chunk.lines[-1] == "last words" and chunk.eof
    assert chunk.offset == path.stat().st_size


def test_runners_are_listed_with_their_distribution(client):
    runners = {r.name: r for r in client.runners().runners}
    assert {"noop", "sleep", "fail", "shell", "python", "index_file"} <= runners.keys()
    assert runners["noop"].distribution == "semantica-runners"


def test_retry_runs_a_failed_job_again_as_a_new_job(client):
    failed = run_to_end(client, job_type="fail", payload={"mode": "permanent"})
    again = client.retry(failed.id)
    assert again.id != failed.id and again.parent_job_id == failed.id
    assert client.wait(again.id, timeout_ms=10_000).state is State.FAILED
    with pytest.raises(semantica.SemanticaError) as info:
        client.retry(run_to_end(client, job_type="noop").id)
    assert info.value.code == 4009
    assert "retry takes a FAILED, CANCELLED or EXPIRED job, and it succeeded" in str(info.value)
    running = client.enqueue(job_type="sleep", payload={"seconds": 30})
    wait_until_running(client, running.id)
    with pytest.raises(semantica.SemanticaError) as info:
        client.retry(running.id)
    assert "is RUNNING" in str(info.value) and "cancel it first" in str(info.value)
    assert info.value.data == {"id": running.id, "state": "RUNNING"}
    client.cancel(running.id)


def test_index_file_does_real_work(client):
    path = os.path.abspath(__file__)
    job = run_to_end(client, job_type="index_file", payload={"path": path})
    assert job.state is State.DONE
    assert job.result_summary["language"] == "python"
    assert job.result_summary["bytes"] == os.path.getsize(path)


def test_schedule_at_holds_a_job_until_its_time(client):
    at = int(time.time() * 1000) + 400
    job = run_to_end(client, job_type="noop", schedule_at=at)
    assert job.state is State.DONE and job.started_at >= at


def test_sigkill_of_the_daemon_leaves_no_runner_and_loses_no_job():
    d = start_daemon(SEMANTICA_WORKERS="20")
    try:
        with d.client() as c:
            zygote = run_to_end(c, job_type="python", payload={"callable": "os:getppid"})
            multiply = {"callable": "operator:mul"}
            finished = [
                run_to_end(c, job_type="python", payload={**multiply, "args": [i, 7]})
                for i in range(4)
            ]
            finished.append(
                run_to_end(c, job_type="fail", payload={"mode": "permanent"}, max_attempts=1)
            )
            retried = [c.enqueue(job_type="sleep", payload={"seconds": 30}) for _ in range(14)]
            single = [
                c.enqueue(job_type="sleep", payload={"seconds": 30}, max_attempts=1)
                for _ in range(6)
            ]
            pids = [wait_until_running(c, j.id).runner_pid for j in retried + single]
        d.kill()  # SIGKILL: no drain, no cleanup
        d.start()  # recovery runs before serving
        for pid in pids:
            assert not live(pid), f"runner {pid} survived"
            assert live_group_members(pid) == [], f"the group of runner {pid} survived"
        # The old zygote (no job records it) stops its runners, giving them their grace,
        # then exits: it may still be at it when the new daemon serves.
        wait_gone([zygote.result_summary], timeout=PARENT_GONE_GRACE_S + 5)
        assert live_group_members(zygote.result_summary) == []
        with d.client() as c:
            for job in [zygote, *finished]:
                got = c.get(job.id)
                assert (got.state, got.attempt, got.finished_at) == (
                    job.state,
                    job.attempt,
                    job.finished_at,
                )
                assert (got.result_summary, got.error_kind) == (job.result_summary, job.error_kind)
            assert [c.get(j.id).result_summary for j in finished[:4]] == [0, 7, 14, 21]
            for job in single:  # no attempt left: failed by the policy
                got = c.get(job.id)
                assert (got.state, got.attempt, got.error_kind) == (State.FAILED, 1, "orphaned")
            for job in retried:  # requeued with backoff, or already running again
                got = c.get(job.id)
                assert got.error_kind == "orphaned", got
                assert (got.state, got.attempt) in ((State.QUEUED, 1), (State.RUNNING, 2)), got
                c.cancel(job.id)
    finally:
        d.stop()
        remove_home(d.home)


def test_recovery_kills_a_live_runner_with_its_group_but_not_a_reused_pid():
    d = start_daemon()
    d.stop()
    # The runner of a previous daemon, still running, with a grandchild in its group;
    # and a process that merely has the PID another job's runner once had.
    runner = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60"], start_new_session=True)
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        deadline = time.monotonic() + 5
        while len(family := psutil.Process(runner.pid).children()) < 2:
            assert time.monotonic() < deadline, "the runner's children never started"
            time.sleep(0.005)
        store = Store.open(d.home / "meta.db")
        try:
            ids = {}
            for name, proc, start in (
                ("runner", runner, start_ms(psutil.Process(runner.pid))),
                ("stranger", stranger, start_ms(psutil.Process(stranger.pid)) - 30_000),
            ):
                now = int(time.time() * 1000)
                request = EnqueueRequest(job_type="sleep", queue=name, max_attempts=1)
                ids[name] = store.enqueue(request, now=now).job.id
                claimed = store.claim_next_job(
                    now=now, global_limit=2, conditions=Conditions(cpu_idle=True, on_ac_power=True)
                )
                assert claimed is not None and claimed.id == ids[name]
                assert store.record_runner(claimed.id, proc.pid, start)
        finally:
            store.close()
        d.start()  # recovery runs before serving
        assert runner.wait(timeout=5) == -signal.SIGTERM
        wait_gone([p.pid for p in family])
        assert stranger.poll() is None, "a process that only reused a PID was killed"
        with d.client() as c:
            for name in ("runner", "stranger"):
                got = c.get(ids[name])
                assert (got.state, got.error_kind) == (State.FAILED, "orphaned"), got
    finally:
        for proc in (runner, stranger):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        d.stop()
        remove_home(d.home)


def test_a_process_start_time_is_psutils_even_when_its_name_has_parentheses(tmp_path):
    """The start time recorded for a runner is read from /proc directly; recovery
    compares it with psutil's reading, so the two must agree to the millisecond."""
    odd = tmp_path / "a) b (c"
    shutil.copy("/bin/sleep", odd)
    proc = subprocess.Popen([str(odd), "5"])
    try:
        time.sleep(0.05)
        assert psutil.Process(proc.pid).name() == "a) b (c"
        for pid in (proc.pid, os.getpid(), 1):
            assert process_start_time(pid) == start_ms(psutil.Process(pid))
    finally:
        proc.kill()
        proc.wait()
    assert process_start_time(proc.pid) is None


def test_the_boot_time_is_psutils_computed_or_read(monkeypatch):
    """Computed from two clocks instead of reading /proc/stat, it must still be the
    btime psutil reads; where the computation is not trusted, psutil is asked."""
    from semantica import launcher

    monkeypatch.setattr(launcher, "_boot_time_checked", None)
    assert launcher.boot_time() == psutil.boot_time()
    assert launcher.boot_time() == psutil.boot_time()  # the computed one, once checked

    # A kernel whose btime the clocks do not give: psutil's answer, every time.
    monkeypatch.setattr(launcher, "_boot_time_checked", None)
    other = psutil.boot_time() + 7
    monkeypatch.setattr(psutil, "boot_time", lambda: other)
    assert launcher.boot_time() == other
    assert launcher._boot_time_checked is False
    assert launcher.boot_time() == other


def test_the_boot_time_is_read_when_the_thread_stalled_between_the_clocks(monkeypatch):
    """Held up between reading the wall clock and the boot clock, the computation
    would come out a second early at some offsets (and recovery would take a live
    runner for a reused PID): then psutil is asked instead."""
    from semantica import launcher

    monkeypatch.setattr(launcher, "_boot_time_checked", True)  # computed from here on
    real_boottime = time.clock_gettime
    calls = []

    def stalled(clock):
        calls.append(clock)
        return real_boottime(clock) + (0.005 if len(calls) % 2 == 0 else 0)  # 5 ms later

    monkeypatch.setattr(time, "clock_gettime", stalled)
    monkeypatch.setattr(psutil, "boot_time", lambda: 1_234_567.0)
    assert launcher.boot_time() == 1_234_567.0
    assert len(calls) == 2


def test_sigterm_requeues_running_jobs_after_the_grace():
    d = start_daemon()
    try:
        with d.client() as c:
            job = c.enqueue(job_type="sleep", payload={"seconds": 60})
            wait_until_running(c, job.id)
        d.signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        d.start()
        with d.client() as c:
            got = c.get(job.id)
            assert got.attempt <= 1 and got.state in (State.QUEUED, State.RUNNING)
            c.cancel(job.id)
    finally:
        d.stop()
        remove_home(d.home)


def test_cancel_racing_the_start_never_hurts_the_daemon(client, daemon):
    for _ in range(30):
        job = client.enqueue(job_type="sleep", payload={"seconds": 5})
        client.cancel(job.id)
    assert daemon.proc.poll() is None
    assert client.health().ok
    assert run_to_end(client, job_type="noop").state is State.DONE


def test_no_job_counts_as_running_before_its_process_is_recorded():
    # SPEC §4. A fresh daemon has no zygote and no WARM worker yet: the first jobs of
    # each mode wait QUEUED while one starts, and are claimed with its PID.
    d = start_daemon(SEMANTICA_WORKERS="2")
    try:
        with d.client() as c:
            jobs = [
                c.enqueue(
                    job_type="sleep",
                    payload={"seconds": 0.05},
                    execution_mode=("WARM", "SUBPROCESS")[i % 2],
                ).id
                for i in range(8)
            ]
            seen_running, without_pid = set(), []
            deadline = time.monotonic() + 30
            while len(done := [j for j in jobs if c.get(j).is_terminal]) < len(jobs):
                assert time.monotonic() < deadline, f"only {len(done)} of the jobs ended"
                for job_id in jobs:
                    job = c.get(job_id)
                    if job.state is State.RUNNING:
                        seen_running.add(job_id)
                        if job.runner_pid is None:
                            without_pid.append(job_id)
            assert seen_running  # the check saw jobs running
            assert not without_pid, f"RUNNING without a runner_pid: {sorted(set(without_pid))}"
            assert {c.get(j).state for j in jobs} == {State.DONE}
    finally:
        d.stop()
        remove_home(d.home)


@pytest.mark.parametrize("order", ["priority", "age"])
def test_a_job_waiting_for_its_process_keeps_its_place(order):
    # SPEC §5 order holds while the best job's process is got ready: a WARM job (no
    # worker yet) ahead of a SUBPROCESS one (whose spare is there) starts first.
    d = start_daemon(SEMANTICA_WORKERS="1")
    try:
        with d.client() as c:
            run_to_end(c, job_type="noop", execution_mode="SUBPROCESS")  # the zygote is up
            c.pause("q")
            first = c.enqueue(
                queue="q",
                job_type="noop",
                execution_mode="WARM",
                priority=10 if order == "priority" else 0,
            )
            second = c.enqueue(queue="q", job_type="noop", execution_mode="SUBPROCESS")
            c.resume("q")
            first, second = (c.wait(j.id, timeout_ms=20_000) for j in (first, second))
            assert first.state is second.state is State.DONE
            assert first.started_at <= second.started_at
    finally:
        d.stop()
        remove_home(d.home)


def test_a_job_waiting_for_its_process_says_so():
    # The zygote takes a good part of a second to start: meanwhile the job is ready
    # and QUEUED, and its waiting_reason says what it waits for.
    d = start_daemon()
    try:
        with d.client() as c:
            job = c.enqueue(job_type="noop", execution_mode="SUBPROCESS")
            reasons = []
            while (now := c.get(job.id)).state is State.QUEUED:
                reasons.append(now.waiting_reason)
            assert (
                "ready: it starts once its process is there "
                "(the zygote that forks runner processes is starting)"
            ) in reasons
            assert now.runner_pid is not None
    finally:
        d.stop()
        remove_home(d.home)


@pytest.mark.parametrize("mode", ["SUBPROCESS", "WARM"])
def test_a_daemon_stopped_while_a_jobs_process_starts_stops_cleanly(mode):
    # SIGTERM while the job waits for its process (the zygote or a WARM worker being
    # started in the background): the daemon drains, exits 0, and logs no error.
    d = start_daemon()
    try:
        with d.client() as c:
            job = c.enqueue(job_type="noop", execution_mode=mode)
            # Its process is on its way (the zygote still imports the plugins).
            deadline = time.monotonic() + 10
            while not psutil.Process(d.proc.pid).children() and c.get(job.id).state is State.QUEUED:
                assert time.monotonic() < deadline
                time.sleep(0.001)
        code = d.stop()
        log = d.log()
        assert code == 0, log
        assert "Traceback" not in log and '"level":"error"' not in log, log
        store = Store.open(d.home / "meta.db")
        try:
            assert store.get(job.id).state in (State.QUEUED, State.DONE)
        finally:
            store.close()
    finally:
        remove_home(d.home)


def test_a_memory_hog_is_stopped_by_the_address_space_limit():
    d = start_daemon(SEMANTICA_RUNNER_MEMORY_MB="512")
    try:
        with d.client() as c:
            for mode in ("SUBPROCESS", "WARM"):
                job = run_to_end(
                    c,
                    job_type="fail",
                    payload={"mode": "memory"},
                    max_attempts=1,
                    execution_mode=mode,
                )
                assert job.state is State.FAILED and job.error_kind == "exception", job
                assert "MemoryError" in job.error_message
            # The runner's limit, not the daemon's: the daemon and the next job are fine.
            assert run_to_end(c, job_type="noop").state is State.DONE
    finally:
        d.stop()
        remove_home(d.home)


def test_the_open_files_limit_applies_to_jobs():
    d = start_daemon(SEMANTICA_RUNNER_MAX_FILES="64")
    try:
        with d.client() as c:
            job = run_to_end(
                c, job_type="python", payload={"callable": "resource:getrlimit", "args": [7]}
            )
            assert job.result_summary == [64, 64]  # RLIMIT_NOFILE
    finally:
        d.stop()
        remove_home(d.home)


THIRD_PARTY_PLUGIN = """\
import os


def greet(ctx):
    ctx.progress(1.0, "greeted")
    return {"hello": ctx.payload.get("who"), "pythonpath": os.environ.get("PYTHONPATH")}
"""


@pytest.mark.parametrize("zygote", ["on", "off"])
def test_a_third_party_plugin_from_a_temporary_package_runs(tmp_path, zygote):
    site = tmp_path / "site"
    dist = site / "semantica_greeter-2.5.dist-info"
    dist.mkdir(parents=True)
    (site / "semantica_greeter.py").write_text(THIRD_PARTY_PLUGIN)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: semantica-greeter\nVersion: 2.5\n")
    (dist / "entry_points.txt").write_text("[semantica.runners]\nGreet = semantica_greeter:greet\n")
    # Installed for the daemon only through its PYTHONPATH, which is not allowlisted.
    d = start_daemon(PYTHONPATH=str(site), SEMANTICA_ZYGOTE=zygote)
    try:
        with d.client() as c:
            runners = {r.name: r for r in c.runners().runners}
            assert runners["greet"].distribution == "semantica-greeter"
            assert runners["greet"].version == "2.5"
            assert runners["greet"].target == "semantica_greeter:greet"
            for mode in ("SUBPROCESS", "WARM"):
                job = run_to_end(c, job_type="GREET", payload={"who": mode}, execution_mode=mode)
                assert job.state is State.DONE, (job, log_text(c, job.id))
                # The runner found the plugin; the job's environment stays the allowlist's.
                assert job.result_summary == {"hello": mode, "pythonpath": None}
                assert job.progress == 1.0 and job.progress_message == "greeted"
    finally:
        d.stop()
        remove_home(d.home)
