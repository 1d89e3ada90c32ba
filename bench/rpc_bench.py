"""RPC throughput and idle-cost benchmark of a real daemon process. Prints figures; not a test.

Run from the repo root:

    .venv/bin/python bench/rpc_bench.py                    # full run, under ~3 minutes
    .venv/bin/python bench/rpc_bench.py --quick            # smoke run, a few seconds
    .venv/bin/python bench/rpc_bench.py --json             # one JSON document instead of a table
    .venv/bin/python bench/rpc_bench.py --idle-seconds 60

Everything lives in one temporary directory on the same filesystem as the repository
(/tmp when it is on the same device, else bench/.tmp), deleted afterwards. Every figure
is time-boxed: a warm-up, then as many calls as fit in the measuring window.

Baselines (same disk):
- raw apsw: one single-row INSERT per `with db:` transaction into a table as wide as a
  job row (store_bench's RAW_TABLE), WAL, synchronous FULL and NORMAL: the commit floor.
  Taken right before and right after the daemon rows of the same setting (fsync latency
  drifts on a shared machine); the ratios use the mean of the two.
- NDJSON echo: a minimal trio server in a subprocess on a Unix socket that writes each
  line back; one sequential client sends the same enqueue lines the daemon gets.
- the store alone: semantica's own Store in the bench's process, with no RPC, opened
  as the daemon opens it (group sync: one fsync per commit at FULL; checkpoints in a
  thread, as the daemon's Checkpointer runs them), storing the same jobs 1 per commit,
  8 per commit (what the concurrent row's group commit makes) and 1,000 per commit (a
  batch). With the echo round trip, these give each goal's ceiling on this host: what
  no RPC layer in front of this store could exceed here.

The daemon (`python -m semantica.daemon`, started like tests/harness.py does, READY=1
awaited over NOTIFY_SOCKET) runs twice on a fresh SEMANTICA_HOME each time:
synchronous=NORMAL, then synchronous=FULL, with SEMANTICA_LOG_LEVEL=warning and
SEMANTICA_RPC_PORT=0 (no TCP). Against each:
  (a)  one sequential client, NDJSON: raw socket with pre-encoded lines (the SDK's own
       `protocol.encode_request` bytes), so the client costs as little as possible;
  (a') the same through `semantica.Client.enqueue` (encodes, decodes the Job);
  (b)  one sequential client, HTTP/1.1 keep-alive (http.client over the Unix socket);
  (c)  8 concurrent clients, each its own process and connection, sequential NDJSON
       (raw pre-encoded lines);
  (d)  `dev.enqueue_batch.v1` with 1,000 jobs per call, one sequential client.
Jobs are keyless `noop` jobs, in a queue paused for the run, with a small payload (no
supersede work; the store bench measures the supersede mix). For each row the daemon's
CPU (psutil cpu_times delta over the window) and jobs per commit (admin.stats
counters: job_enqueue_total / enqueue_commits_total) are shown: they tell fsync-bound
from CPU-bound.

Idle: after the FULL daemon has served its load and every client has hung up, 1 s to
settle, then its CPU % over --idle-seconds (cpu_times delta / wall time) and its RSS.

Goals: one sequential NDJSON client >= 5,000 enqueues/s (shown at both synchronous
settings); 8 concurrent clients at synchronous=FULL >= 10,000 enqueues/s;
enqueue_batch >= 50,000 jobs/s (both settings); idle CPU <= 0.2 %; RSS <= 60 MB.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw
import msgspec
import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from store_bench import RAW_INSERT, RAW_TABLE, latency_summary, open_raw  # noqa: E402

import semantica  # noqa: E402
from semantica import protocol as p  # noqa: E402

CONCURRENT_CLIENTS = 8
BATCH_SIZE = 1_000
LINE_POOL = 1_024  # distinct pre-encoded enqueue lines, cycled
BATCH_POOL = 3  # distinct pre-encoded batch lines, cycled
READY_TIMEOUT_S = 20.0
SOCKET_TIMEOUT_S = 60.0
SETTLE_S = 1.0
MAX_SOCKET_PATH = 100  # Unix socket paths must stay under ~107 bytes

GOAL_SEQ_PER_S = 5_000.0
GOAL_CONCURRENT_FULL_PER_S = 10_000.0
GOAL_BATCH_JOBS_PER_S = 50_000.0
GOAL_IDLE_CPU_PCT = 0.2
GOAL_RSS_MB = 60.0

# (full, quick)
MEASURE_S = (4.0, 0.5)
WARMUP_S = (1.0, 0.2)
BASELINE_S = (3.0, 0.5)
IDLE_S = (30.0, 3.0)

# The store alone (bench_store): requests per commit, as each daemon row makes them.
STORE_ROWS = {"single": 1, "grouped": CONCURRENT_CLIENTS, "batch": BATCH_SIZE}

ROWS = ("seq_ndjson", "seq_sdk", "seq_http", "concurrent_ndjson", "batch")
ROW_LABELS = {
    "seq_ndjson": "(a)  1 client, NDJSON raw lines",
    "seq_sdk": "(a') 1 client, semantica.Client",
    "seq_http": "(b)  1 client, HTTP keep-alive",
    "concurrent_ndjson": f"(c)  {CONCURRENT_CLIENTS} client processes, NDJSON",
    "batch": f"(d)  enqueue_batch {BATCH_SIZE:,}/call",
}


class BenchError(RuntimeError):
    """Something went wrong that makes the figures meaningless."""


# --------------------------------------------------------------------------- requests


BENCH_QUEUE = "bench"  # paused while measuring: this bench times enqueues, not runs


def job_params(i: int) -> dict[str, Any]:
    return {
        "job_type": "noop",
        "queue": BENCH_QUEUE,
        "payload": {"path": f"/home/user/project/src/module_{i % 997}.py", "n": i},
    }


def enqueue_lines(n: int, offset: int = 0) -> list[bytes]:
    """Pre-encoded NDJSON requests, exactly as the SDK would encode them."""
    return [
        p.encode_request("dev.enqueue.v1", job_params(offset + i), offset + i) + b"\n"
        for i in range(n)
    ]


def batch_lines(n: int) -> list[bytes]:
    return [
        p.encode_request(
            "dev.enqueue_batch.v1",
            {"jobs": [job_params(b * BATCH_SIZE + i) for i in range(BATCH_SIZE)]},
            b,
        )
        + b"\n"
        for b in range(n)
    ]


# --------------------------------------------------------------------------- clients


class LineClient:
    """A bare NDJSON client: send one line, read one line back."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(SOCKET_TIMEOUT_S)
        self.sock.connect(path)
        self.buf = bytearray()

    def call(self, line: bytes) -> bytes:
        self.sock.sendall(line)
        buf = self.buf
        searched = 0
        while (newline := buf.find(b"\n", searched)) < 0:
            searched = len(buf)
            chunk = self.sock.recv(1 << 20)
            if not chunk:
                raise BenchError("the server closed the connection")
            buf += chunk
        reply = bytes(buf[:newline])
        del buf[: newline + 1]
        return reply

    def close(self) -> None:
        self.sock.close()


