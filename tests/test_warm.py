"""WARM mode: runner processes reused across jobs, each job still in its own
environment, directory and log; recycled after N jobs, past a memory ceiling, or when
a job leaves a process behind; replaced when one dies, overruns or is cancelled."""

from __future__ import annotations

import contextlib
import os
import textwrap
import time

import psutil
import pytest
from harness import helper_module, remove_home, start_daemon

import semantica
from semantica.domain import Job, State

MAX_JOBS = 3


@pytest.fixture(scope="module")
def daemon():
    d = start_daemon(SEMANTICA_WORKERS="1", SEMANTICA_WARM_MAX_JOBS=str(MAX_JOBS))
    yield d
    d.stop()
    remove_home(d.home)


@pytest.fixture
def client(daemon):
    with daemon.client() as c:
        yield c


HELPERS_SOURCE = textwrap.dedent(
    """
    import sys, threading, time

    def leave_thread():
        def tick():
            for n in range(40):
                print("tick", n, "of a thread an earlier job left", flush=True)
                time.sleep(0.05)
        threading.Thread(target=tick, name="left-by-job").start()

    def close_sys_stdout():
        sys.stdout.close()

    def close_sys_stderr():
        sys.stderr.close()

    def log_it(ctx, text):
        ctx.logger.info(text)
        return text

    def path_length():
        return len(sys.path)

    def say(text):
        print(text, flush=True)
        return text
    """
)


@pytest.fixture(scope="module")
def helpers(tmp_path_factory):
    return helper_module(tmp_path_factory, "warm_helpers", HELPERS_SOURCE)


def helper(helpers, name, *args):
    return {"callable": f"warm_helpers:{name}", "sys_path": [helpers], "args": list(args)}


def run(client, job_type="python", **fields):
    job = client.enqueue(job_type=job_type, execution_mode="WARM", **fields)
    return client.wait(job.id, timeout_ms=20_000)


def pid_of_worker(client) -> int:
    job = run(client, payload={"callable": "os:getpid"})
    assert job.state is State.DONE, job
    return job.result_summary


def fresh_worker(client) -> int:
    """Start the next test on a worker that has run no job yet."""
    first = pid_of_worker(client)
    while True:
        pid = pid_of_worker(client)
        if pid != first:
            return pid
        first = pid


def test_a_worker_runs_max_jobs_then_is_replaced(client):
    pid = fresh_worker(client)
    assert [pid_of_worker(client) for _ in range(MAX_JOBS - 1)] == [pid] * (MAX_JOBS - 1)
    assert pid_of_worker(client) != pid


def test_each_job_gets_its_own_env_directory_and_log(client, daemon):
    fresh_worker(client)
    lang = run(client, payload={"callable": "os:getenv", "args": ["LANG"]}, env={"LANG": "xx_A"})
    plain = run(client, payload={"callable": "os:getenv", "args": ["LANG"]})
    assert lang.result_summary == "xx_A" and plain.result_summary != "xx_A"
    cwd = run(client, payload={"callable": "os:getcwd"})
    assert cwd.result_summary == str(daemon.home / "work" / cwd.id)
    a = run(client, job_type="shell", payload={"argv": ["echo", "output of A"]})
    b = run(client, job_type="shell", payload={"argv": ["echo", "output of B"]})
    log_a = (daemon.home / "logs" / f"{a.id}.log").read_text()
    log_b = (daemon.home / "logs" / f"{b.id}.log").read_text()
    assert "output of A" in log_a and "output of B" not in log_a
    assert "output of B" in log_b and "output of A" not in log_b


def log_of(daemon, job: Job) -> str:
    return (daemon.home / "logs" / f"{job.id}.log").read_text()


def test_a_job_that_closes_its_stdout_leaves_the_next_ones_their_output(client, daemon, helpers):
    """The next job's log opened on the freed fd 1, and the dup2 onto 1 then closed
    it: every later job on that worker lost its output (a bug, fixed). Each pair runs
    on one worker: a fresh one's second and third jobs (MAX_JOBS is 3)."""
    fresh_worker(client)
    closed = run(client, payload={"callable": "os:close", "args": [1]}, max_attempts=1)
    assert closed.state is State.DONE, closed
    echo = run(
        client, job_type="shell", payload={"argv": ["echo", "after fd 1 closed"]}, max_attempts=1
    )
    assert echo.state is State.DONE, log_of(daemon, echo)
    assert "after fd 1 closed" in log_of(daemon, echo)
    fresh_worker(client)
    run(client, payload=helper(helpers, "close_sys_stdout"), max_attempts=1)
    said = run(client, payload=helper(helpers, "say", "after sys.stdout closed"), max_attempts=1)
    assert said.state is State.DONE, log_of(daemon, said)
    assert "after sys.stdout closed" in log_of(daemon, said)
    fresh_worker(client)
    run(client, payload=helper(helpers, "close_sys_stderr"), max_attempts=1)
    logged = run(
        client,
        payload={**helper(helpers, "log_it", "after sys.stderr closed"), "pass_context": True},
        max_attempts=1,
    )
    text = log_of(daemon, logged)
    assert "INFO semantica.job: after sys.stderr closed" in text and "Logging error" not in text


