"""Execution benchmark (issue 4): how fast jobs drain, side by side with peers, and how
soon a job starts. Prints figures; it is not a test.

    .venv/bin/python bench/exec_bench.py            # 2,000 jobs each, a few minutes
    .venv/bin/python bench/exec_bench.py --quick    # 300 jobs each, one round
    .venv/bin/python bench/exec_bench.py --rounds 5 # each system drained 5 times

Peers (`make bench-deps` installs them; each is skipped, saying how to get it, if absent):
- huey 3 (SqliteHuey, `huey_consumer -k process -w 2`, its default polling), a trivial
  task returning a number;
- task-spooler (`tsp -S 2`), 500 `true` jobs: a C client forking a C binary.

Each drains N jobs enqueued beforehand (queue paused / consumer not started / a gate
job holding tsp's slot) on 2 workers, timed from the release to the last result. The
systems take turns, 3 rounds (the host's speed drifts by 2x over minutes here); the
medians are compared, and each round's figures are printed.
Latency: WARM enqueue->start p50/p99 over sequential jobs (the daemon's own
started_at - created_at), then one job after the daemon has sat idle for 60 s
(--quick: 10 s).

Also, in the same run, the floor under SUBPROCESS on this host: how many forks and
exits a second a process holding the zygote's imports makes (serial, and one such
process per worker at once), and what a file and a directory cost to create where
the homes are (each job makes one of each).

Goals (issue 4): WARM drain >= 1.5x huey's; SUBPROCESS >= 400 jobs/s and >= 0.5x tsp's;
WARM enqueue->start p99 <= 5 ms, also after an idle minute.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from harness import remove_home, start_daemon  # noqa: E402

from semantica import runner  # noqa: E402

WORKERS = 2
# Homes are removed only once every run is over: ext4 skips over inodes freed in the
# last minute or more when it allocates new ones, so deleting a run's thousands of
# files would slow the file creation of the runs after it (and not the peers', which
# create no file per job).
LEFT_FOR_LATER: list[Path] = []
# task-spooler keeps one client process per queued job and its server stops accepting
# near 1,000 of them, so it drains the 500 `true` jobs, not N.
TSP_JOBS = 500
HUEY_TASKS = """
from huey import SqliteHuey
huey = SqliteHuey(filename={db!r})

@huey.task()
def noop():
    return 1
