"""Maintenance benchmark (issue 7): a database with 1,000,000 finished jobs, a real
daemon, and the API's latency while maintenance deletes most of them. Prints figures;
it is not a test.

    .venv/bin/python bench/maintenance_bench.py            # 1,000,000 jobs, a few minutes
    .venv/bin/python bench/maintenance_bench.py --quick    # 100,000 jobs

1. Build: `Store.open` creates and migrates the database; then raw SQL copies one
   template row per job in 100,000-row transactions (state DONE, a 200-byte payload).
   90 % finished 30 days ago (past the 7-day retention), 10 % an hour ago (kept);
   10,000 of the old jobs get a log file, to exercise file deletion too.
2. Start the daemon on it, pause queue "bench", then while one thread runs
   `admin.maintenance.v1`, another times small API calls on its own connection
   (alternately jobs.get.v1 of a kept job and dev.enqueue.v1 into the paused queue)
   until maintenance returns.

Goals: maintenance completes; the API's p99 latency during it <= 50 ms; the database
shrinks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from harness import start_daemon  # noqa: E402

from semantica.store import Store  # noqa: E402

DAY_MS = 86_400_000
CHUNK = 100_000
LOG_FILES = 10_000

INSERT = """
WITH RECURSIVE n(i) AS (SELECT :start UNION ALL SELECT i + 1 FROM n WHERE i < :stop - 1)
INSERT INTO jobs (id, state, queue, job_type, payload, priority, execution_mode,
    max_attempts, backoff_base_ms, backoff_factor, deadline_ms, wait_for_idle,
    require_charging, attempt, created_at, run_after, started_at, finished_at, result_summary)
SELECT printf('bench-%09d', i), 'DONE', 'default', 'noop', :payload, 0, 'SUBPROCESS',
    3, 1000, 2.0, 60000, 0, 0, 1, :at, :at, :at, :at + 5, '{"ok":true}'
FROM n
"""


def build(home: Path, jobs: int) -> tuple[float, int]:
    started = time.monotonic()
    home.mkdir(mode=0o700, parents=True)
    store = Store.open(home / "meta.db")
    db = store.connection
    db.execute("INSERT OR IGNORE INTO queues (name, created_at) VALUES ('default', 0)")
    now = int(time.time() * 1000)
    old, kept = now - 30 * DAY_MS, now - 3_600_000
    payload = b'{"path": "' + b"x" * 180 + b'"}'
    chunk = min(CHUNK, jobs // 10)  # the last tenth is the kept one
    for start in range(0, jobs, chunk):
        stop = min(jobs, start + chunk)
        at = old if start < jobs * 0.9 else kept
        with db:
            db.execute(INSERT, {"start": start, "stop": stop, "payload": payload, "at": at})
    store.checkpoint("TRUNCATE")
    store.close()
    logs = home / "logs"
    logs.mkdir(mode=0o700)
    for i in range(LOG_FILES):
        (logs / f"bench-{i:09d}.log").write_text("a line of log\n")
    return time.monotonic() - started, os.path.getsize(home / "meta.db")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q / 100))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--jobs", type=int, help="finished jobs to build (default 1,000,000)")
    args = parser.parse_args()
    jobs = args.jobs or (100_000 if args.quick else 1_000_000)
    print(
        f"maintenance_bench: {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, "
        f"{jobs:,} finished jobs"
    )
    base = Path(tempfile.mkdtemp(prefix="sem-mb-", dir=REPO))
    home = base / "home"
    daemon = None
    try:
        seconds, size = build(home, jobs)
        print(f"built in {seconds:.1f} s: {size / 1048576:.0f} MiB, {LOG_FILES:,} log files")
        daemon = start_daemon(
            home,
            SEMANTICA_RETENTION_DAYS="7",
            SEMANTICA_MAINTENANCE_HOURS="8760",
            SEMANTICA_WORKERS="2",
            SEMANTICA_LOG_LEVEL="info",
        )
        kept_id = f"bench-{jobs - 1:09d}"
        with daemon.client() as c:
            c.pause("bench")
        report: dict = {}
        done = threading.Event()

        def maintain() -> None:
            try:
                with daemon.client() as c:
                    report["r"] = c.maintenance()
            finally:
                done.set()

        latencies: list[float] = []
        worker = threading.Thread(target=maintain)
        with daemon.client() as c:
            worker.start()
            i = 0
            while not done.is_set():
                t0 = time.perf_counter()
                if i % 2:
                    c.enqueue(job_type="noop", queue="bench")
                else:
                    c.get(kept_id)
                latencies.append((time.perf_counter() - t0) * 1000)
                i += 1
        worker.join()
        r = report["r"]
        p99 = percentile(latencies, 99)
        print(
            f"maintenance: {r.duration_ms / 1000:.1f} s; deleted {r.jobs_deleted:,} jobs and "
            f"{r.files_deleted:,} files, {r.orphans_deleted:,} orphans; vacuum {r.vacuum}; "
            f"database {r.db_bytes_before / 1048576:.0f} -> {r.db_bytes_after / 1048576:.0f} MiB "
            f"({'PASS' if r.db_bytes_after < r.db_bytes_before else 'FAIL'}: it shrinks); "
            f"phases {r.phases_ms} ms; longest step on the event loop {r.longest_hold_ms} ms"
        )
        print(
            f"API during it: {len(latencies):,} calls, p50 {percentile(latencies, 50):.2f} ms, "
            f"p99 {p99:.2f} ms, max {max(latencies):.2f} ms "
            f"(goal p99 <= 50 ms: {'PASS' if p99 <= 50 else 'FAIL'})"
        )
        return 0
    except Exception:
        if daemon is not None:
            print("the daemon's log, last lines:\n" + "\n".join(daemon.log().splitlines()[-15:]))
        raise
    finally:
        if daemon is not None:
            daemon.stop(timeout=120)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