def check_reply(reply: bytes) -> None:
    if b'"error":{' in reply[:40]:
        raise BenchError(f"the daemon answered with an error: {reply[:400]!r}")


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix socket; counts connects so keep-alive can be checked."""

    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=SOCKET_TIMEOUT_S)
        self.unix_path = path
        self.connects = 0

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self.unix_path)
        self.sock = sock
        self.connects += 1


# --------------------------------------------------------------------------- timing


def timed_loop(
    op: Callable[[int], int],
    warmup_s: float,
    measure_s: float,
    probe: Callable[[], Any] | None = None,
) -> tuple[dict[str, Any], Any, Any]:
    """Call op(i) for warmup_s, then for measure_s; op returns the jobs it carried."""
    clock = time.perf_counter
    i = 0
    end = clock() + warmup_s
    while clock() < end:
        op(i)
        i += 1
    before = probe() if probe else None
    lat: list[float] = []
    jobs = 0
    start = t = clock()
    while True:
        jobs += op(i)
        i += 1
        now = clock()
        lat.append(now - t)
        t = now
        if now - start >= measure_s:
            break
    after = probe() if probe else None
    seconds = now - start
    figures = {
        "calls": len(lat),
        "jobs": jobs,
        "seconds": seconds,
        "calls_per_s": len(lat) / seconds,
        "jobs_per_s": jobs / seconds,
        "latency": latency_summary(lat),
    }
    return figures, before, after


# --------------------------------------------------------------------------- baselines


def raw_row(i: int) -> tuple[Any, ...]:
    payload = json.dumps(job_params(i)["payload"]).encode()
    return (
        str(uuid.uuid4()), "QUEUED", "default", "embed", None, None, payload, 0, "SUBPROCESS",
        3, 1000, 2.0, 60_000, None, None, None, 0, 0, "[]", None, None, None, "{}",
        1_700_000_000_000 + i, 1_700_000_000_000 + i, None, None, None,
    )  # fmt: skip


def bench_raw_apsw(path: Path, synchronous: str, warmup_s: float, measure_s: float) -> dict:
    db = open_raw(path, synchronous)
    db.execute(RAW_TABLE)
    rows = [raw_row(i) for i in range(LINE_POOL)]

    def op(i: int) -> int:
        with db:
            db.execute(RAW_INSERT, rows[i % LINE_POOL])
        return 1

    figures, _, _ = timed_loop(op, warmup_s, measure_s)
    db.close()
    return figures


def bench_store(
    path: Path, synchronous: str, per_commit: int, warmup_s: float, measure_s: float
) -> dict:
    """The daemon's own store, in this process, with no RPC at all: what the store
    alone can do on this disk, the most any RPC layer in front of it could reach.
    Opened as the daemon opens it (`group_sync`: one fsync acknowledges a commit);
    each call stores `per_commit` requests in one commit and syncs: 1 (a sequential
    client), CONCURRENT_CLIENTS single enqueues (the group commit of the concurrent
    row) or one batch of BATCH_SIZE (the batch row)."""
    from semantica.domain import EnqueueRequest
    from semantica.durability import CHECKPOINT_THRESHOLD_PAGES as CHECKPOINT_PAGES
    from semantica.store import EnqueueGroup, Store

    store = Store.open(path, synchronous=synchronous, group_sync=True)
    # As the daemon's Checkpointer does: checkpoints in a thread, not inside commits.
    wanted, finished = threading.Event(), False

    def checkpointer() -> None:
        while wanted.wait() and not finished:
            wanted.clear()
            store.checkpoint()

    store.checkpoint_elsewhere(lambda pages: wanted.set(), threshold_pages=CHECKPOINT_PAGES)
    thread = threading.Thread(target=checkpointer, name="checkpointer", daemon=True)
    thread.start()
    reqs = [msgspec.convert(job_params(i), EnqueueRequest) for i in range(LINE_POOL)]
    if per_commit == BATCH_SIZE:
        groups = [[EnqueueGroup(reqs[:BATCH_SIZE], batch=True)]]
    else:
        groups = [
            [EnqueueGroup([reqs[(k + j) % LINE_POOL]], batch=False) for j in range(per_commit)]
            for k in range(0, LINE_POOL, per_commit)
        ]

    fsync = [0.0, 0.0]  # seconds in sync_wal: wall, this thread's CPU

    def op(i: int) -> int:
        for outcome in store.enqueue_groups(groups[i % len(groups)], now=int(time.time() * 1000)):
            if isinstance(outcome, Exception):
                raise BenchError(f"the store refused a bench job: {outcome}")
        if store.needs_sync:
            wall, cpu = time.perf_counter(), time.thread_time()
            store.sync_wal()
            fsync[0] += time.perf_counter() - wall
            fsync[1] += time.thread_time() - cpu
        return per_commit

    def probe() -> tuple[float, float, float]:
        return time.thread_time(), *fsync

    try:
        figures, before, after = timed_loop(op, warmup_s, measure_s, probe)
        cpu, fsync_wall, fsync_cpu = (a - b for a, b in zip(after, before, strict=True))
        # This thread's CPU without the fsync, which a daemon may run in another thread
        # (as it does the checkpoints, which are not in this thread's CPU either).
        figures["cpu_us_per_job"] = 1e6 * (cpu - fsync_cpu) / figures["jobs"]
        figures["fsync_ms_per_commit"] = 1e3 * fsync_wall / figures["calls"]
    finally:
        finished = True
        wanted.set()
        thread.join()
        store.close()
    return figures


ECHO_SERVER = "--echo-server"


def echo_server_main(path: str) -> None:
    """A minimal trio NDJSON echo server: each line goes back as it came."""
    import trio

    async def handle(stream: trio.SocketStream) -> None:
        buf = bytearray()
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while data := await stream.receive_some(65536):
                buf += data
                while (newline := buf.find(b"\n")) >= 0:
                    line = bytes(buf[: newline + 1])
                    del buf[: newline + 1]
                    await stream.send_all(line)

    async def main() -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        await sock.bind(path)
        sock.listen(64)
        print("ready", flush=True)
        await trio.serve_listeners(handle, [trio.SocketListener(sock)])

    trio.run(main)


def bench_echo(base: Path, warmup_s: float, measure_s: float) -> dict[str, Any]:
    path = str(base / "echo.sock")
    proc = subprocess.Popen(
        [sys.executable, __file__, ECHO_SERVER, path], stdout=subprocess.PIPE, cwd=REPO
    )
    try:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            raise BenchError("the echo server did not start")
        client = LineClient(path)
        lines = enqueue_lines(LINE_POOL)
        server = psutil.Process(proc.pid)

        def server_cpu() -> float:
            times = server.cpu_times()
            return times.user + times.system

        figures, cpu0, cpu1 = timed_loop(
            lambda i: len(client.call(lines[i % LINE_POOL])) and 1,
            warmup_s,
            measure_s,
            server_cpu,
        )
        figures["server_cpu_us_per_call"] = 1e6 * (cpu1 - cpu0) / figures["calls"]
        client.close()
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    figures["server"] = "trio, one task per connection, receive_some/find/send_all"
    return figures


# --------------------------------------------------------------------------- the daemon


class DaemonProcess:
    """`python -m semantica.daemon` on its own SEMANTICA_HOME, as tests/harness.py runs it."""

    def __init__(self, base: Path, synchronous: str) -> None:
        self.synchronous = synchronous
        self.home = base / synchronous.lower()
        self.socket_path = str(self.home / "semantica.sock")
        self.log_path = base / f"daemon-{synchronous.lower()}.log"
        self.notify_path = str(base / "notify.sock")
        self.proc: subprocess.Popen | None = None

    def start(self) -> DaemonProcess:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.notify_path)
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(self.notify_path)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SEMANTICA_", "NOTIFY_"))}
        env.update(
            SEMANTICA_HOME=str(self.home),
            SEMANTICA_RPC_PORT="0",
            SEMANTICA_LOG_FORMAT="json",
            SEMANTICA_LOG_LEVEL="warning",
            SEMANTICA_SYNCHRONOUS=self.synchronous.lower(),
            NOTIFY_SOCKET=self.notify_path,
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "semantica.daemon"],
                env=env,
                cwd=REPO,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while (left := deadline - time.monotonic()) > 0:
                if self.proc.poll() is not None:
                    break
                notify.settimeout(min(left, 0.5))
                try:
                    got = notify.recv(4096).decode()
                except TimeoutError:
                    continue
                if "READY=1" in got.split("\n"):
                    self._pause_bench_queue()
                    return self
            self.stop()
            raise BenchError(f"the daemon never became ready; its log:\n{self.log()}")
        finally:
            notify.close()

    def _pause_bench_queue(self) -> None:
        """Jobs stay QUEUED: starting runners would compete with the enqueues measured."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(self.socket_path))
            s.sendall(
                b'{"jsonrpc":"2.0","method":"queues.pause.v1","params":{"queue":"'
                + BENCH_QUEUE.encode()
                + b'"},"id":1}\n'
            )
            reply = s.recv(65536)
        if b'"result"' not in reply:
            raise BenchError(f"could not pause the bench queue: {reply!r}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def host_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, every CPU and every process."""
    t = psutil.cpu_times()
    total = sum(t)
    return total - t.idle - getattr(t, "iowait", 0.0), total


def host_busy_pct(before: tuple[float, float], after: tuple[float, float]) -> float:
    """Share of all CPUs busy between two host_cpu() samples."""
    total = after[1] - before[1]
    return 100.0 * (after[0] - before[0]) / total if total > 0 else 0.0


class Snapshot(msgspec.Struct, frozen=True):
    wall: float
    daemon_cpu: float
    client_cpu: float  # this process (the sequential client)
    host: tuple[float, float]
    jobs: int
    commits: int


class Probe:
    """Daemon CPU, this process's CPU, the host's CPU and the daemon's commit counters."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.process = psutil.Process(daemon.pid)
        self.client = semantica.Client(daemon.socket_path)

    def __call__(self) -> Snapshot:
        counters = self.client.stats().counters
        cpu = self.process.cpu_times()
        return Snapshot(
            wall=time.monotonic(),
            daemon_cpu=cpu.user + cpu.system,
            client_cpu=time.process_time(),
            host=host_cpu(),
            jobs=counters.job_enqueue_total,
            commits=counters.enqueue_commits_total,
        )

    @staticmethod
    def delta(before: Snapshot, after: Snapshot) -> dict[str, Any]:
        wall = after.wall - before.wall
        cpu = after.daemon_cpu - before.daemon_cpu
        jobs = after.jobs - before.jobs
        commits = after.commits - before.commits
        return {
            "daemon_cpu_pct": 100.0 * cpu / wall,
            "daemon_cpu_us_per_job": 1e6 * cpu / jobs if jobs else None,
            "client_cpu_pct": 100.0 * (after.client_cpu - before.client_cpu) / wall,
            "host_cpu_pct": host_busy_pct(before.host, after.host),
            "jobs_committed": jobs,
            "commits": commits,
            "jobs_per_commit": jobs / commits if commits else None,
        }

    def close(self) -> None:
        self.client.close()


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


# --------------------------------------------------------------------------- daemon rows


def row_seq_ndjson(d: DaemonProcess, probe: Probe, warmup_s: float, measure_s: float) -> dict:
    client = LineClient(d.socket_path)
    lines = enqueue_lines(LINE_POOL)

    def op(i: int) -> int:
        check_reply(client.call(lines[i % LINE_POOL]))
        return 1

    figures, before, after = timed_loop(op, warmup_s, measure_s, probe)
    client.close()
    return {**figures, **Probe.delta(before, after)}


def row_seq_sdk(d: DaemonProcess, probe: Probe, warmup_s: float, measure_s: float) -> dict:
    client = semantica.Client(d.socket_path)
    params = [job_params(i) for i in range(LINE_POOL)]

    def op(i: int) -> int:
        client.enqueue(**params[i % LINE_POOL])
        return 1

    figures, before, after = timed_loop(op, warmup_s, measure_s, probe)
    client.close()
    return {**figures, **Probe.delta(before, after)}


def row_seq_http(d: DaemonProcess, probe: Probe, warmup_s: float, measure_s: float) -> dict:
    conn = UnixHTTPConnection(d.socket_path)
    bodies = [line.rstrip(b"\n") for line in enqueue_lines(LINE_POOL)]
    headers = {"Content-Type": "application/json"}

    def op(i: int) -> int:
        conn.request("POST", "/", body=bodies[i % LINE_POOL], headers=headers)
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            raise BenchError(f"HTTP {response.status}: {body[:400]!r}")
        check_reply(body)
        return 1

    figures, before, after = timed_loop(op, warmup_s, measure_s, probe)
    conn.close()
    return {**figures, **Probe.delta(before, after), "http_connections": conn.connects}


def _concurrent_worker(
    path: str, lines: list[bytes], start_at: float, end_at: float, results: Any
) -> None:
    """One client process: warm up until start_at, count calls that finish by end_at."""
    try:
        client = LineClient(path)
        clock = time.monotonic
        i = 0
        while clock() < start_at:
            check_reply(client.call(lines[i % len(lines)]))
            i += 1
        lat: list[float] = []
        cpu0 = time.process_time()
        t = clock()
        while True:
            check_reply(client.call(lines[i % len(lines)]))
            i += 1
            now = clock()
            if now > end_at:
                break
            lat.append(now - t)
            t = now
        cpu = time.process_time() - cpu0
        client.close()
        results.put(("ok", (lat, cpu)))
    except Exception as exc:
        results.put(("error", repr(exc)))


def row_concurrent(d: DaemonProcess, probe: Probe, warmup_s: float, measure_s: float) -> dict:
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    lines = [enqueue_lines(LINE_POOL, k * LINE_POOL) for k in range(CONCURRENT_CLIENTS)]
    start_at = time.monotonic() + 0.3 + warmup_s  # 0.3 s for the processes to start
    end_at = start_at + measure_s
    workers = [
        ctx.Process(
            target=_concurrent_worker,
            args=(d.socket_path, lines[k], start_at, end_at, results),
        )
        for k in range(CONCURRENT_CLIENTS)
    ]
    for w in workers:
        w.start()
    time.sleep(max(0.0, start_at - time.monotonic()))
    before = probe()
    time.sleep(max(0.0, end_at - time.monotonic()))
    after = probe()
    outcomes = [results.get(timeout=SOCKET_TIMEOUT_S) for _ in workers]
    for w in workers:
        w.join()
    errors = [o[1] for o in outcomes if o[0] == "error"]
    if errors:
        raise BenchError(f"a client process failed: {errors[0]}")
    lat = [x for _, (worker_lat, _) in outcomes for x in worker_lat]
    per_client = [len(worker_lat) for _, (worker_lat, _) in outcomes]
    client_cpu = sum(cpu for _, (_, cpu) in outcomes)
    return {
        "clients": CONCURRENT_CLIENTS,
        "calls": len(lat),
        "jobs": len(lat),
        "seconds": measure_s,
        "calls_per_s": len(lat) / measure_s,
        "jobs_per_s": len(lat) / measure_s,
        "per_client_calls": per_client,
        "latency": latency_summary(lat),
        **Probe.delta(before, after),
        "client_cpu_pct": 100.0 * client_cpu / measure_s,  # all client processes together
    }


def row_batch(d: DaemonProcess, probe: Probe, warmup_s: float, measure_s: float) -> dict:
    client = LineClient(d.socket_path)
    lines = batch_lines(BATCH_POOL)

    def op(i: int) -> int:
        check_reply(client.call(lines[i % BATCH_POOL]))
        return BATCH_SIZE

    figures, before, after = timed_loop(op, warmup_s, measure_s, probe)
    client.close()
    return {**figures, **Probe.delta(before, after), "batch_size": BATCH_SIZE}


ROW_FUNCS = {
    "seq_ndjson": row_seq_ndjson,
    "seq_sdk": row_seq_sdk,
    "seq_http": row_seq_http,
    "concurrent_ndjson": row_concurrent,
    "batch": row_batch,
}


def bench_daemon(
    base: Path, synchronous: str, warmup_s: float, measure_s: float, idle_s: float | None, say
) -> dict[str, Any]:
    daemon = DaemonProcess(base, synchronous).start()
    out: dict[str, Any] = {"pid": daemon.pid, "rss_mb_fresh": None}
    try:
        time.sleep(0.2)
        out["rss_mb_fresh"] = rss_mb(daemon.pid)
        probe = Probe(daemon)
        for name in ROWS:
            say(f"synchronous={synchronous}: {ROW_LABELS[name].split(maxsplit=1)[1]} ...")
            out[name] = ROW_FUNCS[name](daemon, probe, warmup_s, measure_s)
        out["jobs_in_db"] = sum(probe.client.stats().jobs_by_state.values())
        probe.close()
        out["rss_mb_after_load"] = rss_mb(daemon.pid)
        if idle_s is not None:
            say(f"synchronous={synchronous}: idle for {SETTLE_S:g} + {idle_s:g} s ...")
            time.sleep(SETTLE_S)
            process = psutil.Process(daemon.pid)
            cpu0, host0, t0 = process.cpu_times(), host_cpu(), time.monotonic()
            time.sleep(idle_s)
            cpu1, host1, t1 = process.cpu_times(), host_cpu(), time.monotonic()
            busy = (cpu1.user + cpu1.system) - (cpu0.user + cpu0.system)
            out["idle"] = {
                "seconds": t1 - t0,
                "cpu_seconds": busy,
                "cpu_pct": 100.0 * busy / (t1 - t0),
                "rss_mb": rss_mb(daemon.pid),
                # Nothing of ours runs in this window: this is everybody else's load.
                "host_cpu_pct": host_busy_pct(host0, host1),
                "after": f"serving the synchronous={synchronous} load above, all clients gone, "
                f"{SETTLE_S:g} s settle",
            }
        if daemon.proc is not None and daemon.proc.poll() is not None:
            raise BenchError(f"the daemon died; its log:\n{daemon.log()}")
        out["warnings_logged"] = daemon.log().count('"level":"warning"')
    finally:
        daemon.stop()
    return out


# --------------------------------------------------------------------------- the run


@contextlib.contextmanager
def scratch_dir(explicit: str | None) -> Iterator[Path]:
    """A short temporary directory, on the repository's filesystem when possible."""
    if explicit:
        parent = Path(explicit)
    else:
        tmp = Path(tempfile.gettempdir())
        same = os.stat(tmp).st_dev == os.stat(REPO).st_dev
        parent = tmp if same else REPO / "bench" / ".tmp"
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="semb-", dir=parent))
    try:
        longest = path / "normal" / "semantica.sock"
        if len(str(longest)) > MAX_SOCKET_PATH:
            raise BenchError(f"{longest} is too long for a Unix socket: pass a shorter --tmp-dir")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        if parent == REPO / "bench" / ".tmp":
            with contextlib.suppress(OSError):
                parent.rmdir()