"""


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q / 100))]


def semantica_drain(n: int, mode: str) -> float:
    d = start_daemon(SEMANTICA_WORKERS=str(WORKERS), SEMANTICA_LOG_LEVEL="info")
    try:
        with d.client() as c:
            c.pause("drain")
            for start in range(0, n, 500):
                last = c.enqueue_batch(
                    [
                        {"job_type": "noop", "queue": "drain", "execution_mode": mode}
                        for _ in range(min(500, n - start))
                    ]
                ).jobs[-1]
            t0 = time.perf_counter()
            c.resume("drain")
            # One long-poll on the last job claimed, then a few looks at the counts: a
            # stats call every few ms would take the daemon's time from the drain.
            c.wait(last.id, timeout_ms=300_000)
            while c.stats().jobs_by_state.get("DONE", 0) < n:
                time.sleep(0.002)
            return n / (time.perf_counter() - t0)
    finally:
        d.stop()
        LEFT_FOR_LATER.append(d.home)


def semantica_latency(samples: int, idle_s: float) -> tuple[float, float, float]:
    d = start_daemon(SEMANTICA_WORKERS=str(WORKERS), SEMANTICA_LOG_LEVEL="info")
    try:
        with d.client() as c:
            lat = []
            for _ in range(samples + 20):
                job = c.enqueue(job_type="noop", execution_mode="WARM")
                done = c.wait(job.id, timeout_ms=10_000)
                lat.append(done.started_at - done.created_at)
            lat = lat[20:]  # the pool's first workers start during the first jobs
            time.sleep(idle_s)
            job = c.enqueue(job_type="noop", execution_mode="WARM")
            done = c.wait(job.id, timeout_ms=10_000)
            return percentile(lat, 50), percentile(lat, 99), done.started_at - done.created_at
    finally:
        d.stop()
        LEFT_FOR_LATER.append(d.home)


def huey_drain(n: int, tmp: Path, round_no: int = 0) -> float | None:
    consumer = Path(sys.executable).with_name("huey_consumer")
    try:
        import huey  # noqa: F401
    except ImportError:
        print("  huey: not installed (make bench-deps, or .venv/bin/pip install huey)")
        return None
    module = f"bench_huey_tasks_{round_no}"  # a database of its own each round
    (tmp / f"{module}.py").write_text(HUEY_TASKS.format(db=str(tmp / f"huey{round_no}.db")))
    if str(tmp) not in sys.path:
        sys.path.insert(0, str(tmp))
    tasks = importlib.import_module(module)

    results = [tasks.noop() for _ in range(n)]
    proc = subprocess.Popen(
        [str(consumer), f"{module}.huey", "-k", "process", "-w", str(WORKERS), "-q"],
        cwd=tmp,
        env={**os.environ, "PYTHONPATH": str(tmp)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    t0 = time.perf_counter()
    try:
        for r in results:
            r.get(blocking=True, timeout=120)
        return n / (time.perf_counter() - t0)
    finally:
        proc.terminate()
        proc.wait(10)


def tsp_drain(n: int, tmp: Path, round_no: int = 0) -> float | None:
    tsp = shutil.which("tsp") or shutil.which("ts")
    if tsp is None:
        print("  tsp: not installed (make bench-deps, or apt-get install task-spooler)")
        return None
    tmp = tmp / f"tsp{round_no}"  # a server, gate and output files of its own each round
    tmp.mkdir()
    env = {**os.environ, "TS_SOCKET": str(tmp / "ts.sock"), "TMPDIR": str(tmp), "TS_SLOTS": "1"}

    def ts(*args: str) -> str:
        return subprocess.run(
            [tsp, *args], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()

    gate = tmp / "go"
    ts("sh", "-c", f"while [ ! -e {gate} ]; do sleep 0.005; done")  # holds the one slot
    last = ""
    for _ in range(n):
        last = ts("true")
    ts("-S", str(WORKERS))
    t0 = time.perf_counter()
    gate.touch()
    ts("-w", last)
    rate = n / (time.perf_counter() - t0)
    ts("-K")
    return rate


# A fork-and-exit loop in a process holding what the zygote holds (the runner and
# every installed plugin, the heap frozen): the most fresh Python processes a second
# this host can make, before any job work. Prints "forks/s cpu_us_per_fork".
FORK_FLOOR = """
import os, resource, sys, time
from semantica import runner, zygote
runner._add_plugin_path()
zygote.prepare_to_fork()
n = int(sys.argv[1])
print("ready", flush=True)
sys.stdin.readline()  # start when told, with the other parents
before = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
started = time.perf_counter()
for _ in range(n):
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
took = time.perf_counter() - started
after = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
cpu = sum(a.ru_utime + a.ru_stime - b.ru_utime - b.ru_stime for a, b in zip(after, before))
print(n / took, cpu / n * 1e6)
"""


def fork_floor(n: int, parents: int) -> tuple[float, float]:
    """(forks/s of all `parents` together, CPU microseconds per fork and exit)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", FORK_FLOOR, str(n)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(parents)
    ]
    for p in procs:  # each has imported what the zygote imports
        assert p.stdout is not None
        if p.stdout.readline() != "ready\n":
            for q in procs:
                q.kill()
            raise RuntimeError("the fork floor loop could not set up: its error is above")
    for p in procs:
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"the fork floor loop failed: {outputs}")
    figures = [tuple(map(float, out.split())) for out in outputs]
    return sum(f[0] for f in figures), statistics.mean(f[1] for f in figures)


