"""One small handler per JSON-RPC method, over the store.

Handlers run on the trio thread. Enqueues go through the GroupCommitter so that
concurrent clients share one commit; every reply to an enqueue is sent only after
its commit. Store errors become RpcErrors with a stable code here and nowhere else.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import msgspec
import trio

from semantica import __version__, joblog, log
from semantica import protocol as p
from semantica.domain import (
    EnqueueRequest,
    IllegalTransition,
    Job,
    State,
    ValidationError,
    waiting_reason,
)
from semantica.durability import Checkpointer, WalSync
from semantica.launcher import Launcher
from semantica.maintenance import Maintenance, backup
from semantica.plugins import installed_runners
from semantica.scheduler import Dispatcher
from semantica.store import (
    Conditions,
    EnqueueGroup,
    EnqueueResult,
    Store,
    StoreError,
)
from semantica.tracing import JobTracing

# Methods whose reply waits for the WAL fsync (WalSync). Enqueues are not among
# them: the group commit they share syncs before it wakes them (GroupCommitter).
WRITING_METHODS = frozenset(
    {
        "dev.cancel.v1",
        "queues.pause.v1",
        "queues.resume.v1",
        "queues.configure.v1",
        "jobs.retry.v1",
        # Deletes jobs (their files go only once that is on disk, see maintenance.py);
        # the reply, saying what was deleted, waits for the WAL fsync like any write's.
        "admin.maintenance.v1",
    }
)
LOG_FOLLOW_CHECK_S = 0.2
COMMIT_GATHER_MIN_TURNS = 3  # loop turns a group commit waits for requests to join it
COMMIT_GATHER_MAX_TURNS = 6  # ... and at most, while each turn brings more
LOG_TAIL_MAX_LINES = joblog.TAIL_MAX_LINES


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class JobWatch:
    """Wakes long-polls (`jobs.wait.v1`) when a job changes state."""

    def __init__(self) -> None:
        self._events: dict[str, trio.Event] = {}

    def changed(self, job_ids: Iterable[str]) -> None:
        for job_id in job_ids:
            event = self._events.pop(job_id, None)
            if event is not None:
                event.set()

    def wake_all(self) -> None:
        self.changed(list(self._events))

    async def wait_for_change(self, job_id: str) -> None:
        await self._events.setdefault(job_id, trio.Event()).wait()


class _PendingEnqueue:
    __slots__ = ("done", "group", "outcome")

    def __init__(self, group: EnqueueGroup) -> None:
        self.group = group
        self.done = trio.Event()
        self.outcome: list[EnqueueResult] | Exception | None = None


class GroupCommitter:
    """Enqueues from many connections share one transaction.

    The first handler to arrive leads: it lets every handler that is already
    runnable add its request, then commits them all in one transaction, waits
    until that commit is on disk (`durable`, the group fsync), and wakes each with
    its own outcome: one wake-up per request, not one for the commit and another
    for the fsync. Anything arriving later waits for the next leader.
    """

    def __init__(
        self,
        store: Store,
        clock: Callable[[], int],
        metrics: p.Counters,
        durable: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._clock = clock
        self._metrics = metrics
        self._durable = durable
        self._pending: list[_PendingEnqueue] = []
        self._leading = False
        self.on_committed: Callable[[list[EnqueueResult]], None] = lambda results: None
        # Whether other clients could join a group; the server knows its connections.
        self.may_have_company: Callable[[], bool] = lambda: True

    async def submit(self, group: EnqueueGroup) -> list[EnqueueResult]:
        pending = _PendingEnqueue(group)
        self._pending.append(pending)
        if self._leading:
            await pending.done.wait()
        else:
            self._leading = True
            batch: list[_PendingEnqueue] | None = None
            try:
                company = self.may_have_company()
                # Shielded: a leader cancelled while it waits would strand the requests
                # it carries. Alone, with no fsync to wait for, nothing below awaits:
                # then there is nothing to shield, and the scope's cost is saved.
                waits = company or self._durable is not None
                with trio.CancelScope(shield=True) if waits else contextlib.nullcontext():
                    if company:
                        await self._gather()
                    batch, self._pending = self._pending, []
                    # Those arriving from here on lead a commit of their own meanwhile
                    # (so `_leading` is theirs, not to be reset below).
                    self._leading = False
                    self._commit(batch)
                    await self._sync(batch)  # returns at once without `durable`
            finally:
                if batch is None:  # nothing was taken: let the next one lead
                    self._leading = False
                for b in batch or ():  # every handler taken is woken, whatever happened
                    if b.outcome is None:
                        b.outcome = RuntimeError("the group commit failed: see the daemon's log")
                    b.done.set()
        if isinstance(pending.outcome, Exception):
            raise pending.outcome
        assert pending.outcome is not None
        return pending.outcome

    async def _gather(self) -> None:
        """Turns of the event loop before the commit, so that it carries more
        requests: COMMIT_GATHER_MIN_TURNS (the handlers runnable now, then those whose
        requests the next polls of the sockets find), then on while a turn brings
        more, up to COMMIT_GATHER_MAX_TURNS. Eight clients at synchronous=FULL went
        from 6.3-6.8 to 7.9 jobs per commit (two turns before)."""
        for _ in range(COMMIT_GATHER_MIN_TURNS):
            await trio.lowlevel.cancel_shielded_checkpoint()
        for _ in range(COMMIT_GATHER_MAX_TURNS - COMMIT_GATHER_MIN_TURNS):
            before = len(self._pending)
            await trio.lowlevel.cancel_shielded_checkpoint()
            if len(self._pending) == before:
                return

    async def _sync(self, batch: list[_PendingEnqueue]) -> None:
        """Wait until what the batch stored is on disk; if the disk refuses the sync,
        each handler is told so (its jobs are committed, not known to be durable)."""
        if self._durable is None or all(isinstance(b.outcome, Exception) for b in batch):
            return
        try:
            await self._durable()
        except Exception as exc:  # StorageUnavailable (5003), or a bug: each is told
            if not isinstance(exc, StoreError):
                log.error("enqueue_sync_failed", error=repr(exc), exc_info=True)
            for b in batch:
                if not isinstance(b.outcome, Exception):
                    b.outcome = exc

    def _commit(self, batch: list[_PendingEnqueue]) -> None:
        """Store the batch's requests in one transaction and set each one's outcome
        (the caller wakes their handlers, once it is on disk)."""
        if not batch:
            return
        try:
            outcomes = self._store.enqueue_groups([b.group for b in batch], now=self._clock())
        except StoreError as exc:
            outcomes = [exc] * len(batch)
        except Exception as exc:
            log.error("enqueue_commit_failed", error=str(exc), exc_info=True)
            outcomes = [exc] * len(batch)
        else:
            self._metrics.enqueue_commits_total += 1
        stored: list[EnqueueResult] = []
        for pending, outcome in zip(batch, outcomes, strict=True):
            pending.outcome = outcome
            if not isinstance(outcome, Exception):
                stored.extend(outcome)
        if stored:
            self._metrics.job_enqueue_total += len(stored)
            try:
                self.on_committed(stored)
            except Exception as exc:  # the jobs are stored: their requests succeed
                log.error("enqueue_not_announced", error=repr(exc), exc_info=True)


RETRYABLE_STATES = (State.FAILED, State.CANCELLED, State.EXPIRED)  # what jobs.retry.v1 takes


class Api:
    """The handlers. `handle(method, params)` is the one entry point."""

    def __init__(
        self,
        store: Store,
        *,
        home: str,
        launcher: Launcher,
        workers: int,
        conditions: Callable[[], Conditions],
        clock: Callable[[], int] = wall_clock_ms,
        request_shutdown: Callable[[], None] = lambda: None,
        retention_days: float = 7.0,
        max_db_size_mb: int = 1000,
        tracing: JobTracing | None = None,
    ) -> None:
        self.store = store
        self.home = home
        self.clock = clock
        self.conditions = conditions
        self.launcher = launcher
        self.metrics = p.Counters()
        self.watch = JobWatch()
        self.dispatcher = Dispatcher(
            store,
            launcher,
            workers=workers,
            clock=clock,
            conditions=conditions,
            on_job_changed=self.job_changed,
            tracing=tracing,
        )
        self.runners = installed_runners()
        self.wal_sync = WalSync(store)
        self.committer = GroupCommitter(
            store, clock, self.metrics, durable=self.wal_sync.durable if store.needs_sync else None
        )
        self.committer.on_committed = self._after_enqueue
        if store.needs_sync:  # how attempts ended is announced once it is on disk
            self.dispatcher.durable = functools.partial(self.wal_sync.durable, off_loop=True)
        self.checkpointer = Checkpointer(store)
        self.maintenance = Maintenance(
            store,
            Path(home),
            retention_days=retention_days,
            max_db_size_mb=max_db_size_mb,
            clock=clock,
            # Shares the group fsync (counted with the others) when there is one; with
            # synchronous=normal commits are not synced, so maintenance syncs by itself.
            durable=self.wal_sync.durable if store.needs_sync else None,
        )
        self.request_shutdown = request_shutdown
        self.started_at = clock()
        self.started_monotonic = time.monotonic()
        self.draining = False

    async def handle(self, method: str, params: Any) -> Any:
        """Run one method; raise RpcError on failure.

        A method that writes replies only once its write is on disk (WalSync).
        """
        self.dispatcher.tell_dependents()  # left by a commit that told nobody (none expected)
        try:
            result = await self._dispatch(method, params)
            if method in WRITING_METHODS:
                await self.wal_sync.durable()
        except (StoreError, ValidationError, IllegalTransition) as exc:
            raise p.rpc_error_for(exc) from None
        return result

    async def _dispatch(self, method: str, params: Any) -> Any:
        match method:
            case "dev.enqueue.v1":
                return await self.enqueue(params)
            case "dev.enqueue_batch.v1":
                return await self.enqueue_batch(params)
            case "dev.cancel.v1":
                return self.cancel(params)
            case "jobs.get.v1":
                return self.with_waiting_reason(self.store.get(params.id))
            case "jobs.list.v1":
                return self.list_jobs(params)
            case "jobs.wait.v1":
                return await self.wait(params)
            case "queues.list.v1":
                return p.QueueList(queues=self.store.queues())
            case "queues.pause.v1":
                return self.store.set_queue_paused(params.queue, True, now=self.clock())
            case "queues.resume.v1":
                self.dispatcher.wake()
                return self.store.set_queue_paused(params.queue, False, now=self.clock())
            case "queues.configure.v1":
                self.dispatcher.wake()
                return self.store.configure_queue(
                    params.queue, concurrency=params.concurrency, now=self.clock()
                )
            case "jobs.retry.v1":
                return await self.retry(params)
            case "logs.tail.v1":
                return await self.tail_log(params)
            case "runners.list.v1":
                self.runners = installed_runners()
                return p.RunnerList(runners=sorted(self.runners.values(), key=lambda r: r.name))
            case "admin.stats.v1":
                return self.stats()
            case "admin.health.v1":
                return await self.health(params)
            case "admin.shutdown.v1":
                self.request_shutdown()
                return p.Stopping(stopping=True)
            case "admin.maintenance.v1":
                return await self.maintenance.run(force_vacuum=params.force_vacuum)
            case "admin.backup.v1":
                return await backup(self.store, self._backup_path(params.path))
        raise p.RpcError(p.METHOD_NOT_FOUND, f"no handler for {method!r}")

    # ----------------------------------------------------------------- jobs

    async def enqueue(self, req: EnqueueRequest) -> Job:
        req.job_type = self._check_job_type(req.job_type, "job_type")
        [result] = await self.committer.submit(EnqueueGroup([req], batch=False))
        return result.job

    async def enqueue_batch(self, params: p.EnqueueBatchParams) -> p.JobList:
        if not params.jobs:
            raise ValidationError("jobs", "must hold at least one job")
        for index, req in enumerate(params.jobs):
            req.job_type = self._check_job_type(req.job_type, f"jobs[{index}].job_type")
        results = await self.committer.submit(EnqueueGroup(params.jobs, batch=True))
        return p.JobList(jobs=[r.job for r in results])

    def _check_job_type(self, job_type: str, field: str) -> str:
        """A job type must name an installed runner plugin (case-insensitive); returns
        its one spelling, so `INDEX_FILE` and `index_file` jobs supersede each other."""
        if not isinstance(job_type, str):
            return job_type  # validation names the field's type error
        if job_type.lower() in self.runners:
            return job_type.lower()
        self.runners = installed_runners()  # a plugin may have been installed since
        if job_type.lower() not in self.runners:
            raise ValidationError(
                field,
                f"no runner plugin {job_type!r} is installed; installed: "
                f"{', '.join(sorted(self.runners)) or 'none'} (plugins register under the "
                "'semantica.runners' entry point group)",
            )
        return job_type.lower()

    async def retry(self, params: p.JobIdParams) -> Job:
        """Run a job that ended FAILED, CANCELLED or EXPIRED again, as a new job."""
        job = self.store.get(params.id)
        if job.state not in RETRYABLE_STATES:
            what = {
                State.QUEUED: "it has not run yet",
                State.RUNNING: "it is still running: wait for it, or cancel it first",
                State.DONE: "it succeeded: enqueue a new job to run it again",
                State.SUPERSEDED: "a newer job of its subject replaced it",
            }[job.state]
            raise p.RpcError(
                p.CONFLICT,
                f"job {job.id} is {job.state.value}: retry takes a FAILED, CANCELLED or "
                f"EXPIRED job, and {what}",
                {"id": job.id, "state": job.state.value},
            )
        req = EnqueueRequest(
            job_type=job.job_type,
            queue=job.queue,
            subject_key=job.subject_key,
            payload=job.payload,
            priority=job.priority,
            execution_mode=job.execution_mode,
            max_attempts=job.max_attempts,
            backoff_base_ms=job.backoff_base_ms,
            backoff_factor=job.backoff_factor,
            deadline_ms=job.deadline_ms,
            ttl_ms=job.ttl_ms,
            wait_for_idle=job.wait_for_idle,
            require_charging=job.require_charging,
            user_tag=job.user_tag,
            parent_job_id=job.id,
            chain_group_id=job.chain_group_id,
            env=job.env,
            depends_on=self._dependencies_to_keep(job),
        )
        try:
            return await self.enqueue(req)
        except ValidationError as exc:
            if exc.field != "depends_on":
                raise
            raise ValidationError(
                "depends_on",
                f"cannot retry job {job.id}: {exc.reason}. Retry "
                "that job first (and so on up its chain), then enqueue this job again "
                "with depends_on naming the new jobs",
            ) from None

    def _dependencies_to_keep(self, job: Job) -> list[str]:
        """A retry waits for the same jobs as the original did (one that failed or was
        cancelled makes the retry refused, saying so); those deleted since, by the
        retention, had ended long ago and are left out."""
        existing = self.store.existing_ids(job.depends_on)
        return [dep for dep in job.depends_on if dep in existing]

    async def tail_log(self, params: p.TailParams) -> p.LogChunk:
        """The last `n` lines of a job's log, or what follows `offset` (waiting up to
        `wait_ms` for more while the job runs)."""
        if not 0 <= params.n <= LOG_TAIL_MAX_LINES:
            raise ValidationError("n", f"must be between 0 and {LOG_TAIL_MAX_LINES}")
        if params.offset is not None and params.offset < 0:
            raise ValidationError("offset", "must be 0 or more (an offset this API returned)")
        if not 0 <= params.wait_ms <= p.WAIT_TIMEOUT_MAX_MS:
            raise ValidationError("wait_ms", f"must be between 0 and {p.WAIT_TIMEOUT_MAX_MS}")
        job = self.store.get(params.id)
        path = self.launcher.log_path(job.id)
        if params.offset is None:
            lines, size = await trio.to_thread.run_sync(joblog.last_lines, path, params.n)
            return p.LogChunk(lines=lines, offset=size, eof=self._log_ended(job))
        deadline = trio.current_time() + params.wait_ms / 1000
        while True:
            job = self.store.get(job.id)  # read before the file: an ended job wrote all
            ended = self._log_ended(job)
            data, offset = await trio.to_thread.run_sync(
                functools.partial(joblog.read_from, path, params.offset, to_end=ended)
            )
            if data or ended or trio.current_time() >= deadline or self.draining:
                lines = joblog.lines_of(data)
                eof = ended and offset >= joblog.file_size(path)
                return p.LogChunk(lines=lines, offset=offset, eof=eof)
            with trio.move_on_at(deadline):  # new output is checked a few times a second
                with trio.move_on_after(LOG_FOLLOW_CHECK_S):
                    await self.watch.wait_for_change(job.id)

    def _log_ended(self, job: Job) -> bool:
        """Whether the job's log is complete: it ended, and no process of it is left
        to write (a cancelled job's is stopped after the job counts as CANCELLED)."""
        return job.is_terminal and not self.dispatcher.has_process(job.id)

    def job_changed(self, job: Job) -> None:
        """A job changed state outside a request (it started, ended, was retried)."""
        match job.state:
            case State.DONE:
                self.metrics.job_complete_total += 1
            case State.FAILED:
                self.metrics.job_failed_total += 1
            case State.QUEUED if job.attempt > 0:
                self.metrics.job_retry_total += 1
        self._log_state_change(job)
        self.watch.changed([job.id])

    def _after_enqueue(self, results: list[EnqueueResult]) -> None:
        changed = []
        now = self.clock()
        debug = log.enabled(logging.DEBUG)
        for result in results:
            job = result.job
            if job.state is State.QUEUED and job.run_after > now:
                self.dispatcher.due_at(job.run_after)
                self.dispatcher.runner_needed_at(job.run_after)
            if job.state is State.QUEUED and job.ttl_ms is not None:
                self.dispatcher.due_at(job.created_at + job.ttl_ms)
            for job_id in result.superseded_running_ids:
                self.dispatcher.stop_job(job_id, (job.queue, job.job_type, job.subject_key))
            if debug:
                log.debug("job_enqueued", job_id=job.id, queue=job.queue, job_type=job.job_type)
            if not (
                result.superseded_ids
                or result.superseded_running_ids
                or result.superseded_on_arrival
            ):
                continue  # the common case: nothing else changed
            superseded = result.superseded_ids + result.superseded_running_ids
            if result.superseded_on_arrival:
                superseded.append(job.id)
            for job_id in superseded:  # as stored: with its attempt and how long it ran
                was = job if job_id == job.id else self.store.get(job_id)
                self._log_state_change(was, superseded_by=job.id)
            changed += superseded
        self.watch.changed(changed)
        self.dispatcher.tell_dependents()  # after the jobs whose supersede cancelled them
        self.dispatcher.wake_for_enqueue({result.job.queue for result in results})

    def cancel(self, params: p.CancelParams) -> p.Cancelled:
        result = self.store.cancel(
            job_id=params.id, tag=params.tag, chain=params.chain, now=self.clock()
        )
        self.watch.changed(result.cancelled)  # (its dependents: below)
        for job_id in result.was_running:  # its process group is stopped; it stays CANCELLED
            was = self.store.get(job_id)
            self.dispatcher.stop_job(job_id, (was.queue, was.job_type, was.subject_key))
        for job_id in result.cancelled:
            self._log_state_change(self.store.get(job_id))
        self.dispatcher.tell_dependents()  # after the jobs whose cancel cancelled them
        return p.Cancelled(
            cancelled=result.cancelled, dependents_cancelled=result.dependents_cancelled
        )

    def _log_state_change(self, job: Job, **extra: Any) -> None:
        """SPEC §9: every state change, with the job's identity and why (never its payload)."""
        fields: dict[str, Any] = {
            "job_id": job.id,
            "queue": job.queue,
            "job_type": job.job_type,
            "state": job.state.value,
            "attempt": job.attempt,
        }
        if job.error_kind is not None and job.state is not State.RUNNING:
            fields["error_kind"] = job.error_kind
        if job.finished_at is not None and job.started_at is not None:
            fields["duration_ms"] = job.finished_at - job.started_at
        tracing = self.dispatcher.tracing
        if tracing is not None and (trace_id := tracing.trace_id(job.id)):
            fields["trace_id"] = trace_id
        log.event("job_state_changed", **fields, **extra)

    def with_waiting_reason(self, job: Job) -> Job:
        """A QUEUED job with the reason it has not started (what the claim checks)."""
        if job.state is not State.QUEUED:
            return job
        now = self.clock()
        facts = self.store.wait_facts(
            job,
            now=now,
            global_limit=self.dispatcher.workers,
            stopping=self.dispatcher.stopping_keys(),
        )
        if job.wait_for_idle or job.require_charging:
            offered = self.conditions()
            facts = msgspec.structs.replace(
                facts,
                # One idle-gated job is admitted per reading: the next waits for one
                # made with that job running (Dispatcher._claim).
                cpu_idle=offered.cpu_idle and self.dispatcher.admits_idle_gated(now),
                on_ac_power=offered.on_ac_power,
            )
        starting = self.launcher.runner_starting(job.execution_mode)
        if starting is not None:
            facts = msgspec.structs.replace(facts, runner_starting=starting)
        return msgspec.structs.replace(job, waiting_reason=waiting_reason(job, facts, now))

    def list_jobs(self, params: p.ListParams) -> p.JobPage:
        jobs, cursor = self.store.list(params, limit=params.limit, cursor=params.cursor)
        return p.JobPage(jobs=jobs, next_cursor=cursor)

    async def wait(self, params: p.WaitParams) -> Job:
        if not 0 <= params.timeout_ms <= p.WAIT_TIMEOUT_MAX_MS:
            raise ValidationError("timeout_ms", f"must be between 0 and {p.WAIT_TIMEOUT_MAX_MS}")
        job = self.store.get(params.id)
        with trio.move_on_after(params.timeout_ms / 1000):
            while not job.is_terminal and not self.draining:
                await self.watch.wait_for_change(params.id)
                job = self.store.get(params.id)
        job = self.store.get(params.id)
        if job.is_terminal:  # its end may be committed and not yet synced: sync first
            await self.wal_sync.durable()
        return self.with_waiting_reason(job)

    # ----------------------------------------------------------------- admin

    def _backup_path(self, raw: str) -> Path:
        """Where a backup may go: an absolute path, in an existing directory, not
        already taken (a backup never overwrites anything)."""
        try:
            return self._checked_backup_path(raw)
        except OSError as exc:  # a name the system refuses (too long, a bad component)
            raise ValidationError("path", f"cannot be used: {exc.strerror or exc}") from None

    def _checked_backup_path(self, raw: str) -> Path:
        if "\x00" in raw:
            raise ValidationError("path", "must not contain a NUL character")
        path = Path(raw)
        if not path.is_absolute():
            raise ValidationError(
                "path", f"must be absolute (the daemon's directory is not yours): {raw!r}"
            )
        name_max = os.pathconf(path.parent, "PC_NAME_MAX") if path.parent.is_dir() else 255
        if len(os.fsencode(path.name)) + len(".partial") > name_max:
            raise ValidationError(
                "path", f"the file name is too long: at most {name_max - 8} bytes here"
            )
        if not path.parent.is_dir():
            raise ValidationError("path", f"{path.parent} is not a directory: create it first")
        if path.exists() or Path(f"{path}.partial").exists():
            raise ValidationError("path", f"{path} exists already: choose a new file name")
        if path.resolve() in {
            Path(self.store.path).resolve(),
            Path(f"{self.store.path}-wal").resolve(),
        }:
            raise ValidationError("path", "is the live database itself")
        return path

    def stats(self) -> p.StatsResult:
        stats = self.store.stats()
        return p.StatsResult(
            jobs_by_state=stats.by_state,
            jobs_by_queue=stats.by_queue,
            running=stats.running,
            db_size_bytes=stats.db_size_bytes,
            uptime_s=round(time.monotonic() - self.started_monotonic, 3),
            counters=self.metrics,
            wal_fsyncs_total=self.wal_sync.fsyncs,
            wal_checkpoints_total=self.checkpointer.checkpoints + self.store.checkpoints_inline,
            maintenance_runs_total=self.maintenance.runs,
            dispatcher_wakeups_total=self.dispatcher.wakeups,
            scheduler_pop_latency_ms=self.dispatcher.claim_latency.snapshot(),
            job_start_latency_ms=self.dispatcher.start_latency.snapshot(),
        )

    async def health(self, params: p.HealthParams) -> p.HealthResult:
        check = "integrity_check" if params.integrity_check else "quick_check"
        # A damaged page can make SQLite stop the check: that is reported as a problem.
        problems = await self.maintenance.integrity_problems(check)
        disk = shutil.disk_usage(self.home)
        wal = self.store.path + "-wal"
        return p.HealthResult(
            ok=not problems,
            check=check,
            problems=problems,
            wal_bytes=os.path.getsize(wal) if os.path.exists(wal) else 0,
            disk_free_bytes=disk.free,
            db_path=self.store.path,
            schema_version=self.store.schema_version(),
            version=__version__,
            pid=os.getpid(),
            uptime_s=round(time.monotonic() - self.started_monotonic, 3),
            state="draining" if self.draining else "serving",
        )

    def begin_drain(self) -> None:
        """Release every long-poll with the job as it is now. (The dispatcher then
        starts no new job; an enqueue that still arrives before its connection closes
        is stored, acknowledged once durable, and runs after the next start.)"""
        self.draining = True
        self.watch.wake_all()
