"""Random operation sequences against a real SQLite store, checking SPEC §3 after every step.

A hypothesis `RuleBasedStateMachine` enqueues (singly, in batches, and several batches in
one group commit, some refused and rolled back; over three subject keys plus keyless jobs;
with server-assigned, explicit and out-of-order generations, `supersede_running`, ttl and
schedule_at), claims, finishes (success, retryable and permanent failure, and late reports
for jobs that already ended), cancels, expires and advances a fake clock.

The machine keeps its own model (every acknowledged enqueue, the highest generation
acknowledged per key, every terminal state seen) and an independent oracle for which job a
claim must return, and checks the supersede invariants after every step.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import msgspec
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
)

from semantica import domain
from semantica.domain import (
    TERMINAL_STATES,
    EnqueueRequest,
    IllegalTransition,
    Job,
    Outcome,
    State,
    ValidationError,
)
from semantica.store import (
    LIST_LIMIT_MAX,
    Conditions,
    EnqueueGroup,
    EnqueueResult,
    JobFilter,
    Store,
)

Key = tuple[str, str, str | None]  # (queue, job_type, subject_key)

SUBJECT_KEYS: list[Key] = [
    ("default", "index_file", "src/a.py"),
    ("default", "index_file", "src/b.py"),
    ("default", "build", "src/a.py"),  # same subject, other job type: a different key
]
KEYLESS: list[Key] = [("default", "index_file", None)]

GLOBAL_LIMIT = 3
ALL_MET = Conditions(cpu_idle=True, on_ac_power=True)
BACKOFF_BASE_MS = 100
BACKOFF_FACTOR = 2.0
JITTER = 0.25
START_MS = 1_700_000_000_000


class Spec(NamedTuple):
    """One enqueue to make; `gen_offset` makes the generation explicit, relative to the latest."""

    key: Key
    gen_offset: int | None = None
    supersede_running: bool = False
    priority: int = 0
    max_attempts: int = 3
    ttl_ms: int | None = None
    delay_ms: int | None = None  # schedule_at = now + delay_ms


SPECS = st.builds(
    Spec,
    key=st.sampled_from(SUBJECT_KEYS + KEYLESS),
    gen_offset=st.one_of(st.none(), st.integers(-3, 2)),
    supersede_running=st.booleans(),
    priority=st.integers(-2, 2),
    max_attempts=st.integers(1, 5),
    ttl_ms=st.one_of(st.none(), st.integers(1, 1500)),
    delay_ms=st.one_of(st.none(), st.integers(0, 1500)),
)

# Valid on its own, refused inside the transaction: rolls back the batch it is in.
BAD_REQUEST = EnqueueRequest(job_type="index_file", depends_on=["no-such-job"])


@dataclass
class KeyView:
    """Per key: the highest generation acknowledged, and the QUEUED and RUNNING job ids."""

    max_gen: dict[Key, int]
    queued: dict[Key, list[str]] = field(default_factory=dict)
    running: dict[Key, list[str]] = field(default_factory=dict)


# ttl bounds only the wait for a first start (SPEC §3): a retried job never expires.
SQL_QUEUED = """
SELECT seq, id, priority, queue, job_type, subject_key, generation, run_after, created_at,
       CASE WHEN attempt = 0 THEN ttl_ms END