def test_each_job_starts_with_umask_077_and_the_workers_limits(client):
    fresh_worker(client)
    umask = {"callable": "os:umask", "args": [0]}
    assert [run(client, payload=umask).result_summary for _ in range(2)] == [0o077, 0o077]
    nofile = {"callable": "resource:getrlimit", "args": [7]}  # RLIMIT_NOFILE
    soft, hard = run(client, payload=nofile).result_summary
    lowered = {"callable": "resource:setrlimit", "args": [7, [16, hard]]}
    assert run(client, payload=lowered).state is State.DONE
    assert run(client, payload=nofile).result_summary == [soft, hard]


def test_a_python_jobs_sys_path_is_its_own(client, helpers):
    """The python runner put each job's sys_path in front of sys.path and left it
    there: on a WARM worker sys.path grew with every such job (fixed)."""
    fresh_worker(client)
    lengths = [run(client, payload=helper(helpers, "path_length")).result_summary for _ in range(2)]
    assert lengths[0] == lengths[1], lengths


def test_a_job_that_leaves_a_thread_running_retires_its_worker(client, daemon, helpers):
    pid = fresh_worker(client)
    left = run(client, payload=helper(helpers, "leave_thread"))
    assert left.state is State.DONE, log_of(daemon, left)
    assert "this worker retires after the job: it left threads running (left-by-job)" in (
        log_of(daemon, left)
    )
    after = run(client, job_type="shell", payload={"argv": ["sleep", "0.3"]})
    assert "tick" not in log_of(daemon, after)
    assert pid_of_worker(client) != pid
    told = [line for line in daemon.log().splitlines() if left.id in line]
    assert any("warm_worker_recycled" in line and "left threads running" in line for line in told)


def test_threads_a_plugin_starts_as_it_is_imported_are_not_a_jobs_leftovers():
    """A plugin's own threads (an exporter started on import) must not retire the
    worker after every job; a thread a job starts does."""
    import threading

    from semantica import runner

    baseline = runner._WorkerState.capture()
    stop = threading.Event()
    thread = threading.Thread(target=stop.wait, name="exporter", daemon=True)
    thread.start()
    try:
        assert baseline.left_behind() == "it left threads running (exporter)"
        runner._plugin_threads.add(thread.ident)
        assert baseline.left_behind() is None
    finally:
        runner._plugin_threads.discard(thread.ident)
        stop.set()
        thread.join()


def test_a_worker_that_dies_is_replaced(client):
    pid = fresh_worker(client)
    killed = run(client, job_type="fail", payload={"mode": "signal"}, max_attempts=1)
    assert killed.state is State.FAILED and killed.error_kind == "signal"
    assert pid_of_worker(client) != pid


def test_a_deadline_overrun_kills_the_worker(client):
    pid = fresh_worker(client)
    slow = run(client, job_type="sleep", payload={"seconds": 10}, deadline_ms=300, max_attempts=1)
    assert slow.error_kind == "deadline"
    assert pid_of_worker(client) != pid


