"""Maintenance, health and backup: retention to the millisecond, files removed only
once their job's deletion is durable, orphaned files, vacuum (by fragmentation, by size
limit, forced), the WAL truncated, short holds of the event loop, the periodic run,
health's WAL size and integrity reports, an online backup taken while clients write,
and a restore that finds every job."""

from __future__ import annotations

import json
import os
import random
import shutil
import threading
import time
from pathlib import Path

import apsw
import pytest
import trio
from conftest import ALL_MET
from harness import make_home, remove_home, start_daemon

from semantica import maintenance
from semantica.domain import EnqueueRequest, Outcome, State
from semantica.errors import ValidationFailed
from semantica.maintenance import Maintenance
from semantica.store import StorageUnavailable, Store

DAY_MS = 86_400_000
T0 = 1_800_000_000_000
DONE = Outcome(result_summary={"ok": True})


def finished_job(store: Store, home: Path, at: int, payload_bytes: int = 0) -> str:
    """A job enqueued, run and DONE at `at`, with a log file and an artifact directory."""
    payload = {"blob": "x" * payload_bytes} if payload_bytes else {}
    job = store.enqueue(EnqueueRequest(job_type="noop", payload=payload), now=at).job
    claimed = store.claim_next_job(now=at, global_limit=10**6, conditions=ALL_MET)
    assert claimed is not None and claimed.id == job.id
    store.finish(job.id, DONE, now=at, rng=random.Random(0))
    (home / "logs").mkdir(exist_ok=True)
    (home / "logs" / f"{job.id}.log").write_text("a log line\n")
    (home / "artifacts" / job.id).mkdir(parents=True, exist_ok=True)
    (home / "artifacts" / job.id / "out.txt").write_text("artifact")
    return job.id


def maintenance_at(store: Store, home: Path, now: int, **kw) -> Maintenance:
    return Maintenance(
        store,
        home,
        retention_days=kw.get("retention_days", 7),
        max_db_size_mb=kw.get("max_db_size_mb", 1000),
        clock=lambda: now,
        durable=kw.get("durable"),
    )


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def mostly_kept(store: Store, home: Path, *, kept_at: int, expired_at: int) -> None:
    """300 kept jobs of 8 kB each (about 3 MB) and 250 expired small ones: deleting
    these frees well under 10 % of the pages, so only a size limit calls for a vacuum."""
    for i in range(300):
        finished_job(store, home, at=kept_at + i, payload_bytes=8000)
    for i in range(250):
        finished_job(store, home, at=expired_at + i)


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path


@pytest.fixture
def store(home):
    # As the daemon opens it: commits leave their fsync to the caller (maintenance's own).
    s = Store.open(home / "meta.db", group_sync=True)
    yield s
    s.close()


async def test_retention_keeps_a_job_just_inside_and_deletes_one_just_outside(store, home):
    now = T0 + 7 * DAY_MS
    outside = finished_job(store, home, at=T0 - 1)  # finished 7 days and 1 ms ago
    inside = finished_job(store, home, at=T0)  # exactly 7 days ago: still kept
    queued = store.enqueue(EnqueueRequest(job_type="noop"), now=T0 - DAY_MS).job.id
    report = await maintenance_at(store, home, now).run()
    assert (report.jobs_deleted, report.files_deleted) == (1, 2)
    assert store.existing_ids([outside, inside, queued]) == {inside, queued}
    assert not (home / "logs" / f"{outside}.log").exists()
    assert not (home / "artifacts" / outside).exists()
    assert (home / "logs" / f"{inside}.log").exists() and (home / "artifacts" / inside).exists()


async def test_orphaned_files_are_swept_and_kept_ones_are_not(store, home):
    kept = finished_job(store, home, at=T0)
    for d in ("logs", "artifacts", "work"):
        (home / d).mkdir(exist_ok=True)
    (home / "logs" / "no-such-job.log").write_text("left behind")
    (home / "artifacts" / "no-such-job").mkdir()
    (home / "work" / "no-such-job").mkdir()
    (home / "work" / kept).mkdir()
    report = await maintenance_at(store, home, T0 + 1).run()
    assert report.orphans_deleted == 3 and report.jobs_deleted == 0
    assert sorted(p.name for p in (home / "logs").iterdir()) == [f"{kept}.log"]
    assert [p.name for p in (home / "artifacts").iterdir()] == [kept]
    assert [p.name for p in (home / "work").iterdir()] == [kept]


