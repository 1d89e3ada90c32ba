"""SUBPROCESS jobs are forked by the runner zygote: still a fresh process per job, with
the job's own environment and sandbox; the daemon carries on if the zygote dies, and
`SEMANTICA_ZYGOTE=off` starts a new interpreter per job instead."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
import textwrap
import time
from collections.abc import Iterator

import psutil
import pytest
from harness import (
    Daemon,
    daemon_env,
    helper_module,
    live_group_members,
    make_home,
    remove_home,
    running_as_nobody,
    start_daemon,
)

from semantica.domain import State

NOBODY = 65534
SPARES = 2  # forked ahead by the zygote of a daemon with two workers: one per slot
SLOTS = 48  # processes and threads the limited daemon's runners may add for user nobody

# For the `python` runner: take every process slot the limit leaves, and hold them.
HOLDER_SOURCE = textwrap.dedent(
    """
    import os
    import signal
    import time


    def hold_a_slot():  # fork a child that sleeps, holding a slot; False at the limit
        try:
            pid = os.fork()
        except BlockingIOError:
            return False
        if pid == 0:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            time.sleep(60)
            os._exit(0)
        return True


    def fill_process_slots(ctx, most):
        forked = 0

        def count_one():
            nonlocal forked
            forked += 1
            if forked >= most:
                raise RuntimeError("the process limit never stopped the forks")

        while hold_a_slot():
            count_one()
        ctx.progress(1.0, f"holding {forked} processes")
        while not ctx.cancelled():  # and take each slot that frees up
            if hold_a_slot():
                count_one()
            else:
                time.sleep(0.001)
        return forked
    """
)


@pytest.fixture(scope="module")
def daemon():
    d = start_daemon(SEMANTICA_WORKERS="2", DAEMON_SECRET="hunter2")
    yield d
    d.stop()
    remove_home(d.home)


def call(client, callable_: str, *args, **fields):
    job = client.enqueue(
        job_type="python", payload={"callable": callable_, "args": list(args)}, **fields
    )
    done = client.wait(job.id, timeout_ms=20_000)
    assert done.state is State.DONE, done
    return done.result_summary


def test_each_job_is_a_fresh_process_forked_by_the_zygote(daemon):
    with daemon.client() as c:
        pids = [call(c, "os:getpid") for _ in range(3)]
        parents = {call(c, "os:getppid") for _ in range(3)}
    assert len(set(pids)) == 3
    (zygote,) = parents
    assert zygote != daemon.proc.pid
    assert psutil.Process(zygote).ppid() == daemon.proc.pid
    assert "semantica.zygote" in " ".join(psutil.Process(zygote).cmdline())


FD_LISTER = textwrap.dedent(
    """
    import os


    def open_fds():
        found = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                found[fd] = os.readlink(f"/proc/self/fd/{fd}")
            except OSError:  # the directory listing's own fd, closed by now
                pass
        return found
    """
)


def test_a_forked_runner_holds_none_of_the_zygotes_descriptors(daemon, tmp_path):
    """Its stdin, log, result pipe: not the zygote's sockets, pipes or its pidfd of
    the daemon (with which a job could signal the daemon)."""
    (tmp_path / "fdlister.py").write_text(FD_LISTER)
    with daemon.client() as c:
        for _ in range(3):  # on a spare, and on a child forked for itself
            job = c.enqueue(
                job_type="python",
                payload={"callable": "fdlister:open_fds", "sys_path": [str(tmp_path)]},
            )
            done = c.wait(job.id, timeout_ms=20_000)
            assert done.state is State.DONE, done
            targets = done.result_summary
            assert not [t for t in targets.values() if "pidfd" in t or "socket" in t], targets
            assert targets["1"].endswith(f"{job.id}.log") and targets["2"] == targets["1"]


def test_a_forked_runner_starts_with_the_plugins_loaded_and_not_their_discovery(daemon):
    """The zygote imports every plugin, but reads the entry points in a throwaway
    child: importlib.metadata (email, zipfile, csv...) would add megabytes to the heap
    whose page tables each fork copies."""
    with daemon.client() as c:
        loaded = [
            call(c, "sys:modules.__contains__", name)
            for name in ("semantica_runners.index_file", "semantica_runners.shell")
        ]
        assert loaded == [True, True]
        assert call(c, "sys:modules.__contains__", "importlib.metadata") is False


def test_a_forked_runner_has_the_jobs_sandbox(daemon):
    with daemon.client() as c:
        assert call(c, "os:getenv", "DAEMON_SECRET") is None
        assert call(c, "os:getenv", "LANG", env={"LANG": "xx_TEST"}) == "xx_TEST"
        # Its own session, process group and umask: the shell's parent is the runner.
        script = 'set -- $(cat /proc/$$/stat); echo "session=$6 runner=$4 umask=$(umask)"'
        job = c.enqueue(job_type="shell", payload={"argv": ["sh", "-c", script]})
        assert c.wait(job.id, timeout_ms=20_000).state is State.DONE
        line = next(x for x in c.logs(job.id).lines if x.startswith("session="))
    fields = dict(kv.split("=") for kv in line.split())
    assert fields["session"] == fields["runner"] and fields["umask"] == "0077"


def test_warm_workers_are_forked_by_the_zygote_with_the_workers_sandbox(daemon, tmp_path):
    """A WARM worker starts in a fork of the zygote, not a new interpreter (100 ms
    and more): its own session, the allowlisted environment, umask 077, none of the
    zygote's descriptors, and each job's output in that job's log."""
    (tmp_path / "fdlister.py").write_text(FD_LISTER)
    with daemon.client() as c:
        zygote = call(c, "os:getppid")
        worker = call(c, "os:getpid", execution_mode="WARM")
        assert call(c, "os:getppid", execution_mode="WARM") == zygote
        assert call(c, "os:getpid", execution_mode="WARM") == worker  # reused
        assert call(c, "os:getsid", 0, execution_mode="WARM") == worker
        assert call(c, "os:getenv", "DAEMON_SECRET", execution_mode="WARM") is None
        script = 'echo "umask=$(umask)"'
        job = c.enqueue(
            job_type="shell", payload={"argv": ["sh", "-c", script]}, execution_mode="WARM"
        )
        assert c.wait(job.id, timeout_ms=20_000).state is State.DONE
        assert "umask=0077" in c.logs(job.id).lines
        job = c.enqueue(
            job_type="python",
            payload={"callable": "fdlister:open_fds", "sys_path": [str(tmp_path)]},
            execution_mode="WARM",
        )
        done = c.wait(job.id, timeout_ms=20_000)
    assert done.state is State.DONE, done
    targets = done.result_summary
    assert not [t for t in targets.values() if "pidfd" in t or "socket" in t], targets
    assert targets["1"].endswith(f"{job.id}.log") and targets["2"] == targets["1"]
    assert psutil.Process(worker).ppid() == zygote


