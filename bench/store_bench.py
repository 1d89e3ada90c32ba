"""Store throughput and claim-latency benchmark. Prints figures; it is not a test.

Run from the repo root:

    .venv/bin/python bench/store_bench.py                 # full run, well under a minute
    .venv/bin/python bench/store_bench.py --quick         # smoke run, a few seconds
    .venv/bin/python bench/store_bench.py --json          # one JSON document instead of a table
    .venv/bin/python bench/store_bench.py --synchronous NORMAL

What it measures, each on a fresh database file with the same settings (WAL journal,
`PRAGMA synchronous` from --synchronous, default FULL), in a temporary directory on
the same filesystem as the repository (deleted afterwards):

1. raw apsw: one single-row INSERT per `with db:` transaction into a plain table as
   wide as a job row (same 28 values the store inserts, no secondary index). The floor.
2. `Store.enqueue`, one transaction per job, run in alternating rounds with (1) so
   that both see the same machine load. Mix: every other job is keyless; the
   others cycle over ENQUEUE_KEYS subject keys, so once each key has been used every
   keyed enqueue bumps the subject's generation and supersedes a QUEUED job.
3. `Store.enqueue_batch`, BATCH_SIZE jobs per call, same mix.
4. `Store.claim_next_job` latency with 100,000 jobs QUEUED: 1,000 subject keys x 100
   queues (the schema allows one QUEUED job per queue/job_type/subject_key), filled with
   enqueue_batch (not timed; --quick uses 10 queues, so 10,000 jobs). Each claim is
   timed alone; the claimed job is then finished with `Outcome()` outside the timed
   region, so few jobs are ever RUNNING.

Goals checked: enqueue >= 60 % of raw inserts; enqueue_batch >= 50,000 jobs/s;
claim p99 <= 1 ms.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import apsw

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from semantica.domain import EnqueueRequest, Outcome  # noqa: E402
from semantica.store import SYNCHRONOUS_MODES, Conditions, Store  # noqa: E402

ENQUEUE_KEYS = 250  # subject keys the enqueue mix cycles over
BATCH_SIZE = 1_000
ROUND = 250  # raw and enqueue transactions alternate in runs of this many
CLAIM_KEYS = 1_000
GLOBAL_LIMIT = 1_000
START_MS = 1_700_000_000_000

GOAL_ENQUEUE_RATIO = 0.60
GOAL_BATCH_JOBS_PER_S = 50_000.0
GOAL_CLAIM_P99_MS = 1.0

# (full, quick) iteration counts.
COUNTS = {
    "warmup": (200, 50),
    "txns": (5_000, 500),  # raw INSERT transactions, and as many Store.enqueue calls
    "batch_batches": (30, 5),
    "claim_queues": (100, 10),  # x CLAIM_KEYS jobs queued: 100,000 (quick: 10,000)
    "claims": (2_000, 300),
}

# Same columns, in the same order, as store.SQL_INSERT_JOB; no secondary index.
RAW_TABLE = """
CREATE TABLE raw_jobs (
    seq INTEGER PRIMARY KEY, id TEXT NOT NULL, state TEXT NOT NULL, queue TEXT NOT NULL,
    job_type TEXT NOT NULL, subject_key TEXT, generation INTEGER, payload BLOB NOT NULL,
    priority INTEGER NOT NULL, execution_mode TEXT NOT NULL, max_attempts INTEGER NOT NULL,
    backoff_base_ms INTEGER NOT NULL, backoff_factor REAL NOT NULL, deadline_ms INTEGER NOT NULL,
    ttl_ms INTEGER, schedule_at INTEGER, expires_at INTEGER, wait_for_idle INTEGER NOT NULL,
    require_charging INTEGER NOT NULL, depends_on TEXT NOT NULL, user_tag TEXT,
    parent_job_id TEXT, chain_group_id TEXT, env TEXT NOT NULL, created_at INTEGER NOT NULL,
    run_after INTEGER NOT NULL, finished_at INTEGER, error_kind TEXT, error_message TEXT
)
"""
RAW_INSERT = (
    "INSERT INTO raw_jobs (id, state, queue, job_type, subject_key, generation, payload, "
    "priority, execution_mode, max_attempts, backoff_base_ms, backoff_factor, deadline_ms, "
    "ttl_ms, schedule_at, expires_at, wait_for_idle, require_charging, depends_on, user_tag, "
    "parent_job_id, chain_group_id, env, created_at, run_after, finished_at, error_kind, "
    "error_message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
    "?, ?, ?, ?, ?, ?)"
)


# --------------------------------------------------------------------------- helpers


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return float("nan")
    rank = max(1, -(-len(sorted_values) * pct // 100))  # ceil(n * pct / 100)
    return sorted_values[int(rank) - 1]


def latency_summary(seconds: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000.0 for s in seconds)
    return {
        "n": len(ms),
        "mean_ms": sum(ms) / len(ms),
        "p50_ms": percentile(ms, 50),
        "p99_ms": percentile(ms, 99),
        "max_ms": ms[-1],
    }


def payload_for(i: int) -> dict[str, Any]:
    return {"path": f"/home/user/project/src/module_{i % 997}.py", "reason": "changed", "n": i}


def mixed_request(i: int) -> EnqueueRequest:
    """Even i: keyless. Odd i: one of ENQUEUE_KEYS subject keys (supersedes once reused)."""
    key = None if i % 2 == 0 else f"file-{(i // 2) % ENQUEUE_KEYS}"
    return EnqueueRequest(job_type="embed", subject_key=key, payload=payload_for(i))


@contextlib.contextmanager
def scratch_dir(parent: Path) -> Iterator[Path]:
    parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix="store-bench-", dir=parent))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):  # only if empty: we made it, nothing else is there
            parent.rmdir()


def open_raw(path: Path, synchronous: str) -> apsw.Connection:
    """A bare connection with the same file settings Store.open applies."""
    db = apsw.Connection(str(path))
    db.set_busy_timeout(5000)
    db.execute("PRAGMA journal_mode = WAL")
    db.execute(f"PRAGMA synchronous = {synchronous}")
    db.execute("PRAGMA foreign_keys = ON")
    return db


# --------------------------------------------------------------------------- benches


def raw_row(i: int) -> tuple[Any, ...]:
    """The 28 values the store would insert for mixed_request(i)."""
    key = None if i % 2 == 0 else f"file-{(i // 2) % ENQUEUE_KEYS}"
    return (
        str(uuid.uuid4()), "QUEUED", "default", "embed", key, None if key is None else i,
        json.dumps(payload_for(i)).encode(), 0, "SUBPROCESS", 3, 1000, 2.0, 60_000, None,
        None, None, 0, 0, "[]", None, None, None, "{}", START_MS + i, START_MS + i,
        None, None, None,
    )  # fmt: skip


def bench_raw_and_enqueue(
    raw_path: Path, store_path: Path, synchronous: str, n: int, warmup: int
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Raw single-row INSERT txns and Store.enqueue txns, interleaved in rounds.

    Alternating ROUND-sized runs of each (on two files) lets both see the same disk
    and CPU conditions, so their ratio holds up on a shared, noisy machine.
    """
    db = open_raw(raw_path, synchronous)
    db.execute(RAW_TABLE)
    store = Store.open(store_path, synchronous=synchronous)
    for i in range(warmup):
        with db:
            db.execute(RAW_INSERT, raw_row(i))
        store.enqueue(mixed_request(i), now=START_MS + i)
    rows = [raw_row(warmup + i) for i in range(n)]  # built outside the timed loops
    reqs = [mixed_request(warmup + i) for i in range(n)]
    raw_lat: list[float] = []
    raw_seconds = enqueue_seconds = 0.0
    superseded = 0
    clock = time.perf_counter
    for lo in range(0, n, ROUND):
        start = clock()
        for values in rows[lo : lo + ROUND]:
            t0 = clock()
            with db:
                db.execute(RAW_INSERT, values)
            raw_lat.append(clock() - t0)
        raw_seconds += clock() - start
        start = clock()
        for i, req in enumerate(reqs[lo : lo + ROUND], start=warmup + lo):
            superseded += len(store.enqueue(req, now=START_MS + i).superseded_ids)
        enqueue_seconds += clock() - start
    db.close()
    store.close()
    raw = {
        "n": n,
        "seconds": raw_seconds,
        "per_s": n / raw_seconds,
        "latency": latency_summary(raw_lat),
    }
    enqueue = {
        "n": n,
        "seconds": enqueue_seconds,
        "per_s": n / enqueue_seconds,
        "superseded": superseded,
    }
    return raw, enqueue