async def test_vacuum_gives_the_space_of_deleted_jobs_back(store, home):
    for i in range(1500):
        finished_job(store, home, at=T0 + i, payload_bytes=8000)
    report = await maintenance_at(store, home, T0 + 30 * DAY_MS).run()
    assert report.jobs_deleted == 1500 and report.vacuum == "incremental"
    assert report.db_bytes_after < report.db_bytes_before / 4, report
    assert store.page_stats()[1] == 0  # no free page left
    assert store.check_integrity("integrity_check") == []


async def test_past_its_size_limit_the_file_gives_its_free_pages_back(store, home):
    now = T0 + 8 * DAY_MS
    mostly_kept(store, home, kept_at=T0 + 2 * DAY_MS, expired_at=T0)
    under = await maintenance_at(store, home, now, max_db_size_mb=1000).run()
    assert (under.jobs_deleted, under.vacuum) == (250, "none")
    pages, free, page_size, _ = store.page_stats()
    assert 0 < free < 0.10 * pages and pages * page_size > 2 * 2**20  # not fragmented
    over = await maintenance_at(store, home, now, max_db_size_mb=2).run()
    assert (over.jobs_deleted, over.vacuum) == (0, "incremental")
    assert store.page_stats()[1] == 0
    assert over.db_bytes_after == os.path.getsize(store.path) < over.db_bytes_before
    assert over.db_bytes_before - over.db_bytes_after >= free * page_size


async def test_force_vacuum_shrinks_a_file_the_routine_run_leaves_alone(store, home):
    now = T0 + 8 * DAY_MS
    mostly_kept(store, home, kept_at=T0 + 2 * DAY_MS, expired_at=T0)
    routine = await maintenance_at(store, home, now).run()
    assert routine.vacuum == "none"
    _, free, page_size, _ = store.page_stats()
    size = os.path.getsize(store.path)
    assert free > 0 and routine.db_bytes_after == size
    forced = await maintenance_at(store, home, now).run(force_vacuum=True)
    assert (forced.vacuum, forced.jobs_deleted) == ("full", 0)
    assert os.path.getsize(store.path) <= size - free * page_size
    assert forced.db_bytes_after < forced.db_bytes_before == size
    assert os.path.getsize(f"{store.path}-wal") == 0  # the rewrite went through the WAL
    assert store.page_stats()[1] == 0
    assert store.check_integrity("integrity_check") == []
    assert store.stats().by_state["DONE"] == 300


async def test_maintenance_leaves_the_wal_empty(store, home):
    for i in range(50):
        finished_job(store, home, at=T0 + i, payload_bytes=4000)
    assert os.path.getsize(f"{store.path}-wal") > 0
    await maintenance_at(store, home, T0 + 30 * DAY_MS).run()
    assert os.path.getsize(f"{store.path}-wal") == 0


async def test_files_of_deleted_jobs_go_only_once_the_deletion_is_durable(store, home, monkeypatch):
    monkeypatch.setattr(maintenance, "DELETE_BATCH", 2)
    monkeypatch.setattr(maintenance, "DELETE_BATCH_MIN", 2)
    monkeypatch.setattr(maintenance, "DELETE_BATCH_MAX", 2)
    monkeypatch.setattr(maintenance, "SYNC_EVERY_JOBS", 2)
    ids = [finished_job(store, home, at=T0 + i) for i in range(5)]
    durable_rows: set[str] = set()  # rows whose deletion had been made durable
    calls = 0

    async def durable() -> None:
        nonlocal calls
        calls += 1
        files_gone = {i for i in ids if not (home / "logs" / f"{i}.log").exists()}
        files_gone |= {i for i in ids if not (home / "artifacts" / i).exists()}
        assert files_gone <= durable_rows, "a file went before its job's deletion was synced"
        durable_rows.update(set(ids) - store.existing_ids(ids))

    report = await maintenance_at(store, home, T0 + 30 * DAY_MS, durable=durable).run()
    assert (report.jobs_deleted, report.files_deleted, calls) == (5, 10, 3)  # 2 + 2 + 1
    assert durable_rows == set(ids)
    assert not any((home / "logs" / f"{i}.log").exists() for i in ids)


