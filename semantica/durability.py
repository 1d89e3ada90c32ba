"""When writes reach the disk: group fsync before acknowledging, and checkpoints
kept out of commits. Both do their slow part in a worker thread, so the event loop
keeps serving while the disk works.
"""

from __future__ import annotations

import trio

from semantica import log
from semantica.store import StorageUnavailable, Store

CHECKPOINT_THRESHOLD_PAGES = 1000  # SQLite's own default for its automatic checkpoint


class WalSync:
    """Acknowledge only what is on disk, with one fsync for many commits.

    Writes commit without an fsync of their own (`Store.open(group_sync=True)`); a
    handler then awaits `durable()` before replying. One fsync runs at a time, in a
    worker thread so the event loop keeps reading, committing and grouping while the
    disk works; when it ends, it covers every commit made before it began, and the
    next one covers all that arrived meanwhile.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        # Whether other clients are connected; alone, a thread hop buys nothing.
        self.may_have_company = lambda: True
        self._synced = 0
        self._running = False
        self._finished = trio.Event()
        self.fsyncs = 0

    async def durable(self) -> None:
        """Return once every commit made so far is on disk."""
        if not self._store.needs_sync:
            return
        wanted = self._store.commits
        while self._synced < wanted:
            if self._running:
                await self._finished.wait()
                continue
            self._running = True
            covers = self._store.commits
            try:
                if self.may_have_company():
                    await trio.to_thread.run_sync(self._store.sync_wal)
                else:
                    self._store.sync_wal()
                self._synced = covers
                self.fsyncs += 1
            finally:
                self._running = False
                finished, self._finished = self._finished, trio.Event()
                finished.set()


class Checkpointer:
    """Copies the WAL into the database file off the event loop.

    SQLite would checkpoint inside whichever commit crosses 1,000 WAL pages, making
    that request wait for several fsyncs. Instead the store calls back after such
    a commit and this task runs a PASSIVE checkpoint in a worker thread, on a
    connection of its own. It wakes only when the WAL has grown: idle, it sleeps.
    """

    def __init__(self, store: Store, threshold_pages: int = CHECKPOINT_THRESHOLD_PAGES) -> None:
        self._store = store
        self._wanted = trio.Event()
        self.checkpoints = 0
        store.checkpoint_elsewhere(
            lambda pages: self._wanted.set(), threshold_pages=threshold_pages
        )

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            try:
                await trio.to_thread.run_sync(self._store.checkpoint)
                self.checkpoints += 1
            except StorageUnavailable as exc:
                log.warning("checkpoint_failed", error=str(exc))
