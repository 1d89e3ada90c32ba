"""Maintenance: retention, orphaned files, WAL checkpoint, vacuum; and online backup.

Runs every `SEMANTICA_MAINTENANCE_HOURS` (24 by default) and on `admin.maintenance.v1`.
Nothing here holds the database for long: finished jobs are deleted a couple of hundred at
a time on the daemon's own connection (each batch a short transaction, the event
loop serving between batches); file system work, fsyncs and the checkpoint run in
worker threads; free pages go back to the file system in small incremental-vacuum steps.
The files of deleted jobs are removed only once their deletion is on disk: a power cut
may bring a deleted job back, never leave a kept job without its log.
Only `force_vacuum` runs a full VACUUM, which holds the daemon while it rewrites the
file (seconds per GiB).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import apsw
import msgspec
import trio

from semantica import log
from semantica.protocol import BackupReport, MaintenanceReport
from semantica.store import StorageUnavailable, Store

# Jobs deleted per transaction: sized as it goes (like the vacuum steps below), as
# the pages of old jobs may be cold: 200 of them took up to ~70 ms here.
DELETE_BATCH, DELETE_BATCH_MIN, DELETE_BATCH_MAX = 200, 10, 2000
SYNC_EVERY_JOBS = 2000  # deleted jobs per fsync, after which their files are removed
SWEEP_BATCH = 1000  # file names checked against the jobs table per query
# Free pages handed back per incremental-vacuum step: sized as it goes so that one step
# holds the event loop for about STEP_TARGET_MS (a 4 MiB step took ~70 ms here).
RELEASE_PAGES_FIRST, RELEASE_PAGES_MIN, RELEASE_PAGES_MAX = 256, 16, 8192
STEP_TARGET_MS = 5.0
FRAGMENTED_FREE_SHARE = 0.10  # vacuum when more than this share of pages is free


def _remove(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    return True


def _job_id_of(path: Path) -> str:
    return path.name.removesuffix(".log")


def _fsync_file(path: str) -> None:
    """fsync a file through a descriptor of our own (an fsync covers the file, whoever
    wrote it): after it, every commit already in the WAL is on disk."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return  # no WAL: every commit is in the database file already
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Maintenance:
    def __init__(
        self,
        store: Store,
        home: Path,
        *,
        retention_days: float,
        max_db_size_mb: int,
        clock: Callable[[], int],
        durable: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        # Makes every commit so far durable (the daemon's WalSync.durable can be given);
        # by default an fsync of the WAL in a worker thread.
        self.durable = durable or self._sync_wal
        self.dirs = [home / "logs", home / "artifacts", home / "work"]
        self.retention_ms = int(retention_days * 86_400_000)
        self.max_db_bytes = max_db_size_mb * 1024 * 1024
        self.clock = clock
        self.runs = 0
        self._longest = 0.0
        self._lock = trio.Lock()

    def db_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(FileNotFoundError):
                total += os.path.getsize(self.store.path + suffix)
        return total

    async def run(
        self, *, force_vacuum: bool = False, reason: str = "requested"
    ) -> MaintenanceReport:
        async with self._lock:  # one run at a time; a second request waits for its turn
            started = time.monotonic()
            self._longest = 0.0
            phases: dict[str, int] = {}
            before = self.db_bytes()
            mark = time.monotonic()

            def phase(name: str) -> None:
                nonlocal mark
                now = time.monotonic()
                phases[name] = int((now - mark) * 1000)
                mark = now

            deleted, files = await self._delete_expired()
            phase("delete")
            orphans = await self._sweep_orphans()
            phase("sweep")
            await self._checkpoint()
            phase("checkpoint")
            vacuum = await self._vacuum(force_vacuum)
            if vacuum != "none":
                await self._checkpoint()
            phase("vacuum")
            report = MaintenanceReport(
                jobs_deleted=deleted,
                files_deleted=files,
                orphans_deleted=orphans,
                vacuum=vacuum,
                db_bytes_before=before,
                db_bytes_after=self.db_bytes(),
                duration_ms=int((time.monotonic() - started) * 1000),
                longest_hold_ms=round(self._longest, 1),
                phases_ms=phases,
            )
            self.runs += 1
            log.event("maintenance_done", reason=reason, **msgspec.structs.asdict(report))
            return report

    def _on_loop(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run a short store step on the event loop, keeping the longest one's time."""
        began = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self._longest = max(self._longest, (time.perf_counter() - began) * 1000)

    async def _sync_wal(self) -> None:
        try:
            await trio.to_thread.run_sync(_fsync_file, self.store.path + "-wal")
        except OSError as exc:
            raise StorageUnavailable(f"the database cannot be synced to disk ({exc})") from exc

    async def integrity_problems(self, check: str) -> list[str]:
        """`PRAGMA quick_check` or `integrity_check` in a worker thread: the problems
        found (none: healthy). A check that SQLite itself stops on a damaged page is a
        problem found, not an error of the daemon."""
        try:
            return await trio.to_thread.run_sync(self.store.check_integrity, check)
        except (apsw.CorruptError, apsw.NotADBError) as exc:
            return [
                f"{check} stopped: {exc} ({type(exc).__name__}); stop the daemon and "
                "restore the latest backup (README, Operations: Backup and restore)"
            ]
        except (apsw.BusyError, apsw.LockedError, apsw.IOError, apsw.CantOpenError) as exc:
            return [
                f"{check} could not run: {exc} ({type(exc).__name__}); "
                "nothing says the database is damaged: check the disk, then try again"
            ]

    async def _checkpoint(self) -> None:
        """PASSIVE first (writers carry on), then TRUNCATE for what is left: TRUNCATE
        holds off writers while it copies, so it must have little to copy."""
        await trio.to_thread.run_sync(self.store.checkpoint, "PASSIVE")
        await trio.to_thread.run_sync(self.store.checkpoint, "TRUNCATE")

    async def periodic(self, every_s: float, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        """Run every `every_s` seconds (a sleep in between: no idle wake-ups)."""
        task_status.started()
        while True:
            await trio.sleep(every_s)
            try:
                await self.run(reason="scheduled")
            except StorageUnavailable as exc:
                log.error("maintenance_failed", error=str(exc), retry_in_s=every_s)
            except Exception as exc:  # never let maintenance take the daemon down
                log.error("maintenance_failed", error=repr(exc), exc_info=True)

    async def _delete_expired(self) -> tuple[int, int]:
        """Delete expired jobs a batch at a time; every SYNC_EVERY_JOBS, make the
        deletions durable and only then remove those jobs' files."""
        cutoff = self.clock() - self.retention_ms
        deleted = files = 0
        gone: list[str] = []  # deleted, but their files are still there
        batch = DELETE_BATCH
        while True:
            began = time.perf_counter()
            if not (ids := self._on_loop(self.store.finished_before, cutoff, batch)):
                break
            count = self._on_loop(self.store.delete_jobs, ids)
            took = (time.perf_counter() - began) * 1000
            batch = _next_step(batch, took, DELETE_BATCH_MIN, DELETE_BATCH_MAX)
            if count != len(
                ids
            ):  # not today (found and deleted in one tick): keep kept jobs' files
                kept = self._on_loop(self.store.existing_ids, ids)
                ids = [i for i in ids if i not in kept]
            deleted += count
            gone += ids
            if len(gone) >= SYNC_EVERY_JOBS:
                files += await self._remove_files_when_durable(gone)
                gone = []
            await trio.sleep(0)  # let requests in between batches
        if gone:
            files += await self._remove_files_when_durable(gone)
        return deleted, files

    async def _remove_files_when_durable(self, ids: list[str]) -> int:
        await self.durable()
        return await trio.to_thread.run_sync(self._remove_files_of, ids)

    def _remove_files_of(self, ids: list[str]) -> int:
        removed = 0
        for job_id in ids:
            for path in (
                self.dirs[0] / f"{job_id}.log",
                self.dirs[1] / job_id,
                self.dirs[2] / job_id,
            ):
                removed += _remove(path)
        return removed

    async def _sweep_orphans(self) -> int:
        """Files in logs/, artifacts/ and work/ whose job no longer exists."""
        entries = await trio.to_thread.run_sync(self._list_entries)
        removed = 0
        for start in range(0, len(entries), SWEEP_BATCH):
            batch = entries[start : start + SWEEP_BATCH]
            kept = self._on_loop(self.store.existing_ids, [_job_id_of(p) for p in batch])
            orphans = [p for p in batch if _job_id_of(p) not in kept]
            if orphans:
                removed += await trio.to_thread.run_sync(lambda o=orphans: sum(map(_remove, o)))
            await trio.sleep(0)
        return removed

    def _list_entries(self) -> list[Path]:
        entries: list[Path] = []
        for d in self.dirs:
            try:
                entries += [Path(e.path) for e in os.scandir(d)]
            except FileNotFoundError:
                continue
        return entries

    async def _vacuum(self, force: bool) -> str:
        pages, free, page_size, incremental = self._on_loop(self.store.page_stats)
        if force or (free and not incremental and self._needs_vacuum(pages, free, page_size)):
            # On the daemon's own connection (an apsw connection is not shared across
            # threads): requests wait until it is done, and longest_hold_ms says so.
            # Only on request, or once for a file made before incremental vacuum was
            # turned on.
            self._on_loop(self.store.vacuum)
            return "full"
        if not (free and self._needs_vacuum(pages, free, page_size)):
            return "none"
        step = RELEASE_PAGES_FIRST
        while free > 0:
            began = time.perf_counter()
            self._on_loop(self.store.release_free_pages, step)
            took = (time.perf_counter() - began) * 1000
            step = _next_step(step, took, RELEASE_PAGES_MIN, RELEASE_PAGES_MAX)
            await trio.sleep(0)
            _pages, free, _size, _inc = self._on_loop(self.store.page_stats)
        return "incremental"

    def _needs_vacuum(self, pages: int, free: int, page_size: int) -> bool:
        return pages * page_size > self.max_db_bytes or free > FRAGMENTED_FREE_SHARE * pages


async def backup(store: Store, dest: Path) -> BackupReport:
    """A consistent online copy at `dest`, made in a worker thread."""
    started = time.monotonic()
    size = await trio.to_thread.run_sync(store.backup_to, dest)
    report = BackupReport(
        path=str(dest), bytes=size, duration_ms=int((time.monotonic() - started) * 1000)
    )
    log.event("backup_done", path=report.path, bytes=report.bytes, duration_ms=report.duration_ms)
    return report


def _next_step(step: int, took_ms: float, low: int, high: int) -> int:
    """The size of the next step (jobs deleted, pages released): halved past twice the
    target, doubled under half of it, so that each step holds the event loop for about
    STEP_TARGET_MS, within low..high."""
    if took_ms > 2 * STEP_TARGET_MS:
        step //= 2
    elif took_ms < STEP_TARGET_MS / 2:
        step *= 2
    return min(high, max(low, step))