def bench_enqueue_batch(path: Path, synchronous: str, batches: int) -> dict[str, Any]:
    store = Store.open(path, synchronous=synchronous)
    store.enqueue_batch([mixed_request(i) for i in range(BATCH_SIZE)], now=START_MS)  # warmup
    base = BATCH_SIZE
    all_reqs = [
        [mixed_request(base + b * BATCH_SIZE + i) for i in range(BATCH_SIZE)]
        for b in range(batches)
    ]
    lat = []
    superseded = 0
    clock = time.perf_counter
    start = clock()
    for b, reqs in enumerate(all_reqs):
        t0 = clock()
        results = store.enqueue_batch(reqs, now=START_MS + 1 + b)
        lat.append(clock() - t0)
        superseded += sum(len(r.superseded_ids) for r in results)
    elapsed = clock() - start
    store.close()
    n = batches * BATCH_SIZE
    return {
        "n": n,
        "batches": batches,
        "batch_size": BATCH_SIZE,
        "seconds": elapsed,
        "per_s": n / elapsed,
        "superseded": superseded,
        "batch_latency": latency_summary(lat),
    }


def fill_claim_store(store: Store, queues: int) -> float:
    """CLAIM_KEYS keys x `queues` queues, one job each, in enqueue_batch calls."""
    reqs = (
        EnqueueRequest(
            job_type="embed",
            queue=f"q{q:03d}",
            subject_key=f"file-{k:04d}",
            payload=payload_for(k),
        )
        for k in range(CLAIM_KEYS)
        for q in range(queues)
    )
    start = time.perf_counter()
    batch: list[EnqueueRequest] = []
    for req in reqs:
        batch.append(req)
        if len(batch) == BATCH_SIZE:
            store.enqueue_batch(batch, now=START_MS)
            batch = []
    if batch:
        store.enqueue_batch(batch, now=START_MS)
    return time.perf_counter() - start


