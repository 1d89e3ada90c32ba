"""SUBPROCESS jobs are forked by the runner zygote: still a fresh process per job, with
the job's own environment and sandbox; the daemon carries on if the zygote dies, and
`SEMANTICA_ZYGOTE=off` starts a new interpreter per job instead."""

from __future__ import annotations

import os
import signal
import time

import psutil
import pytest
from harness import remove_home, start_daemon

from semantica.domain import State


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


def test_the_daemon_carries_on_when_the_zygote_dies(daemon):
    with daemon.client() as c:
        zygote = call(c, "os:getppid")
        os.kill(zygote, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while psutil.pid_exists(zygote) and psutil.Process(zygote).status() != "zombie":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # The next job notices, runs all the same, and a new zygote takes over.
        assert call(c, "os:getpid") > 0
        later = call(c, "os:getppid")
    assert later != zygote


def test_zygote_off_starts_a_new_interpreter_per_job():
    d = start_daemon(SEMANTICA_ZYGOTE="off")
    try:
        with d.client() as c:
            assert call(c, "os:getppid") == d.proc.pid
    finally:
        d.stop()
        remove_home(d.home)