async def test_when_the_deletion_cannot_be_synced_the_files_stay(store, home):
    ids = [finished_job(store, home, at=T0 + i) for i in range(3)]

    async def refuse() -> None:
        raise StorageUnavailable("the database cannot be synced to disk (test)")

    with pytest.raises(StorageUnavailable):
        await maintenance_at(store, home, T0 + 30 * DAY_MS, durable=refuse).run()
    assert store.existing_ids(ids) == set()
    assert all((home / "logs" / f"{i}.log").exists() for i in ids)
    # The next run (its fsync working) sweeps them as files no job refers to.
    report = await maintenance_at(store, home, T0 + 30 * DAY_MS).run()
    assert (report.jobs_deleted, report.orphans_deleted) == (0, 6)


async def test_the_periodic_run_comes_back_after_a_failed_one(store, home, autojump_clock):
    # Virtual time: the clock jumps ahead whenever every task waits (a run's worker
    # threads included), so the gaps are measured from the end of one run.
    m = maintenance_at(store, home, T0)
    began, ended = [], []
    real_run = m.run

    async def run(**kw):
        began.append(trio.current_time())
        try:
            if len(began) == 1:
                raise StorageUnavailable("the disk holding the database is full (test)")
            return await real_run(**kw)
        finally:
            ended.append(trio.current_time())

    m.run = run
    async with trio.open_nursery() as nursery:
        await nursery.start(m.periodic, 3600.0)
        while m.runs < 2:
            await trio.sleep(60)
        nursery.cancel_scope.cancel()
    assert m.runs == 2 and len(began) == 3  # the failed run is not counted
    assert round(began[0]) == 3600  # the first run is one interval after the start
    assert [round(b - e) for e, b in zip(ended, began[1:], strict=False)] == [3600, 3600]


async def test_maintenance_keeps_serving_between_batches(store, home):
    for i in range(1200):
        finished_job(store, home, at=T0 + i)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            # Not sleep(0): a task that never waits holds the GIL, and each of
            # maintenance's file system calls in a thread then waits up to the
            # interpreter's 5 ms switch interval for it (10 s instead of 0.5).
            await trio.sleep(0.001)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ticker)
        report = await maintenance_at(store, home, T0 + 30 * DAY_MS).run()
        nursery.cancel_scope.cancel()
    assert report.jobs_deleted == 1200
    assert ticks >= 5  # the event loop ran between the batches of 200


# --------------------------------------------------------------------------- daemon


def test_backup_while_four_clients_enqueue_then_restore_finds_every_job(tmp_path):
    daemon = start_daemon(hold_queues=("default",))
    restored = None
    try:
        acknowledged: list[list[str]] = [[] for _ in range(4)]
        stop = threading.Event()

        def writer(n: int) -> None:
            with daemon.client() as c:
                while not stop.is_set():
                    acknowledged[n].append(c.enqueue(job_type="noop", user_tag=f"w{n}").id)

        threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        before_backup = {i for ids in acknowledged for i in list(ids)}
        with daemon.client() as c:
            report = c.backup(tmp_path / "copy.db")
        time.sleep(0.2)
        stop.set()
        for t in threads:
            t.join()
        assert report.bytes == (tmp_path / "copy.db").stat().st_size > 0
        copy = apsw.Connection(str(tmp_path / "copy.db"), flags=apsw.SQLITE_OPEN_READONLY)
        assert copy.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        in_copy = {row[0] for row in copy.execute("SELECT id FROM jobs")}
        copy.close()
        assert before_backup <= in_copy and len(before_backup) > 20

        # Restore, as the README says: a fresh home, the copy as its meta.db, start.
        fresh = make_home()
        fresh.mkdir(mode=0o700, parents=True)
        shutil.copy(tmp_path / "copy.db", fresh / "meta.db")
        restored = start_daemon(fresh, hold_queues=("default",))
        with restored.client() as c:
            found = set()
            for n in range(4):
                page = c.list(tag=f"w{n}", limit=1000)
                while True:
                    found |= {j.id for j in page.jobs}
                    if page.next_cursor is None:
                        break
                    page = c.list(tag=f"w{n}", limit=1000, cursor=page.next_cursor)
            assert found == in_copy
            assert c.get(next(iter(before_backup))).state is State.QUEUED
    finally:
        daemon.stop()
        remove_home(daemon.home)
        if restored is not None:
            restored.stop()
            remove_home(restored.home)


