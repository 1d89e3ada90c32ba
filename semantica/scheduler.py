"""The dispatcher: claims ready jobs up to the worker limit and runs each one.

It waits on an event (enqueue, completion, cancel, queue change) and on the next
due time (a `schedule_at`, a retry's backoff, a ttl) — never on a polling
interval, so an idle daemon does not wake at all.
"""

from __future__ import annotations

import contextlib
import heapq
import math
import random
import time
from collections.abc import Awaitable, Callable

import msgspec
import trio

from semantica import log
from semantica.domain import ExecutionMode, Job, Outcome, State
from semantica.launcher import Launcher, WarmWorker, kill_orphaned_runner
from semantica.metrics import Histogram
from semantica.probe import SAMPLE_EVERY_S
from semantica.store import Conditions, NotFound, StorageUnavailable, Store
from semantica.tracing import JobTracing

ALL_CONDITIONS = Conditions(cpu_idle=True, on_ac_power=True)
SAMPLE_EVERY_MS = int(SAMPLE_EVERY_S * 1000)
RETRY_FIRST_S = 1.0  # after the store failed, look again after this, doubling
RETRY_MAX_S = 30.0
# While other jobs run, the ends of attempts gather this long before one sync covers
# them all (a group-commit window: a sync costs this disk ~250 us).
ANNOUNCE_GATHER_S = 0.002
# A job scheduled ahead has its kind of process got ready this long before it is
# due: the zygote, or a WARM worker, takes 100-300 ms to start, and a daemon's first
# job of a kind would otherwise start that late.
RUNNER_LEAD_MS = 1000