def wait_until_running(client, job_id, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not ((job := client.get(job_id)).state is State.RUNNING and job.runner_pid):
        assert time.monotonic() < deadline, f"never started: {job}"
        time.sleep(0.005)
    return job


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_gone(pids, timeout=5.0) -> None:
    deadline = time.monotonic() + timeout
    while alive := [pid for pid in pids if running(pid)]:
        assert time.monotonic() < deadline, f"still running: {alive}"
        time.sleep(0.01)


def test_cancelling_a_running_warm_job_stops_it(daemon, client):
    pid_of_worker(client)  # a worker is up and waiting: the job starts at once on one
    up = {p.pid for p in psutil.Process(daemon.proc.pid).children(recursive=True)}
    job = client.enqueue(job_type="sleep", execution_mode="WARM", payload={"seconds": 30})
    try:
        worker = wait_until_running(client, job.id).runner_pid
        # A worker that was waiting, not one started for it (which of the waiting
        # ones depends on what the tests before left in the pool).
        assert worker in up
        deadline = time.monotonic() + 5
        while not any(line.endswith(": sleep") for line in client.logs(job.id).lines):
            assert time.monotonic() < deadline, "the job never started on the worker"
            time.sleep(0.005)
        started = time.monotonic()
        client.cancel(job.id)
        assert client.wait(job.id, timeout_ms=10_000).state is State.CANCELLED
        wait_gone([worker])  # the worker that ran it is stopped, not reused
        assert time.monotonic() - started < 1.5  # it stops on SIGTERM, no grace to wait out
        assert pid_of_worker(client) not in (worker, 0)  # the pool carries on
    finally:  # a failure above must not leave the module's one worker slot taken
        with contextlib.suppress(semantica.SemanticaError):
            client.cancel(job.id)


def test_cancelling_a_warm_job_stops_the_processes_it_started(client):
    job = client.enqueue(
        job_type="shell", execution_mode="WARM", payload={"argv": ["sh", "-c", "sleep 30; :"]}
    )
    worker = wait_until_running(client, job.id).runner_pid
    deadline = time.monotonic() + 5
    while len(work := psutil.Process(worker).children(recursive=True)) < 2:  # sh, sleep
        assert time.monotonic() < deadline, "the job's command never started"
        time.sleep(0.005)
    client.cancel(job.id)
    assert client.wait(job.id, timeout_ms=10_000).state is State.CANCELLED
    wait_gone([worker, *(p.pid for p in work)])


def test_a_job_that_leaves_a_process_behind_retires_its_worker(client):
    pid = fresh_worker(client)
    left = run(client, job_type="shell", payload={"argv": ["sh", "-c", "sleep 30 &"]})
    assert left.state is State.DONE
    assert pid_of_worker(client) != pid


def test_a_worker_past_its_memory_ceiling_is_not_reused():
    d = start_daemon(SEMANTICA_WORKERS="1", SEMANTICA_WARM_MAX_RSS_MB="1")
    try:
        with d.client() as c:
            pids = [pid_of_worker(c) for _ in range(3)]
        assert len(set(pids)) == 3
    finally:
        d.stop()
        remove_home(d.home)


def test_a_worker_signalled_by_its_own_job_is_not_given_the_next_one():
    """A job may SIGTERM its worker (`kill -TERM $PPID`, a shell's `trap 'kill 0'`):
    the worker finishes that job, says it is leaving, and the daemon does not hand it
    another job (which would fail with 'exited without a result')."""
    d = start_daemon(SEMANTICA_WORKERS="1")
    try:
        with d.client() as c:

            def run(job_type: str, payload: dict) -> Job:
                job = c.enqueue(
                    job_type=job_type, execution_mode="WARM", payload=payload, max_attempts=1
                )
                return c.wait(job.id, timeout_ms=20_000)

            first = run("python", {"callable": "os:getpid"})
            signaller = run("shell", {"argv": ["sh", "-c", "kill -TERM $PPID; sleep 0.2"]})
            after = run("python", {"callable": "os:getpid"})
        assert first.state is State.DONE
        assert signaller.state in (State.DONE, State.FAILED)  # its own business
        assert after.state is State.DONE, (after.error_kind, after.error_message)
        assert after.result_summary != first.result_summary  # a new worker ran it
    finally:
        d.stop()
        remove_home(d.home)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_a_warm_worker_runs_as_batch_work(client):
    # So that handing it a job does not preempt the daemon on its CPU.
    job = run(client, payload={"callable": "os:sched_getscheduler", "args": [0]})
    assert job.state is State.DONE and job.result_summary == os.SCHED_BATCH


def test_a_new_workers_start_is_not_counted_in_its_first_jobs_deadline():
    """A WARM worker joins the pool once it says it is ready (its interpreter
    started, its plugins loaded): a job with a deadline shorter than that start
    (about 100 ms here) used to fail on every fresh worker, and killed it."""
    d = start_daemon(SEMANTICA_WORKERS="1")
    try:
        with d.client() as c:
            for _ in range(2):
                job = c.enqueue(
                    job_type="noop", execution_mode="WARM", deadline_ms=50, max_attempts=1
                )
                job = c.wait(job.id, timeout_ms=20_000)
                assert job.state is State.DONE, (job.error_kind, job.error_message)
                assert job.finished_at - job.started_at < 50
    finally:
        d.stop()
        remove_home(d.home)


async def test_a_workers_readiness_is_its_ready_line_and_eof_is_not():
    import trio

    from semantica.launcher import MessageReader

    for lines, ready in (
        (b'{"type":"progress","fraction":0.5}\n{"type":"ready"}\n', True),
        (b"", False),
    ):
        read_fd, write_fd = os.pipe()
        os.write(write_fd, lines)
        os.close(write_fd)
        reader = MessageReader(trio.lowlevel.FdStream(read_fd))
        with trio.fail_after(5):
            assert await reader.wait_ready() is ready
        await reader.stream.aclose()