def test_backup_refuses_a_bad_path_and_overwrites_nothing(tmp_path):
    daemon = start_daemon()
    try:
        taken = tmp_path / "taken.db"
        taken.write_text("precious")
        with daemon.client() as c:
            for path, says in (
                ("relative.db", "must be absolute"),
                (str(tmp_path / "missing-dir" / "x.db"), "is not a directory"),
                (str(taken), "exists already"),
            ):
                with pytest.raises(ValidationFailed, match=says):
                    c.call("admin.backup.v1", {"path": path})
        assert taken.read_text() == "precious"
    finally:
        daemon.stop()
        remove_home(daemon.home)


def test_maintenance_over_the_api_reports_and_counts(tmp_path):
    daemon = start_daemon(SEMANTICA_RETENTION_DAYS="0")
    try:
        with daemon.client() as c:
            job = c.enqueue(job_type="noop")
            assert c.wait(job.id, timeout_ms=10_000).state is State.DONE
            time.sleep(0.01)
            fsyncs = c.stats().wal_fsyncs_total
            report = c.maintenance()
            assert report.jobs_deleted == 1 and report.files_deleted >= 1
            assert c.list().jobs == []
            stats = c.stats()
            assert stats.maintenance_runs_total == 1
            # Its reply, like every write's, waited for the WAL fsync (WRITING_METHODS).
            assert stats.wal_fsyncs_total > fsyncs
    finally:
        daemon.stop()
        remove_home(daemon.home)


def daemon_records(daemon, event: str) -> list[dict]:
    records = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    return [r for r in records if r.get("event") == event]


def test_maintenance_runs_by_itself_every_maintenance_hours():
    # 0.001 h (3.6 s) is the smallest setting the daemon accepts.
    daemon = start_daemon(SEMANTICA_MAINTENANCE_HOURS="0.001", SEMANTICA_RETENTION_DAYS="0")
    try:
        with daemon.client() as c:
            assert c.stats().maintenance_runs_total == 0
            job = c.enqueue(job_type="noop")
            assert c.wait(job.id, timeout_ms=10_000).state is State.DONE
            deadline = time.monotonic() + 15
            while c.stats().maintenance_runs_total == 0:
                assert time.monotonic() < deadline, "no scheduled maintenance in 15 s"
                time.sleep(0.05)
            assert c.list().jobs == []  # the finished job went with it
        [done] = daemon_records(daemon, "maintenance_done")[:1]
        assert done["reason"] == "scheduled" and done["jobs_deleted"] == 1
    finally:
        daemon.stop()
        remove_home(daemon.home)


def test_a_daemon_past_its_size_limit_vacuums_in_short_steps_and_empties_the_wal():
    home = make_home()
    home.mkdir(mode=0o700, parents=True)
    day = 86_400_000
    made = Store.open(home / "meta.db", synchronous="OFF")
    mostly_kept(made, home, kept_at=wall_ms() - day, expired_at=wall_ms() - 30 * day)
    made.close()
    daemon = start_daemon(home, hold_queues=("default",), SEMANTICA_MAX_DB_SIZE_MB="2")
    try:
        with daemon.client() as c:
            report = c.maintenance()
            assert (report.jobs_deleted, report.vacuum) == (250, "incremental")
            assert report.db_bytes_after < report.db_bytes_before
            # No step ran long on the event loop (a batch is a few ms; 200 ms allows a
            # loaded machine). Measured: zero would mean nothing was timed.
            assert 0 < report.longest_hold_ms < 200, report
            health = c.health()
            assert health.wal_bytes == 0 == os.path.getsize(home / "meta.db-wal")
            assert c.stats().jobs_by_state["DONE"] == 300
    finally:
        daemon.stop()
        remove_home(home)