def concurrent_ceiling(grouped: dict[str, Any], echo_cpu_us: float) -> float:
    """The most CONCURRENT_CLIENTS sequential clients could get, jobs/s: the lower of
    one core spending the store's CPU per job (without the fsync, which may run in
    another thread) plus an echo server's per round trip, and one fsync at a time
    covering at most one request per client (each waits for its answer)."""
    cpu_bound = 1e6 / (grouped["cpu_us_per_job"] + echo_cpu_us)
    fsync_ms = grouped["fsync_ms_per_commit"]
    fsync_bound = CONCURRENT_CLIENTS * 1e3 / fsync_ms if fsync_ms > 0 else math.inf
    return min(cpu_bound, fsync_bound)


def goal(text: str, value: float | None, ok: bool) -> dict[str, Any]:
    return {"goal": text, "value": value, "pass": ok}


def run(args: argparse.Namespace) -> dict[str, Any]:
    idx = 1 if args.quick else 0
    warmup_s, measure_s, baseline_s = WARMUP_S[idx], MEASURE_S[idx], BASELINE_S[idx]
    idle_s = args.idle_seconds if args.idle_seconds is not None else IDLE_S[idx]

    def say(text: str) -> None:
        if not args.json:
            print(f"  {text}", file=sys.stderr, flush=True)

    started = time.monotonic()
    r: dict[str, Any] = {
        "quick": args.quick,
        "python": sys.version.split()[0],
        "sqlite": apsw.sqlite_lib_version(),
        "apsw": apsw.apsw_version(),
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
        "warmup_s": warmup_s,
        "measure_s": measure_s,
        "job": (
            "keyless noop job (queue paused), 56-byte payload {path, n}; "
            "a request line is ~150 bytes"
        ),
        "clients": {
            "seq_ndjson": "raw Unix socket, pre-encoded lines (protocol.encode_request)",
            "seq_sdk": "semantica.Client.enqueue",
            "seq_http": "http.client keep-alive over the Unix socket",
            "concurrent_ndjson": f"{CONCURRENT_CLIENTS} forked processes, raw pre-encoded lines",
            "batch": f"raw pre-encoded dev.enqueue_batch.v1 lines, {BATCH_SIZE} jobs each",
        },
    }
    with scratch_dir(args.tmp_dir) as base:
        r["tmp_dir"] = str(base)
        r["same_filesystem_as_repo"] = os.stat(base).st_dev == os.stat(REPO).st_dev
        baselines: dict[str, Any] = {}
        say("baseline: NDJSON echo ...")
        baselines["echo"] = bench_echo(base, warmup_s, baseline_s)
        r["baselines"] = baselines
        # NORMAL first so that the idle figures come from the default (FULL) configuration.
        # The disk's fsync latency drifts on a shared machine: the apsw baseline of each
        # setting is taken right before and right after that setting's daemon rows.
        r["daemon"] = {}
        for sync in ("NORMAL", "FULL"):
            key = sync.lower()
            say(f"baseline: raw apsw INSERT, synchronous={sync} ...")
            before = bench_raw_apsw(base / f"raw-{key}-1.db", sync, warmup_s, baseline_s)
            r["daemon"][sync] = bench_daemon(
                base, sync, warmup_s, measure_s, idle_s if sync == "FULL" else None, say
            )
            say(f"baseline: raw apsw INSERT, synchronous={sync}, again ...")
            after = bench_raw_apsw(base / f"raw-{key}-2.db", sync, warmup_s, baseline_s)
            baselines[f"apsw_{key}"] = {
                "before": before,
                "after": after,
                "calls_per_s": (before["calls_per_s"] + after["calls_per_s"]) / 2,
            }
            for name, per_commit in STORE_ROWS.items():
                say(f"baseline: the store alone, {name}, synchronous={sync} ...")
                baselines[f"store_{name}_{key}"] = bench_store(
                    base / f"store-{name}-{key}.db", sync, per_commit, warmup_s, baseline_s
                )
    echo = baselines["echo"]["calls_per_s"]
    for sync, d in r["daemon"].items():
        apsw_rate = baselines[f"apsw_{sync.lower()}"]["calls_per_s"]
        for name in ROWS:
            d[name]["vs_apsw"] = d[name]["jobs_per_s"] / apsw_rate
            d[name]["vs_echo"] = d[name]["calls_per_s"] / echo
    full, normal = r["daemon"]["FULL"], r["daemon"]["NORMAL"]
    idle = full["idle"]
    seq_goal = f">= {GOAL_SEQ_PER_S:,.0f}/s"
    batch_goal = f">= {GOAL_BATCH_JOBS_PER_S:,.0f} jobs/s"

    def seq(d: dict) -> float:
        return d["seq_ndjson"]["jobs_per_s"]

    def batch(d: dict) -> float:
        return d["batch"]["jobs_per_s"]

    conc = full["concurrent_ndjson"]["jobs_per_s"]

    def store(name: str, sync: str) -> float:
        return baselines[f"store_{name}_{sync}"]["jobs_per_s"]

    def seq_ceiling(sync: str) -> float:  # the store's time plus a bare round trip's
        return 1 / (1 / store("single", sync) + 1 / echo)

    ceilings = {
        "seq_ndjson_full": seq_ceiling("full"),
        "seq_ndjson_normal": seq_ceiling("normal"),
        "concurrent_full": concurrent_ceiling(
            baselines["store_grouped_full"], baselines["echo"]["server_cpu_us_per_call"]
        ),
        "batch_full": store("batch", "full"),
        "batch_normal": store("batch", "normal"),
    }
    r["goals"] = {
        "seq_ndjson_full": goal(seq_goal, seq(full), seq(full) >= GOAL_SEQ_PER_S),
        "seq_ndjson_normal": goal(seq_goal, seq(normal), seq(normal) >= GOAL_SEQ_PER_S),
        "concurrent_full": goal(
            f">= {GOAL_CONCURRENT_FULL_PER_S:,.0f}/s", conc, conc >= GOAL_CONCURRENT_FULL_PER_S
        ),
        "batch_full": goal(batch_goal, batch(full), batch(full) >= GOAL_BATCH_JOBS_PER_S),
        "batch_normal": goal(batch_goal, batch(normal), batch(normal) >= GOAL_BATCH_JOBS_PER_S),
        "idle_cpu_pct": goal(
            f"<= {GOAL_IDLE_CPU_PCT} %", idle["cpu_pct"], idle["cpu_pct"] <= GOAL_IDLE_CPU_PCT
        ),
        "rss_mb": goal(f"<= {GOAL_RSS_MB:g} MB", idle["rss_mb"], idle["rss_mb"] <= GOAL_RSS_MB),
    }
    thresholds = {
        "seq_ndjson_full": GOAL_SEQ_PER_S,
        "seq_ndjson_normal": GOAL_SEQ_PER_S,
        "concurrent_full": GOAL_CONCURRENT_FULL_PER_S,
        "batch_full": GOAL_BATCH_JOBS_PER_S,
        "batch_normal": GOAL_BATCH_JOBS_PER_S,
    }
    for key, ceiling in ceilings.items():
        r["goals"][key]["ceiling"] = ceiling
        r["goals"][key]["goal_within_ceiling"] = ceiling >= thresholds[key]
    r["all_pass"] = all(g["pass"] for g in r["goals"].values())
    r["wall_seconds"] = time.monotonic() - started
    r["loadavg_at_end"] = os.getloadavg()
    return r