def bench_claim(
    path: Path, synchronous: str, queues: int, claims: int, warmup: int
) -> dict[str, Any]:
    store = Store.open(path, synchronous=synchronous)
    fill_seconds = fill_claim_store(store, queues)
    queued = store.stats().by_state["QUEUED"]
    # As the daemon runs it: WAL checkpoints happen in a worker thread (its
    # Checkpointer), not inside whichever claim's commit crosses 1,000 WAL pages.
    wal_grown = threading.Event()
    store.checkpoint_elsewhere(lambda pages: wal_grown.set())
    stop = threading.Event()

    def checkpointer() -> None:
        while not stop.is_set():
            if wal_grown.wait(0.1):
                wal_grown.clear()
                store.checkpoint()

    worker = threading.Thread(target=checkpointer, daemon=True)
    worker.start()
    conditions = Conditions(cpu_idle=True, on_ac_power=True)
    outcome = Outcome()
    rng = random.Random(0)
    clock = time.perf_counter
    lat = []
    now = START_MS + 1
    for i in range(warmup + claims):
        now += 1
        t0 = clock()
        job = store.claim_next_job(now=now, global_limit=GLOBAL_LIMIT, conditions=conditions)
        t1 = clock()
        if job is None:
            raise RuntimeError(f"claim {i} found no job with {queued} queued: bench bug")
        if i >= warmup:
            lat.append(t1 - t0)
        store.finish(job.id, outcome, now=now, rng=rng)
    stop.set()
    worker.join()
    store.close()
    return {
        "queued_at_start": queued,
        "keys": CLAIM_KEYS,
        "queues": queues,
        "fill_seconds": fill_seconds,
        "global_limit": GLOBAL_LIMIT,
        "latency": latency_summary(lat),
    }