def test_health_reports_the_wal_as_it_is_on_disk():
    daemon = start_daemon(hold_queues=("default",))
    wal = daemon.home / "meta.db-wal"
    try:
        with daemon.client() as c:
            for n in range(20):
                c.enqueue(job_type="noop", payload={"n": n, "blob": "x" * 3000})
            health = c.health()
            assert health.ok and health.check == "quick_check"
            page_size = 4096
            # A WAL is a 32-byte header and frames of a 24-byte header and a page each.
            assert health.wal_bytes == wal.stat().st_size
            assert health.wal_bytes >= 32 + 20 * (24 + page_size)
            assert (health.wal_bytes - 32) % (24 + page_size) == 0
            assert health.disk_free_bytes > 0 and health.state == "serving"
            c.maintenance()
            assert c.health().wal_bytes == 0 == wal.stat().st_size
    finally:
        daemon.stop()
        remove_home(daemon.home)


def corrupt_index(db_path: Path, index: str) -> None:
    """Overwrite the second half of an index's root page with 0xff bytes."""
    db = apsw.Connection(str(db_path))
    try:
        (root,), (page_size,) = (
            db.execute("SELECT rootpage FROM sqlite_schema WHERE name = ?", (index,)).fetchall()[0],
            db.execute("PRAGMA page_size").fetchall()[0],
        )
    finally:
        db.close()
    assert not Path(f"{db_path}-wal").exists()  # every page is in the file itself
    with open(db_path, "r+b") as f:
        f.seek((root - 1) * page_size + page_size // 2)
        f.write(b"\xff" * (page_size // 2))


def test_health_reports_a_damaged_index_and_reads_keep_working():
    daemon = start_daemon(hold_queues=("default",))
    restarted = None
    try:
        with daemon.client() as c:
            jobs = [c.enqueue(job_type="noop", user_tag=f"t{n}") for n in range(40)]
            assert c.health(integrity_check=True).ok
        daemon.stop()
        corrupt_index(daemon.home / "meta.db", "jobs_tag")
        restarted = start_daemon(daemon.home)
        with restarted.client() as c:
            quick = c.health()
            assert not quick.ok and quick.check == "quick_check"
            assert any("Tree" in problem for problem in quick.problems), quick.problems
            # SQLite stops a full check on this page: still a report, not error -32603.
            full = c.health(integrity_check=True)
            assert not full.ok and full.check == "integrity_check"
            assert "integrity_check stopped" in full.problems[0]
            assert "restore the latest backup" in full.problems[0]
            assert c.get(jobs[0].id).state is State.QUEUED  # by primary key: fine
    finally:
        (restarted or daemon).stop()
        remove_home(daemon.home)


def test_checkpoints_from_two_threads_take_turns(store, home):
    # The WAL-growth checkpointer and maintenance both checkpoint from worker threads.
    for i in range(200):
        finished_job(store, home, at=T0 + i, payload_bytes=4000)
    errors = []

    def checkpoint(mode: str) -> None:
        try:
            for _ in range(20):
                store.checkpoint(mode)
        except Exception as exc:
            errors.append(exc)

    threads = [threading.Thread(target=checkpoint, args=(m,)) for m in ("PASSIVE", "TRUNCATE")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


def test_steps_are_sized_to_hold_the_loop_a_few_milliseconds():
    from semantica.maintenance import STEP_TARGET_MS, _next_step

    assert _next_step(256, STEP_TARGET_MS * 3, 16, 8192) == 128  # too long: halve
    assert _next_step(256, STEP_TARGET_MS / 4, 16, 8192) == 512  # quick: double
    assert _next_step(256, STEP_TARGET_MS, 16, 8192) == 256  # about right: keep
    assert _next_step(16, 1000.0, 16, 8192) == 16  # never below the floor
    assert _next_step(8192, 0.0, 16, 8192) == 8192  # nor above the ceiling
    assert _next_step(2, 1000.0, 10, 2) == 2  # a ceiling below the floor wins