def wait_gone(pid: int, message: str, timeout: float = 10.0) -> None:
    """Wait until `pid` has exited (a zombie counts: its parent may be gone too)."""
    deadline = time.monotonic() + timeout
    while psutil.pid_exists(pid) and psutil.Process(pid).status() != "zombie":
        assert time.monotonic() < deadline, message
        time.sleep(0.01)


def test_warm_workers_die_with_the_zygote_and_new_ones_take_over(daemon):
    """The zygote's end kills its WARM workers (their parent-death signal): the
    attempt running then fails as killed, to be retried by the policy; the next jobs
    get new workers, forked by a new zygote."""
    with daemon.client() as c:
        worker = call(c, "os:getpid", execution_mode="WARM")
        zygote = psutil.Process(worker).ppid()
        job = c.enqueue(
            job_type="sleep", payload={"seconds": 30}, execution_mode="WARM", max_attempts=1
        )
        deadline = time.monotonic() + 10
        while c.get(job.id).state is not State.RUNNING:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(zygote, signal.SIGKILL)
        wait_gone(worker, "the WARM worker outlived its zygote")
        ended = c.wait(job.id, timeout_ms=20_000)
        assert (ended.state, ended.error_kind) == (State.FAILED, "signal"), ended
        later = call(c, "os:getpid", execution_mode="WARM")
        assert later != worker
        assert psutil.Process(later).ppid() not in (zygote, daemon.proc.pid)