# --------------------------------------------------------------------------- report


def run(args: argparse.Namespace) -> dict[str, Any]:
    idx = 1 if args.quick else 0
    counts = {name: pair[idx] for name, pair in COUNTS.items()}
    sync = args.synchronous
    parent = Path(args.tmp_dir) if args.tmp_dir else REPO / "bench" / ".tmp"
    results: dict[str, Any] = {
        "synchronous": sync,
        "journal_mode": "WAL",
        "quick": args.quick,
        "python": sys.version.split()[0],
        "sqlite": apsw.sqlite_lib_version(),
        "apsw": apsw.apsw_version(),
        "enqueue_mix": (
            f"50% keyless, 50% keyed over {ENQUEUE_KEYS} subject keys of one queue/job_type "
            "(each reuse of a key supersedes its QUEUED job)"
        ),
    }
    with scratch_dir(parent) as tmp:
        results["tmp_dir"] = str(tmp)
        results["same_filesystem_as_repo"] = os.stat(tmp).st_dev == os.stat(REPO).st_dev
        if not args.json:
            print("  running raw_insert + enqueue (interleaved) ...", file=sys.stderr, flush=True)
        gc.collect()
        results["raw_insert"], results["enqueue"] = bench_raw_and_enqueue(
            tmp / "raw.db", tmp / "enqueue.db", sync, counts["txns"], counts["warmup"]
        )
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            (
                "enqueue_batch",
                lambda: bench_enqueue_batch(tmp / "batch.db", sync, counts["batch_batches"]),
            ),
            (
                "claim",
                lambda: bench_claim(
                    tmp / "claim.db",
                    sync,
                    counts["claim_queues"],
                    counts["claims"],
                    counts["warmup"],
                ),
            ),
        ]
        for name, step in steps:
            if not args.json:
                print(f"  running {name} ...", file=sys.stderr, flush=True)
            gc.collect()
            results[name] = step()
    raw = results["raw_insert"]["per_s"]
    enqueue_ratio = results["enqueue"]["per_s"] / raw
    batch_per_s = results["enqueue_batch"]["per_s"]
    claim_p99 = results["claim"]["latency"]["p99_ms"]
    results["ratios_to_raw"] = {
        "enqueue": enqueue_ratio,
        "enqueue_batch": batch_per_s / raw,
    }
    results["goals"] = {
        "enqueue_ratio": {
            "goal": f">= {GOAL_ENQUEUE_RATIO:.0%} of raw",
            "value": enqueue_ratio,
            "pass": enqueue_ratio >= GOAL_ENQUEUE_RATIO,
        },
        "enqueue_batch_per_s": {
            "goal": f">= {GOAL_BATCH_JOBS_PER_S:,.0f} jobs/s",
            "value": batch_per_s,
            "pass": batch_per_s >= GOAL_BATCH_JOBS_PER_S,
        },
        "claim_p99_ms": {
            "goal": f"<= {GOAL_CLAIM_P99_MS} ms",
            "value": claim_p99,
            "pass": claim_p99 <= GOAL_CLAIM_P99_MS,
        },
    }
    results["all_pass"] = all(g["pass"] for g in results["goals"].values())
    return results


RULE = 96


def mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_table(r: dict[str, Any]) -> None:
    raw, enq, batch, claim = r["raw_insert"], r["enqueue"], r["enqueue_batch"], r["claim"]
    goals = r["goals"]
    print()
    print(
        f"Semantica store bench: synchronous={r['synchronous']}, journal_mode=WAL, "
        f"SQLite {r['sqlite']}, apsw {r['apsw']}, Python {r['python']}"
        + (" (--quick)" if r["quick"] else "")
    )
    same = "same filesystem as repo" if r["same_filesystem_as_repo"] else "OTHER filesystem!"
    print(f"files in {r['tmp_dir']} ({same}), removed afterwards")
    print(f"enqueue mix: {r['enqueue_mix']}")
    print("  (the raw INSERT rows use the same keyless/keyed mix of values)")
    print()
    header = f"{'measurement':<36}{'n':>9}{'per second':>14}{'vs raw':>9}  goal"
    print(header)
    print("-" * RULE)
    print(f"{'raw apsw INSERT, 1 row/txn':<36}{raw['n']:>9,}{raw['per_s']:>14,.0f}{'100%':>9}")
    print(
        f"{'Store.enqueue, 1 job/txn':<36}{enq['n']:>9,}{enq['per_s']:>14,.0f}"
        f"{r['ratios_to_raw']['enqueue']:>9.0%}  "
        f"{mark(goals['enqueue_ratio']['pass'])} ({goals['enqueue_ratio']['goal']})"
    )
    print(
        f"{'Store.enqueue_batch, ' + format(batch['batch_size'], ',') + '/call':<36}"
        f"{batch['n']:>9,}{batch['per_s']:>14,.0f}"
        f"{r['ratios_to_raw']['enqueue_batch']:>9.0%}  "
        f"{mark(goals['enqueue_batch_per_s']['pass'])} ({goals['enqueue_batch_per_s']['goal']})"
    )
    print()
    header = f"{'latency (ms)':<36}{'n':>9}{'p50':>9}{'p99':>9}{'max':>9}{'mean':>9}  goal"
    print(header)
    print("-" * RULE)
    rl = raw["latency"]
    print(
        f"{'raw INSERT txn (commit floor)':<36}{rl['n']:>9,}{rl['p50_ms']:>9.3f}"
        f"{rl['p99_ms']:>9.3f}{rl['max_ms']:>9.3f}{rl['mean_ms']:>9.3f}"
    )
    cl = claim["latency"]
    label = f"claim_next_job, {claim['queued_at_start']:,} queued"
    print(
        f"{label:<36}{cl['n']:>9,}{cl['p50_ms']:>9.3f}{cl['p99_ms']:>9.3f}{cl['max_ms']:>9.3f}"
        f"{cl['mean_ms']:>9.3f}  {mark(goals['claim_p99_ms']['pass'])} "
        f"(p99 {goals['claim_p99_ms']['goal']})"
    )
    bl = batch["batch_latency"]
    print(
        f"{'enqueue_batch call (1,000 jobs)':<36}{bl['n']:>9,}{bl['p50_ms']:>9.3f}"
        f"{bl['p99_ms']:>9.3f}{bl['max_ms']:>9.3f}{bl['mean_ms']:>9.3f}"
    )
    print()
    print(
        f"claim set-up: {claim['keys']:,} subject keys x {claim['queues']} queues, filled by "
        f"enqueue_batch in {claim['fill_seconds']:.1f} s (not timed);\n"
        f"  global_limit {claim['global_limit']}; each claimed job finished outside the "
        "timed region"
    )
    print(
        f"supersedes during timed runs: enqueue {enq['superseded']:,}, "
        f"enqueue_batch {batch['superseded']:,}"
    )
    print(f"overall: {'PASS' if r['all_pass'] else 'FAIL'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--synchronous",
        default="FULL",
        type=str.upper,
        choices=SYNCHRONOUS_MODES,
        help="PRAGMA synchronous for every file (default FULL, as Store.open)",
    )
    parser.add_argument("--quick", action="store_true", help="small counts: a smoke run")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument(
        "--tmp-dir",
        help="parent directory for the scratch files (default: <repo>/bench/.tmp); "
        "keep it on the filesystem you want to measure",
    )
    args = parser.parse_args(argv)
    results = run(args)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