class _Ended:
    """An attempt that ended, waiting to be recorded."""

    __slots__ = ("ended_at", "job", "late", "outcome")

    def __init__(self, job: Job, outcome: Outcome, ended_at: int) -> None:
        self.job = job
        self.outcome = outcome
        self.ended_at = ended_at  # ms, when the attempt ended
        self.late = False  # the store refused it once: logged, and retried


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
        tracing: JobTracing | None = None,
    ) -> None:
        self.store = store
        self.launcher = launcher
        self.workers = workers
        self.clock = clock
        self.conditions = conditions
        self.on_job_changed = on_job_changed
        self.rng = rng or random.Random()
        self.tracing = tracing
        self._wake = trio.Event()
        # What the next look must consider: everything, or only the queues that had
        # jobs enqueued (an enqueue into a paused queue makes nothing claimable).
        self._look_everywhere = True
        self._enqueued_into: set[str] = set()
        self._due: list[int] = []  # heap: times at which a queued job becomes ready or expires
        self._prepare: list[int] = []  # heap: times at which to get the next runner ready
        self._runner_due = False  # one of those times has passed: see after this look
        self._running: dict[str, trio.CancelScope] = {}
        # Subjects whose running job was cancelled or superseded and whose process is
        # still stopping: no job of the subject starts until it is gone (SPEC §3, at
        # most one runs per key). job id -> (queue, job_type, subject_key)
        self._stopping_keys: dict[str, tuple[str, str, str]] = {}
        self._stopping = False
        self._job_ended = trio.Event()
        # Attempts that ended, to be recorded by the next look (in the transaction that
        # claims their successors); `late` once the store has refused them.
        self._finishing: list[_Ended] = []
        # Recorded, to be announced (waiters, logs) once on disk.
        # (job, whether to tell of it: not when the cancel or supersede that stopped it
        # was told already)
        self._to_announce: list[tuple[Job, bool]] = []
        self._announce = trio.Event()
        # Awaited before announcing ended jobs (the daemon's group fsync), if set.
        self.durable: Callable[[], Awaitable[None]] | None = None
        # Jobs the store cancelled because a job they depend on will never be DONE,
        # collected at each commit, to be told after the job that doomed them (by
        # whoever tells of that job: the API's cancel or enqueue, or this dispatcher).
        self._dependents: list[str] = []
        store.on_dependents_cancelled(self._dependents.extend)
        self._caught_up = False
        self._failures = 0
        self._idle_admitted_at = -SAMPLE_EVERY_MS
        # A probe that caches its readings (probe.SystemProbe) is told when an
        # idle-gated job is admitted, so that the next reading is measured afresh with
        # that job running instead of coming from the cache filled before it started.
        probe = getattr(conditions, "__self__", None)
        self._resample: Callable[[], None] = getattr(probe, "resample", None) or (lambda: None)
        self.wakeups = 0
        self.claim_latency = Histogram()  # ms per claim statement
        self.start_latency = Histogram()  # ms from ready (enqueue, schedule, backoff) to start

    # ----------------------------------------------------------------- events

    def wake(self) -> None:
        """Something changed (a job ended, a queue resumed): look again."""
        self._look_everywhere = True
        self._wake.set()

    def wake_for_enqueue(self, queues: set[str]) -> None:
        """Jobs were enqueued into these queues: look again, there only. Jobs in a
        paused queue cannot start: for them alone the dispatcher is not woken."""
        if all(self.store.is_paused(q) for q in queues):
            return
        self._enqueued_into |= queues
        self._wake.set()

    def due_at(self, when_ms: int | None) -> None:
        """Look again at `when_ms` (a schedule_at, a retry, an expiry). A time already
        passed is kept too, for the next look at once: a ttl shorter than the enqueue
        took was dropped here, and nothing else ever expired its job."""
        if when_ms is not None and when_ms <= self.clock():
            heapq.heappush(self._due, when_ms)
            self._wake.set()
        elif when_ms is not None:
            nearest = self._due[0] if self._due else None
            heapq.heappush(self._due, when_ms)
            # The wait must be re-armed only if this is now the nearest time: a later
            # one is seen when the wait ends. (Waking for every call made each look that
            # asked to look again later wake the loop at once: a busy loop while a gated
            # job waited.)
            if nearest is None or when_ms < nearest:
                self._wake.set()

    def runner_needed_at(self, when_ms: int | None) -> None:
        """A queued job becomes ready at `when_ms`: have the process of the job that
        will be claimed then ready by that time (from RUNNER_LEAD_MS before), so that
        it starts on time even as the first job of its kind."""
        if when_ms is None:
            return
        at = when_ms - RUNNER_LEAD_MS
        nearest = self._prepare[0] if self._prepare else None
        heapq.heappush(self._prepare, at)
        if nearest is None or at < nearest:
            self._wake.set()  # re-arm the wait (or get it ready now, if `at` has passed)

    def _runner_needed_at_next_look(self, when_ms: int | None) -> None:
        """`runner_needed_at` from within a look: the wait that follows it counts
        this time already, so the loop is not woken for another look at once."""
        if when_ms is None:
            return
        if when_ms - RUNNER_LEAD_MS <= self.clock():
            self._runner_due = True  # seen to right after this look
        else:
            heapq.heappush(self._prepare, when_ms - RUNNER_LEAD_MS)

    def stop_job(self, job_id: str, key: tuple[str, str, str | None] | None = None) -> bool:
        """Stop a running job's process group (it was cancelled or superseded). Its
        subject `key` (queue, job_type, subject_key) stays taken until the process
        is gone."""
        scope = self._running.get(job_id)
        if scope is None:
            return False
        if key is not None and key[2] is not None:
            self._stopping_keys[job_id] = (key[0], key[1], key[2])
        scope.cancel()
        return True

    @property
    def running(self) -> int:
        return len(self._running)

    def admits_idle_gated(self, now: int) -> bool:
        """Whether a claim now may admit an idle-gated job: one per reading of the
        sensors, the next only once a reading has been made with that one running."""
        return now >= self._idle_admitted_at + SAMPLE_EVERY_MS

    def has_process(self, job_id: str) -> bool:
        """Whether a process of this job may still run (and write to its log)."""
        return job_id in self._running

    def stopping_keys(self) -> dict[tuple[str, str, str], str]:
        """(queue, job_type, subject_key) -> the id of the job whose process is stopping."""
        return {key: job_id for job_id, key in self._stopping_keys.items()}

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
        self._guarded(self._catch_up)
        async with trio.open_nursery() as jobs:
            jobs.start_soon(self._announce_ended)
            task_status.started()
            while True:
                self._wake = trio.Event()
                if self._guarded(self.step, jobs):
                    self._failures = 0
                if self._runner_due:  # after the claims: the idle workers left are known
                    self._runner_due = False
                    self._get_runner_ready_ahead(jobs)
                delay = self._seconds_to_next_due()
                with trio.move_on_after(delay):
                    await self._wake.wait()
                self.wakeups += 1

    def _catch_up(self) -> None:
        """What happened while no daemon ran: expiries, and the due times to wait for."""
        for job_id in self.store.expire_overdue(now=self.clock()):
            self.on_job_changed(self.store.get(job_id))
        self.tell_dependents()
        run_after, expiry = self.store.next_due_times(now=self.clock())
        self.due_at(run_after)
        self.due_at(expiry)
        self._runner_needed_at_next_look(run_after)
        self._caught_up = True

    def _guarded(self, fn: Callable[..., None], *args: object) -> bool:
        """Run one look; if the store fails (a full disk, a locked file), log it and look
        again after a growing pause instead of stopping the daemon."""
        try:
            fn(*args)
        except Exception as exc:
            self._failures += 1
            retry_s = min(RETRY_MAX_S, RETRY_FIRST_S * 2 ** min(self._failures - 1, 16))
            log.error(
                "dispatcher_step_failed",
                error=str(exc) if isinstance(exc, StorageUnavailable) else repr(exc),
                retry_in_s=retry_s,
                exc_info=not isinstance(exc, StorageUnavailable),
            )
            self.due_at(self.clock() + int(retry_s * 1000))
            return False
        return True

    def step(self, jobs: trio.Nursery) -> None:
        """One look: expire what is overdue, then, in one transaction, record the
        attempts that ended and claim ready jobs while there is room; start those."""
        now = self.clock()
        # Passed times leave the heap first: if a store call below fails, a passed
        # time left at its head would make the next wait zero (a busy loop).
        passed = bool(self._due) and self._due[0] <= now
        while self._due and self._due[0] <= now:
            heapq.heappop(self._due)
        # The same for the times to get a runner ready; it is done after the claims.
        while self._prepare and self._prepare[0] <= now:
            heapq.heappop(self._prepare)
            self._runner_due = True
        if passed:
            self._look_everywhere = True  # a time passed: any queue may have a ready job
        if not self._caught_up:
            self._catch_up()
        if passed:
            # Jobs queued before this daemon started are not in the heap: ask the
            # store for the next due time each time one passes (rare, and only then).
            run_after, expiry = self.store.next_due_times(now=now)
            for when in (run_after, expiry):
                if when is not None:
                    heapq.heappush(self._due, when)
            self._runner_needed_at_next_look(run_after)
            for job_id in self.store.expire_overdue(now=now):  # only when something is due
                self.on_job_changed(self.store.get(job_id))
            self.tell_dependents()
        claiming = self._may_claim()
        if not claiming and not self._finishing:
            return
        offered = ALL_CONDITIONS
        wants_idle = wants_power = False
        if claiming:
            offered, wants_idle, wants_power = self._offered(now)
        finishing = list(self._finishing)
        claimed: list[tuple[Job, WarmWorker | None]] = []
        try:
            # One transaction: the attempts that ended, then the jobs taking their
            # places (a WARM job with the idle worker that will run it).
            with self.store.transaction():
                # At `now`, as the claims: a successor never starts before its
                # predecessor's end.
                ended = [self._record(e, now) for e in finishing]
                if claiming and _gated_back_in_line(ended):
                    # A gated job's retry is due: the conditions were taken before it
                    # was QUEUED again, perhaps without reading the sensors at all.
                    offered, wants_idle, wants_power = self._offered(now)
                if claiming:
                    offered = self._claim(now, offered, claimed, jobs)
        except BaseException:
            for job, worker in claimed:  # rolled back: QUEUED again, without a runner
                if worker is not None:
                    self.launcher.warm.give_back(worker)
                if job.runner_pid is not None:
                    self.launcher.give_back_fresh_runner(job.runner_pid)
            for e in finishing:
                if not e.late:
                    e.late = True
                    log.error(
                        "job_finish_not_recorded",
                        job_id=e.job.id,
                        advice="kept in memory and retried; a restart counts the attempt "
                        "as orphaned",
                    )
            raise
        del self._finishing[: len(finishing)]
        self._after_recorded(finishing, ended)
        for job, worker in claimed:
            self._start(jobs, job, worker, now)
        if (wants_idle and not offered.cpu_idle) or (wants_power and not offered.on_ac_power):
            # A gated job may be waiting on a condition: read the sensors again soon.
            # Only while such a job is queued; an idle daemon does not wake for this.
            # Counted from after the admissions, so the probe's reading has aged by then.
            self.due_at(self.clock() + SAMPLE_EVERY_MS)

    def _offered(self, now: int) -> tuple[Conditions, bool, bool]:
        """The conditions a claim may take as met now, and whether a QUEUED job waits
        for CPU idle, for AC power: the sensors are read only while one does."""
        offered = ALL_CONDITIONS
        wants_idle, wants_power = self.store.gated_waiting()
        if wants_idle or wants_power:
            offered = self.conditions()
        if offered.cpu_idle and not self.admits_idle_gated(now):
            offered = msgspec.structs.replace(offered, cpu_idle=False)
        return offered, wants_idle, wants_power

    def _may_claim(self) -> bool:
        """Whether this look should try to claim (it consumes the wake-up's hints)."""
        if self._stopping or len(self._running) >= self.workers:
            return False
        everywhere, self._look_everywhere = self._look_everywhere, False
        enqueued_into, self._enqueued_into = self._enqueued_into, set()
        # Queues paused since their enqueue woke us: nothing new can start.
        return everywhere or not all(self.store.is_paused(q) for q in enqueued_into)

    def _claim(
        self,
        now: int,
        offered: Conditions,
        claimed: list[tuple[Job, WarmWorker | None]],
        jobs: trio.Nursery,
    ) -> Conditions:
        """Claim ready jobs while there is room; returns the conditions still offered.

        A job is claimed with its process, recorded in the same UPDATE (SPEC §4: the
        runner's PID before the job counts as RUNNING): an idle WARM worker, or the
        zygote's spare. If the next job's kind of process is not there, it waits
        (QUEUED) while one is got ready in the background, and so do the jobs behind
        it (the claim order holds)."""
        launcher = self.launcher
        warm = launcher.warm
        stopping = list(self._stopping_keys.values())
        while len(self._running) + len(claimed) < self.workers:
            worker = warm.reserve()
            fresh = launcher.reserve_fresh_runner()
            claim_warm = worker is not None or launcher.claims_without_runner(ExecutionMode.WARM)
            claim_subprocess = fresh is not None or launcher.claims_without_runner(
                ExecutionMode.SUBPROCESS
            )
            began = time.perf_counter()
            try:
                job = self.store.claim_next_job(
                    now=now,
                    global_limit=self.workers,
                    conditions=offered,
                    warm_runner=None if worker is None else (worker.pid, worker.start_time),
                    fresh_runner=fresh,
                    stopping_keys=stopping,
                    claim_warm=claim_warm,
                    claim_subprocess=claim_subprocess,
                )
            except BaseException:
                if worker is not None:
                    warm.give_back(worker)
                if fresh is not None:
                    self.launcher.give_back_fresh_runner(fresh[0])
                raise
            self.claim_latency.observe((time.perf_counter() - began) * 1000)
            mode = None if job is None else job.execution_mode
            if worker is not None and mode is not ExecutionMode.WARM:
                warm.give_back(worker)
                worker = None
            if fresh is not None and mode is not ExecutionMode.SUBPROCESS:
                launcher.give_back_fresh_runner(fresh[0])
            if job is None:
                waiting = {
                    mode
                    for mode, claimable in (
                        (ExecutionMode.WARM, claim_warm),
                        (ExecutionMode.SUBPROCESS, claim_subprocess),
                    )
                    if not claimable
                }
                if waiting:
                    self._get_runners_ready(now, offered, stopping, waiting, jobs)
                break
            claimed.append((job, worker))
            if job.wait_for_idle:
                # This job's own load is not yet in the reading: admit one idle-gated
                # job per sample, and let the next reading decide about the next one.
                offered = msgspec.structs.replace(offered, cpu_idle=False)
                self._idle_admitted_at = now
                self._resample()
        return offered

    def _get_runners_ready(
        self,
        now: int,
        offered: Conditions,
        stopping: list[tuple[str, str, str]],
        waiting: set[ExecutionMode],
        jobs: trio.Nursery,
    ) -> None:
        """Nothing more could be claimed: if the next job waits for its kind of process
        (one of `waiting`), get one ready; the dispatcher is woken once it is."""
        mode = self.store.next_claim_mode(now=now, conditions=offered, stopping_keys=stopping)
        if mode in waiting:
            self.launcher.get_runner_ready(mode, jobs, self.wake)

    def _start(self, jobs: trio.Nursery, job: Job, worker: WarmWorker | None, now: int) -> None:
        self.start_latency.observe(max(0, now - max(job.created_at, job.run_after)))
        self._running[job.id] = trio.CancelScope()
        if any(ended.id == job.id for ended, _tell in self._to_announce):
            self._announce_now(job.id)  # a retry due at once: its last end comes first
        trace_id = self._trace_begin(job, now)
        self._tell(job)
        jobs.start_soon(self._run_job, job, trace_id, worker)

    def _trace_begin(self, job: Job, now: int) -> str | None:
        """Tracing is an observer: its trouble is logged, never the job's."""
        if self.tracing is None:
            return None
        try:
            return self.tracing.begin(job, now)
        except Exception as exc:
            log.warning("tracing_failed", job_id=job.id, error=repr(exc))
            return None

    def _trace_end(self, job: Job) -> None:
        if self.tracing is None:
            return
        try:
            self.tracing.end(job, self.clock())
        except Exception as exc:
            log.warning("tracing_failed", job_id=job.id, error=repr(exc))

    def _record(self, e: _Ended, now: int) -> tuple[Job, bool] | None:
        """Record one ended attempt: (the job now, whether this changed it), or None
        if the job is gone (deleted meanwhile: nothing is left to record)."""
        if e.late:  # recorded looks after it ended (a full disk): its own end time
            now = min(now, e.ended_at)
        try:
            return self.store.record_end(e.job.id, e.outcome, now=now, rng=self.rng, claimed=e.job)
        except NotFound:
            log.warning(
                "job_end_dropped", job_id=e.job.id, reason="the job was deleted while it ran"
            )
            return None
        except StorageUnavailable:
            raise  # the disk: every end waits for it, and the look is retried
        except Exception as exc:
            # Something in this one outcome the store cannot take (a bug, a value out
            # of range): recorded as an internal failure instead, so that it does not
            # hold back every other end and claim after it, look after look.
            log.error(
                "job_end_not_recordable",
                job_id=e.job.id,
                error=repr(exc),
                advice="recorded as an internal failure; please report it",
                exc_info=True,
            )
            fallback = Outcome(
                error_kind="internal",
                error_message=f"the daemon could not record how this attempt ended ({exc!r})",
            )
            try:
                return self.store.record_end(
                    e.job.id, fallback, now=now, rng=self.rng, claimed=e.job
                )
            except StorageUnavailable:
                raise
            except Exception as again:  # not the outcome, then: the row itself
                message = f"the daemon could not record how this attempt ended ({again!r})"
                log.error(
                    "job_end_not_recordable",
                    job_id=e.job.id,
                    error=repr(again),
                    advice="marked FAILED without the usual rules (no retry); please report it",
                )
                if self.store.fail_running(e.job.id, message, now=now):
                    with contextlib.suppress(Exception):  # told, if it can be read
                        return self.store.get(e.job.id), True
                return None

    def _after_recorded(
        self, finishing: list[_Ended], ended: list[tuple[Job, bool] | None]
    ) -> None:
        """After the commit that recorded these ends (None: the job was gone)."""
        for e, end in zip(finishing, ended, strict=True):
            if e.job.runner_pid is not None:  # a spare its claim reserved, never asked for
                self.launcher.give_back_fresh_runner(e.job.runner_pid)
            if end is None:
                continue
            if e.late:
                log.event("job_finish_recorded_late", job_id=e.job.id, state=end[0].state.value)
            self._after_finish(*end)
        # Told with (after) the ends that cancelled them, once those are on disk.
        for job_id in self._take_dependents():
            with contextlib.suppress(NotFound):
                self._to_announce.append((self.store.get(job_id), True))
                self._announce.set()

    def tell_dependents(self) -> None:
        """Tell now the jobs cancelled for their dependencies by what was just told."""
        for job_id in self._take_dependents():
            with contextlib.suppress(NotFound):
                self._tell(self.store.get(job_id))

    def _take_dependents(self) -> list[str]:
        taken = list(self._dependents)
        self._dependents.clear()
        return taken

    def _after_finish(self, ended: Job, changed: bool) -> None:
        self._look_everywhere = True  # its worker slot, and maybe its key, are free now
        if ended.state is State.QUEUED:
            self.due_at(ended.run_after)
        # Unchanged: the job had moved on (cancelled, superseded), and the request that
        # moved it told of that already. Only its trace is left to end.
        self._to_announce.append((ended, changed))
        self._announce.set()

    async def _announce_ended(self) -> None:
        """Tell waiters and the log how attempts ended, once that is on disk: the
        ends recorded so far are taken first, then synced, so a sync covers every
        end it announces (those recorded meanwhile wait for the next)."""
        while True:
            await self._announce.wait()
            if self.durable is not None and self._running:
                # More ends are coming: let a few gather, so that one sync covers them.
                await trio.sleep(ANNOUNCE_GATHER_S)
            self._announce = trio.Event()
            batch, self._to_announce = self._to_announce, []
            if self.durable is not None:
                try:
                    await self.durable()
                except StorageUnavailable as exc:
                    # Committed, not known to be on disk: told all the same (waiters
                    # would otherwise hang), and the log says so.
                    log.warning("job_outcome_not_synced", error=str(exc))
            self._announce_jobs(batch)

    def _announce_now(self, job_id: str | None = None) -> None:
        """Announce the ends not yet told (only `job_id`'s, if given) without waiting
        for the sync: the daemon is stopping, or that job starts again at once and its
        last end must be told before its new start."""
        if job_id is None:
            ended, self._to_announce = self._to_announce, []
        else:
            ended = [entry for entry in self._to_announce if entry[0].id == job_id]
            self._to_announce = [entry for entry in self._to_announce if entry[0].id != job_id]
        self._announce_jobs(ended)

    def _announce_jobs(self, entries: list[tuple[Job, bool]]) -> None:
        for job, tell in entries:
            if tell:
                self._tell(job)
            self._trace_end(job)

    def _tell(self, job: Job) -> None:
        """Waiters, metrics and the log learn of a change: their trouble is logged,
        never allowed to stop the dispatcher."""
        try:
            self.on_job_changed(job)
        except Exception as exc:
            log.error("job_change_not_announced", job_id=job.id, error=repr(exc), exc_info=True)

    def _get_runner_ready_ahead(self, jobs: trio.Nursery) -> None:
        """A job is due within RUNNER_LEAD_MS: if the job to be claimed by then would
        wait for its kind of process, start getting one ready now. Not while every
        worker slot is taken: the job waits for a slot then, and the process of the
        job that frees it (a WARM worker back in the pool) is likely its own. Only a
        help: if the store fails here, the job starts when its process is there."""
        if len(self._running) >= self.workers:
            return
        try:
            mode = self.store.next_claim_mode(
                now=self.clock() + RUNNER_LEAD_MS,
                conditions=ALL_CONDITIONS,
                stopping_keys=list(self._stopping_keys.values()),
            )
            if mode is not None and not self.launcher.has_runner_ready(mode):
                self.launcher.get_runner_ready(mode, jobs, self.wake)
        except Exception as exc:
            log.warning(
                "runner_not_got_ready_ahead",
                error=str(exc) if isinstance(exc, StorageUnavailable) else repr(exc),
                exc_info=not isinstance(exc, StorageUnavailable),
                advice="the scheduled job starts once its process is there",
            )

    def _seconds_to_next_due(self) -> float:
        nearest = min(self._due[:1] + self._prepare[:1], default=None)
        if nearest is None:
            return math.inf
        return max(0.0, (nearest - self.clock()) / 1000)

    async def _run_job(
        self, job: Job, trace_id: str | None = None, worker: WarmWorker | None = None
    ) -> None:
        scope = self._running[job.id]
        outcome: Outcome | None = None
        try:
            with scope:
                outcome = await self.launcher.run(
                    job,
                    worker=worker,
                    on_started=lambda pid, start: self.store.record_runner(job.id, pid, start),
                    on_progress=lambda fraction, message: self.store.set_progress(
                        job.id, fraction, message
                    ),
                    trace_id=trace_id,
                )
            if scope.cancelled_caught:
                if self._stopping:
                    self._requeue(job)
                    return
                outcome = CANCELLED_WHILE_RUNNING
            assert outcome is not None
        except Exception as exc:  # one job's trouble must never stop the dispatcher
            log.error("job_run_failed", job_id=job.id, error=repr(exc), exc_info=True)
            outcome = Outcome(
                error_kind="internal",
                error_message=f"the daemon failed to run this attempt ({exc!r}); see its log",
            )
        finally:
            del self._running[job.id]
            self._stopping_keys.pop(job.id, None)
            self._job_ended.set()
            self.wake()
        # Recorded by the next look, with the claim of the job that takes its place.
        self._finishing.append(_Ended(job, outcome, self.clock()))

    def _requeue(self, job: Job) -> None:
        try:
            ended = self.store.requeue(job.id, now=self.clock(), attempt=job.attempt)
        except Exception as exc:  # a restart finds it RUNNING and recovers it
            log.error("job_requeue_failed", job_id=job.id, error=str(exc))
            return
        if ended.state is State.QUEUED:
            log.event("job_requeued", job_id=job.id, reason="daemon stopping")
        if ended.state is not State.CANCELLED:  # else the cancel told of it already
            self._tell(ended)
        self.tell_dependents()
        self._trace_end(ended)

    async def drain(self, grace_s: float) -> None:
        """Claim nothing more; give running jobs `grace_s` to end, then stop and requeue them."""
        self._stopping = True
        self.launcher.stop_getting_ready()
        with trio.move_on_after(grace_s):
            await self._all_jobs_ended()
        for scope in list(self._running.values()):
            scope.cancel()
        await self._all_jobs_ended()
        self._guarded(self._record_ended)
        if self.durable is not None and self._to_announce:
            with contextlib.suppress(StorageUnavailable):
                await self.durable()
        self._announce_now()

    def _record_ended(self) -> None:
        """Record the attempts that ended (no claim: the daemon is stopping)."""
        finishing = list(self._finishing)
        with self.store.transaction():
            ended = [self._record(e, self.clock()) for e in finishing]
        self._finishing.clear()
        self._after_recorded(finishing, ended)

    async def _all_jobs_ended(self) -> None:
        while self._running:
            self._job_ended = trio.Event()
            await self._job_ended.wait()


def _gated_back_in_line(ended: list[tuple[Job, bool] | None]) -> bool:
    """Whether one of these ends put a job that waits on a condition back in line."""
    return any(
        end is not None
        and end[0].state is State.QUEUED
        and (end[0].wait_for_idle or end[0].require_charging)
        for end in ended
    )