FROM jobs WHERE state = 'QUEUED' ORDER BY seq
"""


class StoreMachine(RuleBasedStateMachine):
    jobs = Bundle("jobs")

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="semantica-sm-")
        try:
            self.store = Store.open(Path(self.dir) / "meta.db", synchronous="NORMAL")
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise
        self.now = START_MS
        # The model.
        self.acked: dict[str, tuple[Key, int | None]] = {}  # id -> (key, generation)
        self.max_gen: dict[Key, int] = {}  # highest generation acknowledged per key
        self.final: dict[str, tuple[State, int | None]] = {}  # id -> (state, finished_at)
        self.started_gens: dict[Key, list[int]] = {}  # generations in claim order
        self.done_gens: dict[Key, list[int]] = {}  # generations in order of DONE results

    def teardown(self) -> None:
        self.store.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ helpers

    def _sql(self, sql: str, args: tuple | dict = ()) -> list[tuple]:
        return [tuple(r) for r in self.store.connection.execute(sql, args)]

    def _ids_in(self, state: State, key: Key) -> list[str]:
        return [
            r[0]
            for r in self._sql(
                "SELECT id FROM jobs WHERE state = ? AND queue = ? AND job_type = ? "
                "AND subject_key = ? ORDER BY seq",
                (state.value, *key),
            )
        ]

    def _running_ids(self) -> list[str]:
        return [r[0] for r in self._sql("SELECT id FROM jobs WHERE state = 'RUNNING' ORDER BY seq")]

    def _live_ids(self) -> list[str]:
        return [
            r[0]
            for r in self._sql(
                "SELECT id FROM jobs WHERE state IN ('QUEUED', 'RUNNING') ORDER BY seq DESC"
            )
        ]

    def _running_keys(self) -> set[Key]:
        return {
            tuple(r)
            for r in self._sql(
                "SELECT queue, job_type, subject_key FROM jobs "
                "WHERE state = 'RUNNING' AND subject_key IS NOT NULL"
            )
        }

    def _expected_claim(self) -> str | None:
        """Which job the claim must take, computed in Python from the rules of SPEC §3/§5."""
        if len(self._running_ids()) >= GLOBAL_LIMIT:
            return None
        running_keys = self._running_keys()
        ready = []
        for seq, id_, prio, queue, job_type, subject, gen, run_after, created, ttl in self._sql(
            SQL_QUEUED
        ):
            key = (queue, job_type, subject)
            if run_after > self.now:
                continue
            if ttl is not None and created + ttl <= self.now:
                continue
            if subject is not None and (key in running_keys or gen != self.max_gen[key]):
                continue
            ready.append((-prio, seq, id_))
        return min(ready)[2] if ready else None

    # ------------------------------------------------------------------ enqueue checks

    def _view(self) -> KeyView:
        """What an enqueue will see: the model's generations, the store's live jobs per key."""
        view = KeyView(max_gen=dict(self.max_gen))
        for id_, state, queue, job_type, subject in self._sql(
            "SELECT id, state, queue, job_type, subject_key FROM jobs "
            "WHERE subject_key IS NOT NULL AND state IN ('QUEUED', 'RUNNING') ORDER BY seq"
        ):
            live = view.queued if state == State.QUEUED else view.running
            live.setdefault((queue, job_type, subject), []).append(id_)
        return view

    def _request(self, spec: Spec, max_gen: dict[Key, int]) -> EnqueueRequest:
        queue, job_type, subject = spec.key
        generation = None
        if subject is not None and spec.gen_offset is not None:  # explicit, maybe out of order
            generation = max(0, max_gen.get(spec.key, 0) + spec.gen_offset)
        return EnqueueRequest(
            job_type=job_type,
            queue=queue,
            subject_key=subject,
            generation=generation,
            priority=spec.priority,
            max_attempts=spec.max_attempts,
            backoff_base_ms=BACKOFF_BASE_MS,
            backoff_factor=BACKOFF_FACTOR,
            ttl_ms=spec.ttl_ms,
            schedule_at=None if spec.delay_ms is None else self.now + spec.delay_ms,
            supersede_running=subject is not None and spec.supersede_running,
        )

    def _check_enqueued(
        self,
        req: EnqueueRequest,
        res: EnqueueResult,
        view: KeyView,
        superseded_later: frozenset[str] = frozenset(),
    ) -> None:
        """Check one enqueue's reply against SPEC §3.1 and `view`; move `view` past it.

        A batch's reply shows its jobs as the batch left them: one in
        `superseded_later` (superseded by a later job of the same batch) is SUPERSEDED.
        """
        job = res.job
        if job.id in superseded_later:
            assert job.state is State.SUPERSEDED and job.finished_at == self.now
            assert job.error_kind == "superseded" and "newer request" in job.error_message
            job = msgspec.structs.replace(job, state=State.QUEUED, finished_at=None)
            res = msgspec.structs.replace(res, job=job)
        assert job.id not in self.acked
        assert job.created_at == self.now
        assert job.run_after == (self.now if req.schedule_at is None else req.schedule_at)
        key = (req.queue, req.job_type, req.subject_key)
        if req.subject_key is None:
            assert job.generation is None
            assert job.state is State.QUEUED
            assert not res.superseded_on_arrival
            assert res.superseded_ids == res.superseded_running_ids == []
            return
        latest = view.max_gen.get(key)
        if req.generation is None:  # server-assigned: latest + 1, the first is 1
            assert job.generation == (1 if latest is None else latest + 1)
        else:
            assert job.generation == req.generation
        stale = latest is not None and job.generation < latest
        assert res.superseded_on_arrival == stale
        event("enqueue: superseded on arrival" if stale else "enqueue: keyed")
        if stale:  # recorded SUPERSEDED at once, touching nothing else
            assert job.state is State.SUPERSEDED
            assert job.finished_at == self.now
            assert res.superseded_ids == res.superseded_running_ids == []
            return
        assert job.state is State.QUEUED
        assert sorted(res.superseded_ids) == sorted(view.queued.get(key, []))
        view.queued[key] = [job.id]
        if req.supersede_running:
            event(f"enqueue: supersede_running over {len(view.running.get(key, []))} running")
            assert sorted(res.superseded_running_ids) == sorted(view.running.pop(key, []))
        else:
            assert res.superseded_running_ids == []
        view.max_gen[key] = job.generation if latest is None else max(latest, job.generation)

    def _acknowledge(self, view: KeyView, results: list[EnqueueResult]) -> list[str]:
        """The enqueue committed: take `view` as the model and check the stored rows."""
        self.max_gen = view.max_gen
        superseded = set()
        for res in results:
            job = res.job
            self.acked[job.id] = ((job.queue, job.job_type, job.subject_key), job.generation)
            superseded.update(res.superseded_ids + res.superseded_running_ids)
        for old in superseded:
            gone = self.store.get(old)
            assert (gone.state, gone.finished_at) == (State.SUPERSEDED, self.now)
        for res in results:
            stored = self.store.get(res.job.id)
            # The reply is the row as its request left it: a later request of the same
            # commit (another client's, in the daemon's group commit) may supersede it.
            if res.job.id not in superseded or res.job.state is State.SUPERSEDED:
                assert stored == res.job
        return [res.job.id for res in results]

    def _enqueue(self, spec: Spec) -> str:
        view = self._view()
        req = self._request(spec, view.max_gen)
        res = self.store.enqueue(req, now=self.now)
        self._check_enqueued(req, res, view)
        return self._acknowledge(view, [res])[0]

    def _draft(self, specs: list[Spec], bad_at: int | None) -> list[EnqueueRequest]:
        """The requests of one batch; explicit generations relative to its earlier jobs."""
        max_gen = dict(self.max_gen)
        reqs = []
        for spec in specs:
            req = self._request(spec, max_gen)
            reqs.append(req)
            if req.subject_key is not None:
                latest = max_gen.get(spec.key)
                gen = req.generation
                if gen is None:
                    gen = 1 if latest is None else latest + 1
                max_gen[spec.key] = gen if latest is None else max(latest, gen)
        if bad_at is not None:
            reqs.insert(bad_at % (len(reqs) + 1), BAD_REQUEST)
        return reqs

    def _enqueue_batch(self, specs: list[Spec], bad_at: int | None):
        """One batch, all or nothing; with `bad_at`, a job the store refuses spoils it."""
        reqs = self._draft(specs, bad_at)
        if bad_at is not None:
            with pytest.raises(ValidationError):
                self.store.enqueue_batch(reqs, now=self.now)
            event("batch: refused")
            return multiple()  # nothing stored, no generation taken: the invariants check
        view = self._view()
        results = self.store.enqueue_batch(reqs, now=self.now)
        assert len(results) == len(reqs)
        later = _superseded_within(results)
        for req, res in zip(reqs, results, strict=True):
            self._check_enqueued(req, res, view, later)
        return multiple(*self._acknowledge(view, results))

    # ------------------------------------------------------------------ rules

    @rule(target=jobs, spec=SPECS)
    def enqueue(self, spec: Spec) -> str:
        return self._enqueue(spec)

    @rule(
        target=jobs,
        groups=st.lists(
            st.tuples(
                st.lists(SPECS, min_size=1, max_size=3),
                st.sampled_from([None, None, 0, 1, 3]),  # where a refused job spoils it
            ),
            min_size=1,
            max_size=3,
        ),
    )
    def enqueue_batches(self, groups: list[tuple[list[Spec], int | None]]):
        """Batches, all or nothing: one is `enqueue_batch`; several share one transaction
        (the daemon's group commit: single enqueues and batches, plain ones without a
        savepoint of their own) and a refused one must not disturb the others."""
        if len(groups) == 1:
            return self._enqueue_batch(*groups[0])
        batches = [self._draft(specs, bad_at) for specs, bad_at in groups]
        view = self._view()
        # A group of one is what the daemon makes of a single dev.enqueue.v1 call.
        outcomes = self.store.enqueue_groups(
            [EnqueueGroup(reqs, batch=len(reqs) > 1) for reqs in batches], now=self.now
        )
        assert len(outcomes) == len(batches)
        results = []
        for (_, bad_at), reqs, outcome in zip(groups, batches, outcomes, strict=True):
            if bad_at is not None:  # refused, rolled back, the other groups untouched
                assert isinstance(outcome, ValidationError), outcome
                event("group: refused")
                continue
            assert isinstance(outcome, list), outcome
            later = _superseded_within(outcome)
            for req, res in zip(reqs, outcome, strict=True):
                self._check_enqueued(req, res, view, later)
            results += outcome
        return multiple(*self._acknowledge(view, results))

    @initialize(target=jobs, specs=st.lists(SPECS, min_size=1, max_size=6))
    def seed_jobs(self, specs: list[Spec]):
        """Start with a few jobs, so runs where swarm testing disables `enqueue` still work."""
        return self._enqueue_batch(specs, bad_at=None)

    @rule(
        target=jobs,
        pick=st.integers(0, 50),
        gen_offset=st.sampled_from([None, -1, 0, 0, 1]),  # 0: the same generation again
        supersede_running=st.sampled_from([False, False, True]),
        max_attempts=st.integers(1, 5),
        withdraw=st.sampled_from([False, False, True]),
    )
    def enqueue_while_key_runs(
        self,
        pick: int,
        gen_offset: int | None,
        supersede_running: bool,
        max_attempts: int,
        withdraw: bool,
    ):
        """Steer towards SPEC §3.3/§3.4: a newer (or stale) request while its key runs,
        sometimes cancelled again at once (the running job must still not be retried)."""
        if not self._running_keys():
            self._claim_one()  # swarm testing may have disabled `claim` in this run
        keys = sorted(self._running_keys())
        if not keys:
            return multiple()
        spec = Spec(
            key=keys[pick % len(keys)],
            gen_offset=gen_offset,
            supersede_running=supersede_running,
            max_attempts=max_attempts,
        )
        job_id = self._enqueue(spec)
        if withdraw:
            self.cancel(job_id, newest_live=False)
        return job_id

    @rule(times=st.integers(1, 4))
    def claim(self, times: int) -> None:
        """Claim up to `times` jobs in a row (a dispatcher filling free worker slots)."""
        for _ in range(times):
            if self._claim_one() is None:
                return

    def _waiting_reasons(self) -> dict[str, str]:
        """What jobs.get.v1 would say of each QUEUED job now (one past its ttl is left
        out: it is about to become EXPIRED, which the dispatcher does at that moment)."""
        queued, _ = self.store.list(JobFilter(state=State.QUEUED), limit=LIST_LIMIT_MAX)
        reasons = {}
        for job in queued:
            expired = job.ttl_ms is not None and job.created_at + job.ttl_ms <= self.now
            if job.attempt == 0 and expired:
                continue
            facts = self.store.wait_facts(job, now=self.now, global_limit=GLOBAL_LIMIT)
            reasons[job.id] = domain.waiting_reason(job, facts, self.now)
        return reasons

    def _claim_one(self) -> Job | None:
        expected = self._expected_claim()
        running_keys_before = self._running_keys()
        reasons = self._waiting_reasons()
        job = self.store.claim_next_job(now=self.now, global_limit=GLOBAL_LIMIT, conditions=ALL_MET)
        assert (job.id if job else None) == expected
        # The waiting reason and the claim judge readiness alike (issue 5: never stale):
        # the job claimed was "ready", and when none is claimed, none is "ready".
        if job is not None:
            assert reasons[job.id].startswith("ready:"), reasons[job.id]
        else:
            ready = {i: r for i, r in reasons.items() if r.startswith("ready:")}
            assert not ready, ready
        if job is None:
            full = len(self._running_ids()) >= GLOBAL_LIMIT
            event("claim: global limit reached" if full else "claim: nothing ready")
            return None
        event("claim: keyed" if job.subject_key else "claim: keyless")
        assert job.state is State.RUNNING
        assert job.started_at == self.now
        assert job.finished_at is None
        key = (job.queue, job.job_type, job.subject_key)
        if job.subject_key is not None:
            # SPEC §3.2: only the newest generation of a key is ever claimed.
            assert job.generation == self.max_gen[key]
            # SPEC §3.3: a newer generation never starts while an older one runs.
            assert key not in running_keys_before
            started = self.started_gens.setdefault(key, [])
            assert not started or started[-1] <= job.generation, (started, job.generation)
            started.append(job.generation)
        return job

    @rule(
        pick=st.integers(0, 50),
        kind=st.sampled_from(["success", "retryable", "retryable", "permanent"]),
        retry_after_ms=st.one_of(st.none(), st.integers(0, 500)),
        seed=st.integers(0, 2**32 - 1),
    )
    def finish_running(self, pick: int, kind: str, retry_after_ms: int | None, seed: int) -> None:
        if not self._running_ids():
            self._claim_one()  # swarm testing may have disabled `claim` in this run
        running = self._running_ids()
        if not running:
            return
        job_id = running[pick % len(running)]
        before = self.store.get(job_id)
        key = (before.queue, before.job_type, before.subject_key)
        newer = before.subject_key is not None and (
            self.max_gen[key] > before.generation or bool(self._ids_in(State.QUEUED, key))
        )
        if kind == "success":
            outcome = Outcome(result_summary={"ok": True})
        elif kind == "retryable":
            outcome = Outcome(
                error_kind="exception", error_message="boom", retry_after_ms=retry_after_ms
            )
        else:
            outcome = Outcome(error_kind="exception", error_message="bad input", permanent=True)
        after = self.store.finish(job_id, outcome, now=self.now, rng=random.Random(seed))

        if kind == "success":
            expected = State.DONE
        elif newer:  # SPEC §3.4: never retried once a newer request exists
            expected = State.SUPERSEDED
        elif kind == "permanent" or before.attempt >= before.max_attempts:
            expected = State.FAILED
        else:
            expected = State.QUEUED
        assert after.state is expected, (kind, newer, before.attempt, before.max_attempts)
        event(f"finish: {kind} -> {expected}")
        assert after.attempt == before.attempt
        assert self.store.get(job_id).state is expected
        if expected is State.QUEUED:
            assert after.finished_at is None
            if retry_after_ms is not None:
                assert after.run_after == self.now + retry_after_ms
            else:
                nominal = BACKOFF_BASE_MS * BACKOFF_FACTOR ** (before.attempt - 1)
                low = self.now + nominal * (1 - JITTER) - 1
                high = self.now + nominal * (1 + JITTER) + 1
                assert low <= after.run_after <= high
        else:
            assert after.finished_at == self.now
        if expected is State.DONE and before.subject_key is not None:
            # Results land in generation order per key.
            done = self.done_gens.setdefault(key, [])
            assert not done or done[-1] <= before.generation, (done, before.generation)
            done.append(before.generation)

    @precondition(lambda self: bool(self.final))
    @rule(
        pick=st.integers(0, 50),
        kind=st.sampled_from(["success", "retryable", "permanent"]),
        seed=st.integers(0, 2**32 - 1),
    )
    def finish_after_end(self, pick: int, kind: str, seed: int) -> None:
        """A runner's report arriving after its job was cancelled or superseded is dropped."""
        ended = sorted(self.final)
        job_id = ended[pick % len(ended)]
        outcome = (
            Outcome()
            if kind == "success"
            else Outcome(error_kind="exception", permanent=kind == "permanent")
        )
        after = self.store.finish(job_id, outcome, now=self.now, rng=random.Random(seed))
        assert (after.state, after.finished_at) == self.final[job_id]
        event(f"finish after end: {after.state}")

    @rule(job_id=jobs, newest_live=st.booleans())
    def cancel(self, job_id: str, newest_live: bool) -> None:
        """Cancel any job by id, or (`newest_live`) the newest QUEUED or RUNNING one: often
        the newer request of a running key, which SPEC §3.4 then has to cope with."""
        live = self._live_ids()
        if newest_live and live:
            job_id = live[0]
        before = self.store.get(job_id)
        event(f"cancel: {before.state}")
        if before.is_terminal:
            with pytest.raises(IllegalTransition):
                self.store.cancel(job_id=job_id, now=self.now)
            after = self.store.get(job_id)
            assert (after.state, after.finished_at) == (before.state, before.finished_at)
            return
        res = self.store.cancel(job_id=job_id, now=self.now)
        assert res.cancelled == [job_id]
        assert res.was_running == ([job_id] if before.state is State.RUNNING else [])
        after = self.store.get(job_id)
        assert after.state is State.CANCELLED
        assert after.finished_at == self.now

    @rule(ms=st.one_of(st.none(), st.integers(1, 2000)))
    def advance_time(self, ms: int | None) -> None:
        """Move the clock on by `ms`, or (None) exactly to the next run_after or ttl expiry."""
        if ms is not None:
            self.now += ms
            return
        due = [
            t
            for _, _, _, _, _, _, _, run_after, created, ttl in self._sql(SQL_QUEUED)
            for t in (run_after, None if ttl is None else created + ttl)
            if t is not None and t > self.now
        ]
        if due:
            self.now = min(due)

    @rule()
    def expire_overdue(self) -> None:
        expected = sorted(
            id_
            for _, id_, _, _, _, _, _, _, created, ttl in self._sql(SQL_QUEUED)
            if ttl is not None and created + ttl <= self.now
        )
        assert sorted(self.store.expire_overdue(now=self.now)) == expected
        event(f"expire: {'some' if expected else 'none'}")
        for id_ in expected:
            job = self.store.get(id_)
            assert (job.state, job.finished_at) == (State.EXPIRED, self.now)

    # ------------------------------------------------------------------ invariants

    @invariant()
    def at_most_one_queued_and_one_running_per_key(self) -> None:
        dupes = self._sql(
            "SELECT queue, job_type, subject_key, state, count(*) FROM jobs "
            "WHERE subject_key IS NOT NULL AND state IN ('QUEUED', 'RUNNING') "
            "GROUP BY queue, job_type, subject_key, state HAVING count(*) > 1"
        )
        assert dupes == []

    @invariant()
    def global_limit_respected(self) -> None:
        assert self.store.count_running() <= GLOBAL_LIMIT

    @invariant()
    def terminal_states_never_change(self) -> None:
        for id_, state, finished_at in self._sql("SELECT id, state, finished_at FROM jobs"):
            state = State(state)
            if id_ in self.final:
                assert (state, finished_at) == self.final[id_], id_
            elif state in TERMINAL_STATES:
                assert finished_at is not None
                self.final[id_] = (state, finished_at)
            else:
                assert finished_at is None

    @invariant()
    def every_acknowledged_enqueue_is_retrievable(self) -> None:
        # store.get() on every job each step would dominate the runtime: each job is read
        # with get() once after its enqueue (in `_acknowledge`), and with list() every step.
        jobs, cursor = self.store.list(limit=LIST_LIMIT_MAX)
        assert cursor is None, "more jobs than this test expects"
        stored = {j.id: ((j.queue, j.job_type, j.subject_key), j.generation) for j in jobs}
        assert stored == self.acked

    @invariant()
    def latest_generation_matches_model(self) -> None:
        stored = {
            (q, t, s): g
            for q, t, s, g in self._sql(
                "SELECT queue, job_type, subject_key, latest_generation FROM subjects"
            )
        }
        assert stored == self.max_gen

    @invariant()
    def queued_jobs_are_the_newest_generation(self) -> None:
        """A QUEUED job older than its key's latest could never be claimed: it would hang.

        This also makes the claim's own `generation = latest` test a second line of
        defence: while this holds, dropping it from the claim changes nothing.
        """
        for _, id_, _, queue, job_type, subject, gen, *_ in self._sql(SQL_QUEUED):
            if subject is not None:
                assert gen == self.max_gen[(queue, job_type, subject)], id_


StoreMachine.TestCase.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
TestStoreStateMachine = StoreMachine.TestCase


def _superseded_within(results: list[EnqueueResult]) -> frozenset[str]:
    """Jobs of one batch that a later job of the same batch superseded."""
    batch = {r.job.id for r in results}
    return frozenset(old for r in results for old in r.superseded_ids if old in batch)
