"""The dispatcher: claims ready jobs up to the worker limit and runs each one.

It waits on an event (enqueue, completion, cancel, queue change) and on the next
due time (a `schedule_at`, a retry's backoff, a ttl) — never on a polling
interval, so an idle daemon does not wake at all.
"""

from __future__ import annotations

import heapq
import math
import random
from collections.abc import Callable

import trio

from semantica import log
from semantica.domain import Job, Outcome, State
from semantica.launcher import Launcher, kill_orphaned_runner
from semantica.store import Conditions, StorageUnavailable, Store

CANCELLED_WHILE_RUNNING = Outcome(
    error_kind="cancelled", error_message="stopped: cancelled or superseded while running"
)


class Dispatcher:
    def __init__(
        self,
        store: Store,
        launcher: Launcher,
        *,
        workers: int,
        clock: Callable[[], int],
        conditions: Callable[[], Conditions],
        on_job_changed: Callable[[Job], None],
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.launcher = launcher
        self.workers = workers
        self.clock = clock
        self.conditions = conditions
        self.on_job_changed = on_job_changed
        self.rng = rng or random.Random()
        self._wake = trio.Event()
        self._due: list[int] = []  # heap: times at which a queued job becomes ready or expires
        self._running: dict[str, trio.CancelScope] = {}
        self._stopping = False
        self._job_ended = trio.Event()
        self.wakeups = 0

    # ----------------------------------------------------------------- events

    def wake(self) -> None:
        """Something changed (a job enqueued or ended, a queue resumed): look again."""
        self._wake.set()

    def due_at(self, when_ms: int | None) -> None:
        """Look again at `when_ms` (a schedule_at, a retry, an expiry)."""
        if when_ms is not None and when_ms > self.clock():
            heapq.heappush(self._due, when_ms)
            self._wake.set()  # the wait must be re-armed if this is now the nearest time

    def stop_job(self, job_id: str) -> bool:
        """Stop a running job's process group (it was cancelled or superseded)."""
        scope = self._running.get(job_id)
        if scope is None:
            return False
        scope.cancel()
        return True

    @property
    def running(self) -> int:
        return len(self._running)

    # ----------------------------------------------------------------- recovery

    def recover(self) -> list[Job]:
        """At start: stop runners left by a previous daemon, then count their attempts
        as failed (`error_kind=orphaned`), to be retried or failed by the policy."""
        recovered = []
        for job in self.store.running_jobs():
            killed = []
            if job.runner_pid is not None:
                killed = kill_orphaned_runner(job.runner_pid, job.runner_start_time)
            outcome = Outcome(
                error_kind="orphaned",
                error_message="the daemon stopped while this attempt ran; its runner was stopped",
            )
            ended = self.store.finish(
                job.id, outcome, now=self.clock(), rng=self.rng, attempt=job.attempt
            )
            log.warning(
                "job_orphaned",
                job_id=job.id,
                queue=job.queue,
                job_type=job.job_type,
                attempt=job.attempt,
                state=ended.state.value,
                killed_pids=killed,
            )
            recovered.append(ended)
        return recovered

    # ----------------------------------------------------------------- the loop

    async def run(self, *, task_status=trio.TASK_STATUS_IGNORED) -> None:
        for job_id in self.store.expire_overdue(now=self.clock()):  # expired while stopped
            self.on_job_changed(self.store.get(job_id))
        for when in self.store.next_due_times(now=self.clock()):
            self.due_at(when)
        async with trio.open_nursery() as jobs:
            task_status.started()
            while True:
                self._wake = trio.Event()
                self.step(jobs)
                delay = self._seconds_to_next_due()
                with trio.move_on_after(delay):
                    await self._wake.wait()
                self.wakeups += 1

    def step(self, jobs: trio.Nursery) -> None:
        """One look: expire what is overdue, then start ready jobs while there is room."""
        now = self.clock()
        if self._due and self._due[0] <= now:
            while self._due and self._due[0] <= now:
                heapq.heappop(self._due)
            # Jobs queued before this daemon started are not in the heap: ask the
            # store for the next due time each time one passes (rare, and only then).
            for when in self.store.next_due_times(now=now):
                if when is not None:
                    heapq.heappush(self._due, when)
            for job_id in self.store.expire_overdue(now=now):  # only when something is due
                self.on_job_changed(self.store.get(job_id))
        while not self._stopping and len(self._running) < self.workers:
            job = self.store.claim_next_job(
                now=now, global_limit=self.workers, conditions=self.conditions()
            )
            if job is None:
                break
            self._running[job.id] = trio.CancelScope()
            self.on_job_changed(job)
            jobs.start_soon(self._run_job, job)

    def _seconds_to_next_due(self) -> float:
        if not self._due:
            return math.inf
        return max(0.0, (self._due[0] - self.clock()) / 1000)

    async def _run_job(self, job: Job) -> None:
        scope = self._running[job.id]
        try:
            with scope:
                outcome = await self.launcher.run(
                    job,
                    on_started=lambda pid, start: self.store.record_runner(job.id, pid, start),
                    on_progress=lambda fraction, message: self.store.set_progress(
                        job.id, fraction, message
                    ),
                )
            if scope.cancelled_caught:
                if self._stopping:
                    ended = self.store.requeue(job.id, now=self.clock(), attempt=job.attempt)
                    log.event("job_requeued", job_id=job.id, reason="daemon stopping")
                    self.on_job_changed(ended)
                    return
                outcome = CANCELLED_WHILE_RUNNING
            ended = self.store.finish(
                job.id, outcome, now=self.clock(), rng=self.rng, attempt=job.attempt
            )
            if ended.state is State.QUEUED:
                self.due_at(ended.run_after)
            self.on_job_changed(ended)
        except StorageUnavailable as exc:
            log.error("job_finish_not_recorded", job_id=job.id, error=str(exc))
        except Exception as exc:  # one job's trouble must never stop the dispatcher
            log.error("job_run_failed", job_id=job.id, error=repr(exc), exc_info=True)
            self._record_internal_failure(job, exc)
        finally:
            del self._running[job.id]
            self._job_ended.set()
            self.wake()

    def _record_internal_failure(self, job: Job, exc: Exception) -> None:
        outcome = Outcome(
            error_kind="internal",
            error_message=f"the daemon failed to run this attempt ({exc!r}); see its log",
        )
        try:
            ended = self.store.finish(
                job.id, outcome, now=self.clock(), rng=self.rng, attempt=job.attempt
            )
        except Exception as again:
            log.error("job_finish_not_recorded", job_id=job.id, error=repr(again))
            return
        if ended.state is State.QUEUED:
            self.due_at(ended.run_after)
        self.on_job_changed(ended)

    async def drain(self, grace_s: float) -> None:
        """Claim nothing more; give running jobs `grace_s` to end, then stop and requeue them."""
        self._stopping = True
        with trio.move_on_after(grace_s):
            await self._all_jobs_ended()
        for scope in list(self._running.values()):
            scope.cancel()
        await self._all_jobs_ended()

    async def _all_jobs_ended(self) -> None:
        while self._running:
            self._job_ended = trio.Event()
            await self._job_ended.wait()