# --------------------------------------------------------------------------- report


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def print_table(r: dict[str, Any]) -> None:
    b = r["baselines"]
    print()
    print(
        f"Semantica RPC bench: Python {r['python']}, SQLite {r['sqlite']}, apsw {r['apsw']}, "
        f"{r['cpus']} CPUs" + (" (--quick)" if r["quick"] else "")
    )
    same = "same filesystem as repo" if r["same_filesystem_as_repo"] else "OTHER filesystem!"
    print(f"files in {r['tmp_dir']} ({same}), removed afterwards")
    print(
        f"each figure: {r['warmup_s']:g} s warm-up, then {r['measure_s']:g} s measured; "
        f"job: {r['job']}"
    )
    load0, load1 = r["loadavg_at_start"], r["loadavg_at_end"]
    print(
        f"host load average (1/5/15 min): {load0[0]:.2f}/{load0[1]:.2f}/{load0[2]:.2f} at start, "
        f"{load1[0]:.2f}/{load1[1]:.2f}/{load1[2]:.2f} at end"
    )
    print()
    header = f"{'baseline':<48}{'per second':>12}{'p50 ms':>9}{'p99 ms':>9}{'CPU us':>8}"
    print(header)
    print("-" * len(header))
    rows = [("echo", "NDJSON echo round trip (trio server, 1 client)", b["echo"])]
    for sync in ("FULL", "NORMAL"):
        for when in ("before", "after"):
            label = f"raw apsw INSERT txn, WAL, {sync}, {when} daemon"
            rows.append((f"apsw_{sync.lower()}", label, b[f"apsw_{sync.lower()}"][when]))
    for sync in ("FULL", "NORMAL"):
        for name, per_commit in STORE_ROWS.items():
            what = {"single": "1 enqueue", "grouped": f"{per_commit} enqueues"}.get(
                name, f"batch of {per_commit:,}"
            )
            label = f"store alone, {what}/commit, {sync}"
            rows.append((name, label, b[f"store_{name}_{sync.lower()}"]))
    for _, label, x in rows:
        cpu = x.get("cpu_us_per_job", x.get("server_cpu_us_per_call"))
        print(
            f"{label:<48}{x['jobs_per_s']:>12,.0f}{x['latency']['p50_ms']:>9.3f}"
            f"{x['latency']['p99_ms']:>9.3f}{fmt(cpu, '.0f'):>8}"
        )
    print(
        "per second: calls, or jobs for the store alone. store alone: semantica's Store in\n"
        "the bench's process, no RPC, opened as the daemon opens it, one fsync per commit\n"
        "at FULL; its p50/p99 are per commit. CPU us: the echo server's CPU per round trip;\n"
        "the store's per job (its thread's, without the fsync and the checkpoints)"
    )
    for sync in ("FULL", "NORMAL"):
        d = r["daemon"][sync]
        print()
        header = (
            f"{'daemon, synchronous=' + sync:<34}{'calls/s':>8}{'jobs/s':>8}{'/apsw':>7}"
            f"{'/echo':>7}{'p50 ms':>8}{'p99 ms':>8}{'jobs/cmt':>9}{'dCPU%':>7}{'us/job':>7}"
            f"{'cCPU%':>7}{'host%':>7}"
        )
        print(header)
        print("-" * len(header))
        for name in ROWS:
            x = d[name]
            print(
                f"{ROW_LABELS[name]:<34}{x['calls_per_s']:>8,.0f}{x['jobs_per_s']:>8,.0f}"
                f"{x['vs_apsw']:>7.2f}{x['vs_echo']:>7.2f}{x['latency']['p50_ms']:>8.2f}"
                f"{x['latency']['p99_ms']:>8.2f}{fmt(x['jobs_per_commit'], '>9.1f')}"
                f"{x['daemon_cpu_pct']:>7.0f}{fmt(x['daemon_cpu_us_per_job'], '>7.0f')}"
                f"{x['client_cpu_pct']:>7.0f}{x['host_cpu_pct']:>7.0f}"
            )
        print(
            f"  RSS fresh {d['rss_mb_fresh']:.1f} MB, after load {d['rss_mb_after_load']:.1f} MB; "
            f"{d['jobs_in_db']:,} jobs in the database; HTTP connections used "
            f"{d['seq_http']['http_connections']}; warnings logged {d['warnings_logged']}"
        )
    print()
    print("/apsw: jobs/s over raw apsw txn/s at the same synchronous (mean of before and after);")
    print("/echo: calls/s over echo round trips/s; jobs/cmt: jobs per commit (admin.stats")
    print("counters); dCPU%: daemon CPU (100 = one core); us/job: daemon CPU per job; cCPU%:")
    print(f"the client(s)' CPU; host%: all {r['cpus']} CPUs busy, every process on the machine")
    idle = r["daemon"]["FULL"]["idle"]
    print()
    print(
        f"idle daemon (synchronous=FULL, after {idle['after']}): CPU {idle['cpu_pct']:.3f} % "
        f"over {idle['seconds']:.0f} s ({idle['cpu_seconds'] * 1000:.0f} ms CPU), "
        f"RSS {idle['rss_mb']:.1f} MB"
    )
    print(
        f"other processes kept {idle['host_cpu_pct']:.0f} % of the host's CPUs busy during the "
        "idle window"
        + (
            ": the machine is shared, figures above are lower than on a quiet one"
            if idle["host_cpu_pct"] > 10
            else ""
        )
    )
    print()
    labels = {
        "seq_ndjson_full": "1 sequential NDJSON client, synchronous=FULL",
        "seq_ndjson_normal": "1 sequential NDJSON client, synchronous=NORMAL",
        "concurrent_full": f"{CONCURRENT_CLIENTS} concurrent clients, synchronous=FULL",
        "batch_full": "enqueue_batch, synchronous=FULL",
        "batch_normal": "enqueue_batch, synchronous=NORMAL",
        "idle_cpu_pct": "idle CPU %",
        "rss_mb": "RSS MB (idle, after load)",
    }
    print(f"{'goal':<50}{'value':>10}{'ceiling':>10}  result")
    print("-" * 96)
    for key, g in r["goals"].items():
        ceiling = g.get("ceiling")
        above = not g["pass"] and not g.get("goal_within_ceiling", True)
        beyond = "; above the ceiling" if above else ""
        print(
            f"{labels[key]:<50}{g['value']:>10,.1f}{fmt(ceiling, ',.0f'):>10}  "
            f"{mark(g['pass'])} ({g['goal']}{beyond})"
        )
    print(
        "ceiling: what the store alone does on this host, so the most that any RPC layer in\n"
        "front of it could reach. A sequential client: the store alone at 1 enqueue per\n"
        "commit, plus one echo round trip per call. "
        f"{CONCURRENT_CLIENTS} clients: the lower of one core\n"
        f"spending the store's CPU per job at {CONCURRENT_CLIENTS} per commit (fsync aside) "
        "plus the echo server's per\nround trip, and "
        f"{CONCURRENT_CLIENTS} jobs per fsync, one fsync at a time. "
        "enqueue_batch: the store alone."
    )
    print(f"overall: {mark(r['all_pass'])}   (bench wall time {r['wall_seconds']:.0f} s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short windows: a smoke run")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--idle-seconds",
        type=float,
        help=f"idle CPU window (default {IDLE_S[0]:g} s, {IDLE_S[1]:g} s with --quick)",
    )
    parser.add_argument(
        "--tmp-dir",
        help="parent of the scratch directory (default: the system temp dir when it is on "
        "the repository's filesystem, else bench/.tmp); keep it short and on the disk to measure",
    )
    parser.add_argument(ECHO_SERVER, metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.echo_server:
        echo_server_main(args.echo_server)
        return 0
    try:
        results = run(args)
    except BenchError as exc:
        print(f"rpc_bench: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