@pytest.mark.parametrize("killed", ["worker", "zygote"])
def test_an_idle_warm_worker_that_died_is_not_handed_a_job(daemon, killed):
    """Killed while it waited, or gone with its zygote: the next WARM job gets a new
    worker and runs on its first attempt, instead of failing with the dead one."""
    with daemon.client() as c:
        worker = call(c, "os:getpid", execution_mode="WARM")
        os.kill(worker if killed == "worker" else psutil.Process(worker).ppid(), signal.SIGKILL)
        wait_gone(worker, f"the worker {worker} is still there")
        time.sleep(0.05)  # and its exit reported to the daemon
        job = c.enqueue(
            job_type="python",
            payload={"callable": "os:getpid"},
            execution_mode="WARM",
            max_attempts=1,
        )
        done = c.wait(job.id, timeout_ms=20_000)
    assert (done.state, done.attempt) == (State.DONE, 1), done
    assert done.result_summary != worker
    assert "warm_worker_gone" in daemon.log_path.read_text()


def test_the_daemon_carries_on_when_the_zygote_dies(daemon):
    with daemon.client() as c:
        zygote = call(c, "os:getppid")
        os.kill(zygote, signal.SIGKILL)
        wait_gone(zygote, "the zygote outlived its SIGKILL")
        # The next job notices, runs all the same, and a new zygote takes over.
        assert call(c, "os:getpid") > 0
        later = call(c, "os:getppid")
    assert later != zygote


def test_zygote_off_starts_a_new_interpreter_per_job():
    d = start_daemon(SEMANTICA_ZYGOTE="off")
    try:
        with d.client() as c:
            assert call(c, "os:getppid") == d.proc.pid
            if hasattr(os, "SCHED_BATCH"):  # batch work on this path too
                assert call(c, "os:sched_getscheduler", 0) == os.SCHED_BATCH
            # And a WARM worker is a new interpreter of its own.
            worker = call(c, "os:getpid", execution_mode="WARM")
            assert psutil.Process(worker).ppid() == d.proc.pid
            assert "--warm" in psutil.Process(worker).cmdline()
            assert call(c, "os:getpid", execution_mode="WARM") == worker
    finally:
        d.stop()
        remove_home(d.home)


# ------------------------------------------------------------- at the process limit
#
# RLIMIT_NPROC counts every process and thread of the real user, and the kernel does
# not enforce it for root (nor with CAP_SYS_RESOURCE or CAP_SYS_ADMIN). So these tests
# run the daemon as `nobody`, whose processes are few, with room for SLOTS more. The
# interpreter and the test's files belong to root (/root is 0700 here): the daemon
# keeps CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH to reach them, and no capability that
# lifts the limit.


