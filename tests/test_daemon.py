"""The daemon process: start-up, one owner per database, sockets, drain, SDK."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import anyio
import msgspec
import psutil
import pytest
from harness import (
    API_TEST_QUEUES,
    Daemon,
    daemon_env,
    http_post,
    make_home,
    remove_home,
    start_daemon,
)

import semantica
from semantica.domain import State
from semantica.errors import TooLarge


@pytest.fixture
def daemon():
    d = start_daemon(hold_queues=API_TEST_QUEUES)
    yield d
    d.stop()
    remove_home(d.home)


def test_home_socket_and_token_are_private(daemon):
    assert stat.S_IMODE(daemon.home.stat().st_mode) == 0o700
    mode = daemon.socket_path.stat().st_mode
    assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    assert stat.S_IMODE((daemon.home / "token").stat().st_mode) == 0o600
    assert len(daemon.token) >= 32


def test_sdk_round_trip(daemon):
    with daemon.client() as c:
        job = c.enqueue(job_type="noop", subject_key="src/main.rs", payload={"n": 1})
        assert job.state is State.QUEUED and job.payload == {"n": 1}
        got = c.get(job.id)
        assert (
            got.waiting_reason
            == "queue 'default' is paused: resume it with `semantica-cli resume default`"
        )
        assert msgspec.structs.replace(got, waiting_reason=None) == job
        assert [j.id for j in c.list(subject="src/main.rs").jobs] == [job.id]
        assert c.cancel(job.id).cancelled == [job.id]
        assert c.wait(job.id, timeout_ms=1000).state is State.CANCELLED
        with pytest.raises(semantica.NotFound):
            c.get("no-such-id")
        with pytest.raises(semantica.ValidationFailed) as info:
            c.enqueue(job_type="noop", priority=5000)
        assert info.value.data == {"field": "priority"}


def test_supersede_through_the_api(daemon):
    with daemon.client() as c:
        jobs = [c.enqueue(job_type="noop", subject_key="src/main.rs") for _ in range(3)]
        states = [c.get(j.id).state for j in jobs]
    assert states == [State.SUPERSEDED, State.SUPERSEDED, State.QUEUED]


def test_enqueue_batch_all_or_nothing(daemon):
    with daemon.client() as c:
        ok = c.enqueue_batch([{"job_type": "noop"}, {"job_type": "noop", "priority": 3}])
        assert [j.priority for j in ok.jobs] == [0, 3]
        before = c.stats().jobs_by_state
        with pytest.raises(semantica.ValidationFailed, match=r"jobs\[1\]\.priority"):
            c.enqueue_batch([{"job_type": "noop"}, {"job_type": "noop", "priority": 3000}])
        assert c.stats().jobs_by_state == before


def test_wait_long_polls_until_the_job_ends(daemon):
    with daemon.client() as c:
        job = c.enqueue(job_type="noop")
    timer = threading.Timer(0.3, lambda: daemon.client().cancel(job.id))
    timer.start()
    with daemon.client() as c:
        done = c.wait(job.id, timeout_ms=10_000)
    timer.join()
    assert done.state is State.CANCELLED


def test_wait_returns_at_the_timeout(daemon):
    with daemon.client() as c:
        job = c.enqueue(job_type="noop")
        assert c.wait(job.id, timeout_ms=50).state is State.QUEUED


def test_queues_methods(daemon):
    with daemon.client() as c:
        c.enqueue(job_type="noop", queue="build")
        info = c.configure_queue("build", concurrency=2)
        assert info.concurrency == 2 and info.counts == {"QUEUED": 1}
        assert c.pause("build").paused is True
        assert c.resume("build").paused is False
        assert "build" in [q.name for q in c.queues().queues]


def test_stats_and_health(daemon):
    with daemon.client() as c:
        c.enqueue(job_type="noop")
        stats = c.stats()
        assert stats.jobs_by_state["QUEUED"] == 1 and stats.counters.job_enqueue_total == 1
        health = c.health(integrity_check=True)
    assert health.ok and health.check == "integrity_check" and health.problems == []
    assert health.pid == daemon.proc.pid and health.state == "serving"
    assert health.disk_free_bytes > 0


def test_async_client_under_asyncio_and_trio(daemon):
    async def use() -> State:
        async with semantica.AsyncClient(daemon.socket_path) as c:
            job = await c.enqueue(job_type="noop")
            return (await c.get(job.id)).state

    assert anyio.run(use, backend="asyncio") is State.QUEUED
    assert anyio.run(use, backend="trio") is State.QUEUED


def test_tcp_needs_the_token(daemon):
    with daemon.tcp_client() as c:
        assert c.stats().running == 0
    with pytest.raises(semantica.SemanticaError) as info:
        daemon.tcp_client(token="wrong").stats()
    assert info.value.code == 4030
    status, body = http_post(
        daemon, b'{"jsonrpc":"2.0","method":"admin.stats.v1","id":1}', tcp=True
    )
    assert status == 401 and b"4030" in body
    status, body = http_post(
        daemon,
        b'{"jsonrpc":"2.0","method":"admin.stats.v1","id":1}',
        tcp=True,
        headers={"Authorization": f"Bearer {daemon.token}"},
    )
    assert status == 200 and b'"result"' in body
    for scheme in ("bearer", "BEARER"):  # the scheme is case-insensitive (RFC 9110)
        status, _ = http_post(
            daemon,
            b'{"jsonrpc":"2.0","method":"admin.stats.v1","id":1}',
            tcp=True,
            headers={"Authorization": f"{scheme} {daemon.token}"},
        )
        assert status == 200, scheme
    status, _ = http_post(
        daemon,
        b'{"jsonrpc":"2.0","method":"admin.stats.v1","id":1}',
        tcp=True,
        headers={"Authorization": f"Basic {daemon.token}"},
    )
    assert status == 401


def test_tcp_listens_on_loopback_only(daemon):
    listening = [
        c.laddr
        for c in psutil.Process(daemon.proc.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening, "the daemon should listen on TCP"
    assert all(addr.ip == "127.0.0.1" and addr.port == daemon.port for addr in listening)


def test_curl_over_the_unix_socket(daemon):
    curl = subprocess.run(
        [
            "curl",
            "-sS",
            "--unix-socket",
            str(daemon.socket_path),
            "-d",
            '{"jsonrpc":"2.0","method":"admin.stats.v1","id":1}',
            "http://localhost/",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert curl.returncode == 0, curl.stderr
    assert '"jsonrpc":"2.0"' in curl.stdout and '"jobs_by_state"' in curl.stdout


def test_curl_sends_a_large_body_with_expect_100_continue(daemon, tmp_path):
    """curl asks `Expect: 100-continue` by itself for a body of 1 MB or more; the
    daemon answered such a request with nothing (a bug, fixed)."""
    body = tmp_path / "big.json"
    payload = {"blob": "x" * 1_200_000}
    call = {"jsonrpc": "2.0", "method": "dev.enqueue.v1", "id": 7}
    call["params"] = {"job_type": "noop", "queue": "curl-big", "payload": payload}
    body.write_text(json.dumps(call))
    with daemon.client() as c:
        c.pause("curl-big")
    curl = subprocess.run(
        [
            *("curl", "-sS", "-v", "--unix-socket", str(daemon.socket_path)),
            *("--data-binary", f"@{body}", "http://localhost/"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert curl.returncode == 0, curl.stderr
    assert "Expect: 100-continue" in curl.stderr  # what this test is about
    reply = json.loads(curl.stdout)
    assert reply["id"] == 7 and reply["result"]["state"] == "QUEUED"


def test_a_cancelled_async_call_leaves_the_client_in_step(daemon):
    """A call cancelled after its request went out left its reply unread, and the
    next call returned that reply: another job than the one asked for (fixed)."""

    async def use() -> tuple[str, str, int]:
        async with semantica.AsyncClient(daemon.socket_path) as c:
            a = await c.enqueue(job_type="noop")
            b = await c.enqueue(job_type="noop")
            with anyio.move_on_after(0.2):
                await c.wait(a.id, timeout_ms=1000)  # queued on a held queue: times out
            got = await c.get(b.id)
            stats = await c.stats()
            return b.id, got.id, stats.jobs_by_state["QUEUED"]

    for backend in ("asyncio", "trio"):
        asked, got, queued = anyio.run(use, backend=backend)
        assert got == asked and queued >= 2


def test_an_interrupted_blocking_call_leaves_the_client_in_step(daemon):
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with semantica.Client(daemon.socket_path) as c:
            a = c.enqueue(job_type="noop")
            b = c.enqueue(job_type="noop")
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(KeyboardInterrupt):
                c.wait(a.id, timeout_ms=1000)
            assert c.get(b.id).id == b.id
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_sdk_tells_a_message_too_large_not_a_lost_connection():
    """Over the Unix socket the daemon refuses a too large message and closes; the
    SDK's send then broke (EPIPE) and it reported a lost connection that "may or may
    not have been carried out", about half the time (fixed: it reads the 4013)."""
    d = start_daemon(SEMANTICA_MAX_MESSAGE_BYTES="100000")
    try:
        big = {"blob": "x" * 4_000_000}
        with d.client() as c:
            for _ in range(5):
                with pytest.raises(TooLarge, match="limit is 100000"):
                    c.enqueue(job_type="noop", payload=big)
                # The daemon closed the connection after its 4013: the same client
                # connects afresh (it kept the dead socket, and this call was lost).
                assert c.stats().running == 0

        async def use():
            async with semantica.AsyncClient(d.socket_path) as c:
                with pytest.raises(TooLarge):
                    await c.enqueue(job_type="noop", payload=big)
                assert (await c.stats()).running == 0
                await c.enqueue(job_type="noop", payload=big)

        for backend in ("asyncio", "trio"):
            with pytest.raises(TooLarge, match="limit is 100000"):
                anyio.run(use, backend=backend)
        with d.client() as c:
            assert sum(c.stats().jobs_by_state.values()) == 0
    finally:
        d.stop()
        remove_home(d.home)


