"""Scheduling benchmark (issue 5): an idle daemon's cost, the dispatch cost with
100,000 jobs queued, and a supersede storm. Prints figures; it is not a test.

    .venv/bin/python bench/sched_bench.py            # about two and a half minutes
    .venv/bin/python bench/sched_bench.py --quick    # about half a minute

1. Idle: a real daemon with 10,000 noop jobs scheduled an hour ahead; over 60 s
   (--quick: 10 s) of nothing, the daemon's CPU time (psutil) and its dispatcher
   wake-ups (admin.stats.v1 `dispatcher_wakeups_total`), against the due times that
   fell in the window (none: the jobs are due in an hour).
2. Dispatch: `claim_next_job` latency with 100,000 jobs QUEUED over 100 queues
   (--quick: 10,000 over 10), measured in-process on a real database file by
   store_bench's claim benchmark, with the commit settings the daemon uses for claims.
3. Supersede storm: a daemon with 4 workers; 10,000 enqueues of 50 ms `sleep` jobs
   over 100 subject keys (--quick: 2,000) from 4 client threads while jobs run. Counts
   executions against the bound 100 + workers x ceil(storm seconds / 0.05), and
   checks that the newest generation of every key ran exactly once.

Goals (issue 5): idle CPU <= 0.2 % and wake-ups <= due times; executions within the
bound and every newest generation run once; dispatch p99 <= 2 ms.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import store_bench  # noqa: E402
from harness import remove_home, start_daemon  # noqa: E402

from semantica.domain import State  # noqa: E402

WORKERS = 4


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def idle(seconds: float, jobs: int) -> dict:
    d = start_daemon(SEMANTICA_WORKERS=str(WORKERS), SEMANTICA_LOG_LEVEL="info")
    try:
        with d.client() as c:
            at = int(time.time() * 1000) + 3_600_000
            for start in range(0, jobs, 1000):
                c.enqueue_batch(
                    [
                        {"job_type": "noop", "schedule_at": at}
                        for _ in range(min(1000, jobs - start))
                    ]
                )
            time.sleep(1.0)  # let the enqueue burst settle (group fsync, checkpoint)
            proc = psutil.Process(d.proc.pid)
            wake0 = c.stats().dispatcher_wakeups_total
            cpu0 = sum(proc.cpu_times()[:2])
            t0 = time.monotonic()
            c.close()  # an idle daemon: not even this connection
            time.sleep(seconds)
            cpu1 = sum(proc.cpu_times()[:2])
            elapsed = time.monotonic() - t0
            wake1 = c.stats().dispatcher_wakeups_total
        return {
            "jobs": jobs,
            "seconds": round(elapsed, 1),
            "cpu_percent": round(100 * (cpu1 - cpu0) / elapsed, 3),
            "wakeups": wake1 - wake0,
            "due_times": 0,
        }
    finally:
        d.stop()
        remove_home(d.home)


def dispatch(queues: int) -> dict:
    with tempfile.TemporaryDirectory(dir=REPO) as tmp:
        # As the daemon runs it: it opens the store with group_sync, so commits run
        # under synchronous=NORMAL and only acknowledged writes wait for an fsync of
        # the WAL, which a claim is not.
        return store_bench.bench_claim(Path(tmp) / "claim.db", "NORMAL", queues, 2000, 200)


def storm(enqueues: int, keys: int) -> dict:
    d = start_daemon(SEMANTICA_WORKERS=str(WORKERS), SEMANTICA_LOG_LEVEL="info")
    try:
        per_thread = enqueues // 4

        def client(n: int) -> None:
            with d.client() as c:
                for i in range(per_thread):
                    c.enqueue(
                        job_type="sleep",
                        queue="storm",
                        subject_key=f"k{(n * per_thread + i) % keys}",
                        payload={"seconds": 0.05},
                    )

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        storm_s = time.monotonic() - t0
        with d.client() as c:
            while True:
                counts = c.queues()
                info = next(q for q in counts.queues if q.name == "storm")
                if not info.counts.get("QUEUED") and not info.counts.get("RUNNING"):
                    break
                time.sleep(0.1)
            drained_s = time.monotonic() - t0
            jobs, cursor = [], None
            while True:
                page = c.list(queue="storm", limit=1000, cursor=cursor)
                jobs += page.jobs
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
        ran = [j for j in jobs if j.started_at is not None]
        newest: dict[str, object] = {}
        for j in jobs:
            if j.subject_key not in newest or j.generation > newest[j.subject_key].generation:
                newest[j.subject_key] = j
        newest_ran_once = all(j.state is State.DONE and j.attempt == 1 for j in newest.values())
        bound = keys + WORKERS * math.ceil(storm_s / 0.05)
        return {
            "enqueues": len(jobs),
            "keys": keys,
            "storm_seconds": round(storm_s, 2),
            "drained_seconds": round(drained_s, 2),
            "executions": len(ran),
            "superseded": sum(j.state is State.SUPERSEDED for j in jobs),
            "bound": bound,
            "newest_generation_ran_once": newest_ran_once,
        }
    finally:
        d.stop()
        remove_home(d.home)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    print(
        f"sched_bench: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, "
        f"Python {sys.version.split()[0]}"
    )
    quiet = idle(10 if args.quick else 60, 10_000)
    print(
        f"idle, {quiet['jobs']:,} jobs due in 1 h, {quiet['seconds']} s: "
        f"CPU {quiet['cpu_percent']} % (goal <= 0.2 %: {verdict(quiet['cpu_percent'] <= 0.2)}), "
        f"wake-ups {quiet['wakeups']} for {quiet['due_times']} due times "
        f"({verdict(quiet['wakeups'] <= quiet['due_times'])})"
    )
    claim = dispatch(10 if args.quick else 100)
    lat = claim["latency"]
    print(
        f"dispatch with {claim['queued_at_start']:,} queued over {claim['queues']} queues: "
        f"p50 {lat['p50_ms']:.2f} ms, p99 {lat['p99_ms']:.2f} ms "
        f"(goal p99 <= 2 ms: {verdict(lat['p99_ms'] <= 2.0)})"
    )
    s = storm(2_000 if args.quick else 10_000, 100)
    print(
        f"supersede storm: {s['enqueues']:,} enqueues over {s['keys']} keys in "
        f"{s['storm_seconds']} s (drained at {s['drained_seconds']} s): "
        f"{s['executions']:,} executions, {s['superseded']:,} superseded; bound "
        f"{s['bound']:,} ({verdict(s['executions'] <= s['bound'])}); newest generation "
        f"of every key ran once: {verdict(s['newest_generation_ran_once'])}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