def file_costs(tmp: Path, n: int = 500) -> tuple[float, float]:
    """Microseconds to create an empty file and a directory where the homes are: each
    job makes one of each (its log, its working directory)."""
    base = Path(tempfile.mkdtemp(prefix="files-", dir=tmp))
    started = time.perf_counter()
    for i in range(n):
        os.close(runner.open_job_log(str(base / f"{i}.log")))
    files = time.perf_counter() - started
    started = time.perf_counter()
    for i in range(n):
        os.mkdir(base / f"d{i}", 0o700)
    dirs = time.perf_counter() - started
    return files / n * 1e6, dirs / n * 1e6  # left in place: see LEFT_FOR_LATER


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="drains of each system, taken in turn (default 3; --quick: 1); the "
        "medians are compared",
    )
    args = parser.parse_args()
    n = 300 if args.quick else 2_000
    rounds = args.rounds or (1 if args.quick else 3)
    print(
        f"exec_bench: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, "
        f"{n:,} jobs each, {WORKERS} workers, {rounds} round(s)"
    )
    tmp = Path(tempfile.mkdtemp(prefix="sem-eb-"))
    subs: list[float | None] = []
    warms: list[float | None] = []
    hueys: list[float | None] = []
    tsps: list[float | None] = []
    try:
        # Each round drains every system once, one after the other: the host's speed
        # drifts over minutes here, and a system measured only in a slow phase would
        # be compared unfairly. The medians over the rounds are compared.
        for round_no in range(rounds):
            subs.append(semantica_drain(n, "SUBPROCESS"))
            warms.append(semantica_drain(n, "WARM"))
            hueys.append(huey_drain(n, tmp, round_no))
            tsps.append(tsp_drain(TSP_JOBS, tmp, round_no))
            print(
                f"  round {round_no + 1}: SUBPROCESS {subs[-1]:.0f}, WARM {warms[-1]:.0f}, "
                f"huey {hueys[-1] or 0:.0f}, tsp ({TSP_JOBS} true jobs) {tsps[-1] or 0:.0f} jobs/s",
                flush=True,
            )
        serial, cpu_per_fork = fork_floor(500, 1)
        both, _ = fork_floor(500, WORKERS)
        create_us, mkdir_us = file_costs(tmp)
        sub, warm, hu, tsp = (_median(v) for v in (subs, warms, hueys, tsps))
        assert sub is not None and warm is not None
        p50, p99, after_idle = semantica_latency(
            100 if args.quick else 300, 10 if args.quick else 60
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for home in LEFT_FOR_LATER:
            remove_home(home)
    print(f"{'drain (jobs/s), median':<28}{'Semantica':>12}{'peer':>12}")
    print(f"{'SUBPROCESS vs tsp true':<28}{sub:>12.0f}{(tsp or 0):>12.0f}")
    print(f"{'WARM vs huey process':<28}{warm:>12.0f}{(hu or 0):>12.0f}")
    print(
        f"host floor, same run: fork+exit of a process holding the zygote's imports "
        f"{serial:.0f}/s serial, {both:.0f}/s on {WORKERS} parents ({cpu_per_fork:.0f} us "
        f"CPU each, before any job work); file create {create_us:.0f} us, mkdir "
        f"{mkdir_us:.0f} us (a job makes one of each)"
    )
    print(f"SUBPROCESS >= 400 jobs/s: {verdict(sub >= 400)}")
    if tsp:
        print(f"SUBPROCESS >= 0.5x tsp: {sub / tsp:.2f}x {verdict(sub >= 0.5 * tsp)}")
    if hu:
        print(f"WARM >= 1.5x huey: {warm / hu:.2f}x {verdict(warm >= 1.5 * hu)}")
    print(
        f"WARM enqueue->start: p50 {p50} ms, p99 {p99} ms ({verdict(p99 <= 5)}); "
        f"after idling: {after_idle} ms ({verdict(after_idle <= 5)})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