def nobody_processes() -> list[tuple[int, str, int]]:
    """(pid, state, threads) of every process whose real user is nobody, zombies too."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                fields = dict(line.split(":\t", 1) for line in f if ":\t" in line)
        except OSError:
            continue
        if int(fields["Uid"].split()[0]) == NOBODY:
            found.append((int(name), fields["State"].split()[0], int(fields["Threads"])))
    return found


@pytest.fixture
def limited(tmp_path_factory):
    setpriv = shutil.which("setpriv")
    if sys.platform != "linux" or os.geteuid() != 0 or setpriv is None:
        pytest.skip(
            "the process limit is per user and not enforced for root: this needs root "
            "and setpriv(1) to run the daemon as nobody"
        )
    with running_as_nobody():
        yield from _limited_daemon(tmp_path_factory, setpriv)


def _limited_daemon(tmp_path_factory, setpriv: str) -> Iterator[Daemon]:
    home = make_home()
    as_nobody = home.parent / "python-as-nobody"
    caps = "+dac_override,+dac_read_search"
    as_nobody.write_text(
        f"#!/bin/sh\nexec {shlex.quote(setpriv)} --reuid={NOBODY} --regid={NOBODY} "
        f"--clear-groups --inh-caps={caps} --ambient-caps={caps} "
        f'{shlex.quote(sys.executable)} "$@"\n'
    )
    as_nobody.chmod(0o755)
    limit = sum(threads for _pid, _state, threads in nobody_processes()) + SLOTS
    env = daemon_env(home, SEMANTICA_WORKERS="2", SEMANTICA_RUNNER_MAX_PROCESSES=str(limit))
    d = Daemon(home, env, [])
    try:  # stopped before the lock is let go, even when it did not start
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(sys, "executable", str(as_nobody))  # what the harness starts
            d.start()
        d.helpers = helper_module(tmp_path_factory, "holder", HOLDER_SOURCE)
        yield d
    finally:
        d.stop()
        remove_home(home)


def only_daemon_and_zygote_left(d: Daemon, zygote: int, timeout: float = 1.0) -> None:
    """Wait until nobody's processes are the daemon, its zygote and at most the
    zygote's spares (processes forked ahead for the next jobs: each in a session of
    its own, with no children): not one process of the jobs is left, not even a
    zombie holding a process slot. (What a job forks stays in the job's session.)"""
    deadline = time.monotonic() + timeout
    while True:
        left = {pid for pid, _state, _threads in nobody_processes()} - {d.proc.pid, zygote}
        if len(left) <= SPARES and all(is_spare(pid, zygote) for pid in left):
            return
        assert time.monotonic() < deadline, f"left: {nobody_processes()}"
        time.sleep(0.01)


def is_spare(pid: int, zygote: int) -> bool:
    """Whether `pid` is the zygote's spare: its child in a session of its own, with no
    children, whose stdout is still the zygote's (/dev/null): a runner's is its log."""
    try:
        proc = psutil.Process(pid)
        return (
            proc.ppid() == zygote
            and os.getsid(pid) == pid
            and not proc.children()
            and os.readlink(f"/proc/{pid}/fd/1") == os.devnull
        )
    except (psutil.Error, OSError):
        return False


def test_a_fork_bomb_is_contained_by_the_process_limit(limited):
    with limited.client() as c:
        zygote = call(c, "os:getppid")
        started = time.monotonic()
        job = c.enqueue(
            job_type="fail",
            payload={"mode": "fork", "max": 4 * SLOTS},  # a bound, should the limit fail
            deadline_ms=3000,
            max_attempts=1,
        )
        ended = c.wait(job.id, timeout_ms=20_000)
        assert ended.state is State.FAILED and ended.error_kind == "exception", ended
        assert "BlockingIOError" in ended.error_message  # fork() refused: EAGAIN
        assert time.monotonic() - started < 2.5  # stopped by the limit, not the deadline
        only_daemon_and_zygote_left(limited, zygote)
        assert limited.proc.poll() is None and c.health().ok
        assert call(c, "os:getppid") == zygote  # the same zygote forks the next job


def test_the_zygote_survives_a_fork_refused_at_the_process_limit(limited):
    with limited.client() as c:
        zygote = call(c, "os:getppid")
        holder = c.enqueue(
            job_type="python",
            payload={
                "callable": "holder:fill_process_slots",
                "pass_context": True,
                "sys_path": [limited.helpers],
                "args": [4 * SLOTS],
            },
            max_attempts=1,
        )
        deadline = time.monotonic() + 10
        while (got := c.get(holder.id)).progress != 1.0:
            assert not got.is_terminal, got
            assert time.monotonic() < deadline, got
            time.sleep(0.005)
        # Every slot is taken: the zygote's fork for a job fails, and only that job's.
        # (Some may run first: on the spares forked before the slots were taken.)
        for _ in range(SPARES + 2):
            refused = c.enqueue(job_type="noop", max_attempts=1)
            ended = c.wait(refused.id, timeout_ms=10_000)
            if ended.state is not State.DONE:
                break
        assert (ended.state, ended.error_kind) == (State.FAILED, "spawn"), ended
        assert "fork failed" in ended.error_message and "temporarily" in ended.error_message
        assert psutil.Process(zygote).status() != psutil.STATUS_ZOMBIE
        c.cancel(holder.id)
        assert c.wait(holder.id, timeout_ms=10_000).state is State.CANCELLED
        only_daemon_and_zygote_left(limited, zygote)
        assert call(c, "os:getppid") == zygote


def _running_runner(client, job_id: str, timeout: float = 10.0) -> int:
    """The runner's pid once it runs the job: recorded (it may be the zygote's spare,
    recorded with the claim before it has the job) and its first log line written."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(job_id)
        if job.state is State.RUNNING and job.runner_pid and client.logs(job_id).lines:
            return job.runner_pid
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} never started: {client.get(job_id)}")


def _wait_gone(pgid: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while (left := live_group_members(pgid)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


def spares_of(zygote: int, timeout: float = 5.0) -> set[int]:
    """The zygote's spares (forked ahead for the next jobs), once all are forked."""
    deadline = time.monotonic() + timeout
    while (
        len(found := {c.pid for c in psutil.Process(zygote).children() if is_spare(c.pid, zygote)})
        < SPARES
    ):
        assert time.monotonic() < deadline, f"the zygote has {len(found)} spares"
        time.sleep(0.01)
    return found


def test_the_next_jobs_run_on_the_spares_forked_ahead(daemon):
    with daemon.client() as c:
        zygote = call(c, "os:getppid")
        spares = spares_of(zygote)
        assert call(c, "os:getpid") in spares
        new_spares = spares_of(zygote)
        assert len(new_spares - spares) == 1  # the one used is replaced
        # Recorded with the job's claim: the job is never RUNNING without its process.
        job = c.enqueue(job_type="sleep", payload={"seconds": 30}, max_attempts=1)
        while (running := c.get(job.id)).state is State.QUEUED:
            time.sleep(0.005)
        assert running.state is State.RUNNING and running.runner_pid in new_spares
        c.cancel(job.id)


def test_a_spare_killed_while_it_waits_is_replaced(daemon):
    with daemon.client() as c:
        zygote = call(c, "os:getppid")
        spares = spares_of(zygote)
        for spare in spares:
            os.kill(spare, signal.SIGKILL)
        for spare in spares:
            while psutil.pid_exists(spare):  # reaped by the zygote; no job saw it
                time.sleep(0.01)
        new_spares = spares_of(zygote)  # forked again while the daemon sat idle
        assert not new_spares & spares
        # The claim records a live spare, not one the daemon knew before the kill.
        job = c.enqueue(job_type="sleep", payload={"seconds": 30}, max_attempts=1)
        while (running := c.get(job.id)).state is State.QUEUED:
            time.sleep(0.005)
        assert running.state is State.RUNNING and running.runner_pid in new_spares
        c.cancel(job.id)
        assert call(c, "os:getppid") == zygote


def test_a_killed_daemon_takes_its_forked_runners_and_their_children_along():
    # No restart here: the zygote notices the daemon is gone and stops every runner's
    # whole group, the background `sleep` the job started included, and its spare.
    d = start_daemon(SEMANTICA_WORKERS="2")
    try:
        with d.client() as c:
            job = c.enqueue(job_type="shell", payload={"argv": ["sh", "-c", "sleep 60 & wait"]})
            runner = _running_runner(c, job.id)
            deadline = time.monotonic() + 5
            while len(live_group_members(runner)) < 3:  # the runner, sh, and the sleep
                assert time.monotonic() < deadline, live_group_members(runner)
                time.sleep(0.02)
            spares = spares_of(psutil.Process(runner).ppid())
        d.kill()
        assert _wait_gone(runner, 10) == []
        for spare in spares:
            assert _wait_gone(spare, 10) == []
    finally:
        remove_home(d.home)


def test_a_forked_runner_dies_with_the_zygote(daemon):
    # Its parent-death signal: should the zygote itself be killed, no runner lingers.
    with daemon.client() as c:
        job = c.enqueue(job_type="sleep", payload={"seconds": 60}, max_attempts=1)
        runner = _running_runner(c, job.id)
        zygote = psutil.Process(runner).ppid()
        os.kill(zygote, signal.SIGKILL)
        wait_gone(runner, "the runner outlived its zygote", timeout=5)
        ended = c.wait(job.id, timeout_ms=10_000)
    assert ended.state is State.FAILED and ended.error_kind == "signal"


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
def test_a_forked_runner_runs_as_batch_work(daemon):
    with daemon.client() as c:
        assert call(c, "os:sched_getscheduler", 0) == os.SCHED_BATCH


def test_a_spec_larger_than_the_pipe_reaches_a_forked_runner_whole(daemon):
    # Most specs are written into the runner's stdin before the fork; this one does
    # not fit in the pipe, and the rest follows once the runner reads.
    with daemon.client() as c:
        assert call(c, "builtins:len", "x" * 300_000) == 300_000


def test_a_request_names_the_spare_its_claim_recorded_and_no_other_takes_it(tmp_path):
    """The zygote runs a request on a spare only if the request names it: the daemon
    names the spare a job's claim recorded, or one no claim has reserved."""
    from semantica.launcher import Launcher

    zygote = Launcher(home=tmp_path, env_allowlist=frozenset()).zygote
    assert zygote is not None
    zygote._spares = {4242: 1_764_600_000_456}
    assert zygote.reserve_spare() == (4242, 1_764_600_000_456)  # job A's claim records it
    assert zygote.reserve_spare() is None  # job B's claim, in the same look: none left
    assert zygote._spare_for(None) is None  # B's request comes first: B's child is forked
    assert zygote._spare_for(4242) == 4242  # A's request gets the spare A recorded
    zygote.give_back_spare(4343)  # another job's end frees nothing
    assert zygote.reserve_spare() is None
    zygote.give_back_spare(4242)  # A ended without asking for its process: freed
    zygote._spares[4444] = 1_764_600_000_999
    assert zygote._spare_for(None) == 4242  # a request no claim prepared may take one
    assert zygote.reserve_spare() == (4444, 1_764_600_000_999)
    assert zygote.reserve_spare() is None


async def test_a_spare_given_back_ends_the_wait_for_one(tmp_path):
    """A SUBPROCESS job waits for a spare while the only one is reserved; the job that
    reserved it ends without asking for it: the wait ends at once, with the spare
    free, and claims still wait for spares (a wait left to time out said the zygote
    could not fork one, and claims went ahead without a PID)."""
    import trio

    from semantica.domain import ExecutionMode
    from semantica.launcher import Launcher

    launcher = Launcher(home=tmp_path, env_allowlist=frozenset(["PATH"]), spares=1)
    zygote = launcher.zygote
    assert zygote is not None
    try:
        async with trio.open_nursery() as nursery:
            ready = trio.Event()
            zygote.get_spare_ready(nursery, ready.set)  # starts the zygote, waits for its spare
            with trio.fail_after(30):
                await ready.wait()
            pid, _start = zygote.reserve_spare()  # a claim records it
            ready = trio.Event()
            zygote.get_spare_ready(nursery, ready.set)  # the next job waits for a spare
            await trio.sleep(0.1)
            assert not ready.is_set()
            zygote.give_back_spare(pid)  # the first job ended without asking for it
            with trio.fail_after(1):
                await ready.wait()
            assert zygote.reserve_spare() == (pid, _start)
            assert not launcher.claims_without_runner(ExecutionMode.SUBPROCESS)
    finally:
        await zygote.close()
