"""When writes reach the disk: group fsync before acknowledging, and checkpoints
kept out of commits. Checkpoints run in a worker thread; a group fsync runs on the
event loop while the disk answers quickly, and in a worker thread when it does not.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import trio

from semantica import log
from semantica.store import StorageUnavailable, Store

CHECKPOINT_THRESHOLD_PAGES = 1000  # SQLite's own default for its automatic checkpoint
INLINE_FSYNC_MAX_S = 0.002  # an fsync quicker than this runs on the event loop
GATHER_MAX_TURNS = 8  # loop turns an fsync may wait while each brings more commits


class WalSync:
    """Acknowledge only what is on disk, with one fsync for many commits.

    Writes commit without an fsync of their own (`Store.open(group_sync=True)`); a
    handler then awaits `durable()` before replying. One fsync runs at a time and
    covers every commit made before it began; the next covers all that arrived
    meanwhile. Before it starts, the loop turns while requests keep arriving, so that
    they commit first (`_gather`). A quick fsync (a fraction of a millisecond here) runs on the
    event loop: a thread hop would cost the loop more than the wait. Once one takes
    longer than INLINE_FSYNC_MAX_S, the next go to a worker thread, so the loop keeps
    reading, committing and grouping while a slow disk works.
    """

    def __init__(self, store: Store) -> None:
        self._store = store
        # Whether another client could commit before this fsync (then it waits loop
        # turns for them), and whether any other client is connected at all (then a
        # slow fsync goes to a thread, so that such a client's request is served
        # meanwhile; alone, a thread hop buys nothing). The server knows both.
        self.may_have_company: Callable[[], bool] = lambda: True
        self.others_connected: Callable[[], bool] = lambda: True
        self._synced = 0
        self._running = False
        self._finished = trio.Event()
        self._inline = True  # whether the last fsync was quick enough to run on the loop
        self.fsyncs = 0

    async def durable(self, *, off_loop: bool = False) -> None:
        """Return once every commit made so far is on disk. `off_loop`: always fsync
        in a worker thread, for a caller in no hurry (the dispatcher announcing ended
        jobs): the loop goes on dispatching meanwhile, and the commits it makes are
        covered by the next fsync, one for many."""
        if not self._store.needs_sync:
            return
        wanted = self._store.commits
        while self._synced < wanted:
            if self._running:
                await self._finished.wait()
                continue
            self._running = True
            try:
                if self.may_have_company():
                    await self._gather()
                covers = self._store.commits
                began = time.perf_counter()
                if (self._inline or not self.others_connected()) and not off_loop:
                    self._store.sync_wal()
                else:
                    await trio.to_thread.run_sync(self._store.sync_wal)
                # A quick fsync is cheaper on the event loop than a thread hop; a slow
                # disk's goes to a thread, so that reads keep being served meanwhile.
                if not off_loop:
                    self._inline = time.perf_counter() - began < INLINE_FSYNC_MAX_S
                self._synced = covers
                self.fsyncs += 1
            finally:
                self._running = False
                finished, self._finished = self._finished, trio.Event()
                finished.set()

    async def _gather(self) -> None:
        """Turns of the event loop before an fsync, so that one covers more commits.
        The first lets every handler already runnable commit; each further turn polls
        the sockets, so requests that have just arrived commit too. It goes on while
        a turn brings commits (clients answered by the last fsync are sending their
        next request), up to GATHER_MAX_TURNS: 8 clients at synchronous=FULL went
        from about 6 to 7 jobs per fsync, and 10 % more enqueues a second."""
        await trio.lowlevel.cancel_shielded_checkpoint()
        for _ in range(GATHER_MAX_TURNS - 1):
            before = self._store.commits
            await trio.lowlevel.cancel_shielded_checkpoint()
            if self._store.commits == before:
                return


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