def test_sdk_says_where_it_cannot_connect(tmp_path):
    too_long = tmp_path / ("x" * 120 + ".sock")
    with pytest.raises(semantica.SemanticaError, match="cannot connect to the daemon at"):
        semantica.Client(too_long).stats()


def test_sdk_says_how_to_start_a_missing_daemon(tmp_path):
    with pytest.raises(semantica.DaemonNotRunning, match="start it with `semantica`"):
        semantica.Client(tmp_path / "nothing.sock").stats()

    async def use():
        async with semantica.AsyncClient(tmp_path / "nothing.sock") as c:
            await c.stats()

    with pytest.raises(semantica.DaemonNotRunning):
        anyio.run(use)


def test_second_daemon_is_refused_naming_the_pid(daemon):
    env = {**daemon.env, "SEMANTICA_RPC_PORT": "0"}
    second = subprocess.run(
        [sys.executable, "-m", "semantica.daemon"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert second.returncode == 1
    assert f"(PID {daemon.proc.pid})" in second.stderr
    assert "Traceback" not in second.stderr
    with daemon.client() as c:  # the first one is untouched
        assert c.stats().running == 0


def test_a_damaged_database_is_one_line_that_says_what_to_do(tmp_path):
    """A garbled file gave a traceback ending in apsw.NotADBError, and the CLI 'failed
    unexpectedly ... please report it' (an audit found it)."""
    home = make_home()
    env = daemon_env(home, SEMANTICA_RPC_PORT="0")
    try:
        made = subprocess.run(
            [sys.executable, "-m", "semantica.daemon", "--init"], env=env, capture_output=True
        )
        assert made.returncode == 0, made.stderr
        with open(home / "meta.db", "r+b") as db:
            db.write(b"this is not SQLite!!")
        for command, code in (
            ([sys.executable, "-m", "semantica.daemon"], 1),
            ([str(Path(sys.executable).with_name("semantica-cli")), "status"], 1),
        ):
            done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)
            assert done.returncode == code, done.stderr
            assert "Traceback" not in done.stderr and "unexpectedly" not in done.stderr
            assert "is not a Semantica database, or it is damaged" in done.stderr
            assert "restore a backup" in done.stderr
    finally:
        remove_home(home)


def test_init_under_a_running_daemon_is_refused_and_touches_nothing(daemon):
    db = daemon.home / "meta.db"
    before = db.stat().st_mtime_ns, db.stat().st_size
    init = subprocess.run(
        [sys.executable, "-m", "semantica.daemon", "--init"],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert init.returncode == 1, init.stderr
    assert f"(PID {daemon.proc.pid})" in init.stderr and "Traceback" not in init.stderr
    assert (db.stat().st_mtime_ns, db.stat().st_size) == before


def test_job_types_are_case_insensitive_and_supersede_each_other(daemon):
    with daemon.client() as c:
        first = c.enqueue(job_type="NOOP", subject_key="case.txt")
        second = c.enqueue(job_type="noop", subject_key="case.txt")
        assert first.job_type == second.job_type == "noop"
        assert c.get(first.id).state is State.SUPERSEDED
        assert second.generation == first.generation + 1


def test_enqueues_into_a_paused_queue_cost_no_claim_and_run_once_resumed(daemon):
    with daemon.client() as c:
        c.pause("held")
        c.enqueue(job_type="noop", queue="held")  # the dispatcher looks once after a pause
        claims = c.stats().scheduler_pop_latency_ms.count
        jobs = [c.enqueue(job_type="noop", queue="held") for _ in range(20)]
        assert c.stats().scheduler_pop_latency_ms.count == claims  # no claim attempted
        c.resume("held")
        assert all(c.wait(j.id, timeout_ms=10_000).state is State.DONE for j in jobs)
        c.enqueue(job_type="noop", queue="other")  # an active queue is still looked at
        assert c.stats().scheduler_pop_latency_ms.count > claims


def test_live_socket_of_another_daemon_is_not_replaced(daemon):
    other_home = make_home()
    env = daemon_env(other_home, SEMANTICA_SOCKET_PATH=str(daemon.socket_path))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "semantica.daemon"],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == 1
        assert "another daemon is answering" in proc.stderr
        with daemon.client() as c:
            assert c.stats().running == 0
    finally:
        remove_home(other_home)


def test_stale_socket_is_replaced_after_a_crash():
    d = start_daemon(hold_queues=API_TEST_QUEUES)
    try:
        with d.client() as c:
            job = c.enqueue(job_type="noop")
        d.kill()
        assert d.socket_path.exists()  # left behind by SIGKILL
        d.start()
        with d.client() as c:
            assert c.get(job.id).state is State.QUEUED  # acknowledged before the kill
    finally:
        d.stop()
        remove_home(d.home)


def _assert_signal_drains_and_closes_cleanly(signum: signal.Signals) -> None:
    d = start_daemon(hold_queues=API_TEST_QUEUES)
    try:
        with d.client() as c:
            job = c.enqueue(job_type="noop")
        # A long-poll in flight is answered, not cut off, when the drain begins.
        result: dict = {}

        def waiter():
            with d.client() as c:
                result["job"] = c.wait(job.id, timeout_ms=30_000)

        t = threading.Thread(target=waiter)
        t.start()
        while "jobs.wait.v1" not in d.log() and t.is_alive():
            t.join(0.02)
        d.signal(signum)
        d.wait_for_notify("STOPPING=1")
        assert d.proc.wait(20) == 0
        t.join(10)
        assert result["job"].state is State.QUEUED
        assert not d.socket_path.exists()
        assert not (d.home / "meta.db-wal").exists() or os.path.getsize(d.home / "meta.db-wal") == 0
        assert '"event":"daemon_stopped"' in d.log()
        events = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
        requested = [e for e in events if e["event"] == "shutdown_requested"]
        assert [e["signal"] for e in requested] == [signum.name]
    finally:
        d.stop()
        remove_home(d.home)


def test_sigterm_drains_and_closes_cleanly():
    _assert_signal_drains_and_closes_cleanly(signal.SIGTERM)


def test_sigint_drains_like_sigterm():
    _assert_signal_drains_and_closes_cleanly(signal.SIGINT)


def test_admin_shutdown_drains_like_sigterm():
    d = start_daemon(hold_queues=API_TEST_QUEUES)
    try:
        with d.client() as c:
            assert c.shutdown().stopping is True
        assert d.proc.wait(20) == 0
    finally:
        d.stop()
        remove_home(d.home)


def test_kill_9_loses_no_acknowledged_enqueue():
    d = start_daemon(hold_queues=API_TEST_QUEUES)
    acked: list[str] = []
    lock = threading.Lock()

    def client_loop():
        try:
            with d.client() as c:
                while True:
                    job = c.enqueue(job_type="noop", payload={"n": len(acked)})
                    with lock:
                        acked.append(job.id)
        except semantica.SemanticaError:
            pass  # the daemon died under us: what it acknowledged is in `acked`

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        while len(acked) < 200:
            threads[0].join(0.01)
        d.kill()
        for t in threads:
            t.join(10)
        d.start()
        with d.client() as c:
            missing = [i for i in acked if c.get(i).state is not State.QUEUED]
        assert missing == []
    finally:
        d.stop()
        remove_home(d.home)


def test_wal_is_checkpointed_off_the_request_path(daemon):
    with daemon.client() as c:
        for _ in range(6):
            c.enqueue_batch([{"job_type": "noop", "payload": {"pad": "x" * 2000}}] * 500)
        deadline = time.monotonic() + 10
        while (stats := c.stats()).wal_checkpoints_total == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
    assert stats.wal_checkpoints_total >= 1
    assert stats.wal_fsyncs_total >= 6  # every acknowledged batch was fsynced


def test_systemd_watchdog_is_fed_at_half_its_interval():
    home = make_home()
    d = start_daemon(home, WATCHDOG_USEC="400000")  # 0.4 s: a ping every 0.2 s
    try:
        # The first ping may have waited in our socket since READY=1: time from it on.
        d.wait_for_notify("WATCHDOG=1", timeout=5)
        pings = []
        for _ in range(5):
            d.wait_for_notify("WATCHDOG=1", timeout=5)
            pings.append(time.monotonic())
        intervals = sorted(b - a for a, b in itertools.pairwise(pings))
        median = intervals[len(intervals) // 2]
        assert 0.15 <= median <= 0.3, intervals  # half of WATCHDOG_USEC, not all of it
        assert intervals[-1] < 0.4, intervals  # never as late as systemd's deadline
    finally:
        d.stop()
        remove_home(home)


def test_logs_are_json_lines_with_events(daemon):
    with daemon.client() as c:
        c.cancel(c.enqueue(job_type="noop").id)
    events = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    assert {"daemon_started", "job_state_changed"} <= {e["event"] for e in events}
    changed = next(e for e in events if e["event"] == "job_state_changed")
    assert changed["state"] == "CANCELLED" and changed["job_id"]
    assert changed["queue"] == "default" and changed["job_type"] == "noop"
    assert changed["error_kind"] == "cancelled" and "payload" not in changed
    assert all({"ts", "level", "event"} <= e.keys() for e in events)


def test_concurrent_clients_share_commits_and_fsyncs(daemon):
    clients, per_client = 8, 200
    with daemon.client() as c:
        before = c.stats()
    start = threading.Barrier(clients)
    errors: list[BaseException] = []

    def enqueue_many():
        try:
            with daemon.client() as c:  # a connection of its own
                start.wait(10)
                for n in range(per_client):
                    c.enqueue(job_type="noop", payload={"n": n})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=enqueue_many) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == []
    with daemon.client() as c:
        after = c.stats()
    enqueued = after.counters.job_enqueue_total - before.counters.job_enqueue_total
    commits = after.counters.enqueue_commits_total - before.counters.enqueue_commits_total
    fsyncs = after.wal_fsyncs_total - before.wal_fsyncs_total
    assert enqueued == clients * per_client
    assert after.jobs_by_state["QUEUED"] == before.jobs_by_state.get("QUEUED", 0) + enqueued
    # Several jobs shared a commit, and several commits an fsync (synchronous=FULL):
    # acknowledged writes were fsynced, but far fewer times than one per job.
    assert 0 < commits < enqueued, (commits, enqueued)
    assert 0 < fsyncs < enqueued, (fsyncs, enqueued)


def test_rpc_port_0_turns_tcp_off():
    d = start_daemon(hold_queues=API_TEST_QUEUES, SEMANTICA_RPC_PORT="0")
    try:
        listening = [
            c.laddr
            for c in psutil.Process(d.proc.pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN
        ]
        assert listening == []
        events = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
        [started] = [e for e in events if e["event"] == "daemon_started"]
        assert started["tcp"] == "off"
        with d.client() as c:  # the Unix socket still serves
            job = c.enqueue(job_type="noop")
            assert c.get(job.id).state is State.QUEUED
    finally:
        d.stop()
        remove_home(d.home)


def _listening_on_loopback() -> socket.socket:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    return taken


def test_a_taken_rpc_port_is_one_line_that_says_what_to_do():
    with _listening_on_loopback() as taken:
        port = taken.getsockname()[1]
        home = make_home()
        d = Daemon(home, daemon_env(home, SEMANTICA_RPC_PORT=str(port)), [])
        try:
            with pytest.raises(AssertionError, match="exited"):
                d.start()
            assert d.port == port  # a port the test chose is never changed
            assert d.proc.returncode == 1
            events = [json.loads(line) for line in d.log().splitlines()]
            assert events[-1]["event"] == "daemon_cannot_start"
            assert events[-1]["error"] == (
                f"cannot listen on 127.0.0.1:{port}: Address already in use; "
                "pick another SEMANTICA_RPC_PORT, or 0 to turn TCP off"
            )
            assert not (home / "semantica.sock").exists()
        finally:
            d.stop()
            remove_home(home)


def test_the_harness_moves_its_own_port_pick_when_another_process_took_it():
    """free_port() lets its port go before the daemon binds it: a test in another
    xdist worker may take it meanwhile, and the harness then picks another."""
    home = make_home()
    env = daemon_env(home)
    with _listening_on_loopback() as taken:
        env["SEMANTICA_RPC_PORT"] = str(taken.getsockname()[1])
        env.picked_port = taken.getsockname()[1]  # as if free_port() had picked it
        d = Daemon(home, env, [])
        try:
            d.start()
            assert d.port != taken.getsockname()[1]
            with d.tcp_client() as c:
                assert c.health().ok
        finally:
            d.stop()
            remove_home(home)


def test_tcp_ndjson_needs_an_auth_call_first(daemon):
    def call(method: str, params: dict | None, call_id: int) -> dict:
        doc = {"jsonrpc": "2.0", "method": method, "id": call_id}
        if params is not None:
            doc["params"] = params
        sock.sendall(json.dumps(doc).encode() + b"\n")
        return json.loads(replies.readline())

    with daemon.client() as c:
        before = c.stats().counters.job_enqueue_total, c.list(limit=1000).jobs
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=10) as sock:
        replies = sock.makefile("rb")
        refused = call("dev.enqueue.v1", {"job_type": "noop", "user_tag": "no-auth"}, 1)
        assert refused["id"] == 1 and "result" not in refused
        assert refused["error"]["code"] == 4030
        with daemon.client() as c:  # nothing changed
            assert (c.stats().counters.job_enqueue_total, c.list(limit=1000).jobs) == before
        wrong = call("auth", {"token": "x" * len(daemon.token)}, 2)
        assert wrong["error"]["code"] == 4030
        assert call("admin.stats.v1", None, 3)["error"]["code"] == 4030  # still refused
        assert call("auth", {"token": daemon.token}, 4) == {
            "jsonrpc": "2.0",
            "result": {"authenticated": True},
            "id": 4,
        }
        accepted = call("dev.enqueue.v1", {"job_type": "noop", "user_tag": "authed"}, 5)
        assert accepted["id"] == 5 and accepted["result"]["state"] == "QUEUED"
    with daemon.client() as c:
        assert [j.id for j in c.list(tag="authed").jobs] == [accepted["result"]["id"]]
        assert c.list(tag="no-auth").jobs == []
        assert c.stats().counters.job_enqueue_total == before[0] + 1


def test_idle_daemon_does_not_wake(daemon):
    later = int(time.time() * 1000) + 3_600_000
    with daemon.client() as c:
        # An active queue, so the dispatcher has due times to wait for: an hour away.
        batch = c.enqueue_batch(
            [{"job_type": "noop", "queue": "later", "schedule_at": later + n} for n in range(100)]
        )
        assert len(batch.jobs) == 100
        time.sleep(0.1)  # the look the enqueue asked for
        before = c.stats()
        time.sleep(1.5)
        after = c.stats()
    assert after.jobs_by_state["QUEUED"] == before.jobs_by_state["QUEUED"]
    assert after.dispatcher_wakeups_total == before.dispatcher_wakeups_total
