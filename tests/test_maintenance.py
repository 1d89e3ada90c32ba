"""Maintenance and backup: retention to the millisecond, orphaned files, vacuum,
an online backup taken while clients write, and a restore that finds every job."""

from __future__ import annotations

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

from semantica.domain import EnqueueRequest, Outcome, State
from semantica.errors import ValidationFailed
from semantica.maintenance import Maintenance
from semantica.store import Store

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
    )


@pytest.fixture
def home(tmp_path) -> Path:
    return tmp_path


@pytest.fixture
def store(home):
    s = Store.open(home / "meta.db")
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


async def test_force_vacuum_rewrites_the_file(store, home):
    finished_job(store, home, at=T0)
    report = await maintenance_at(store, home, T0 + 1).run(force_vacuum=True)
    assert report.vacuum == "full" and report.jobs_deleted == 0


async def test_maintenance_keeps_serving_between_batches(store, home):
    for i in range(1200):
        finished_job(store, home, at=T0 + i)
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await trio.sleep(0)

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
            report = c.maintenance()
            assert report.jobs_deleted == 1 and report.files_deleted >= 1
            assert c.list().jobs == []
            assert c.stats().maintenance_runs_total == 1
    finally:
        daemon.stop()
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
