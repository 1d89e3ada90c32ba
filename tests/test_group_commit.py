"""Durable acknowledgements (issue 3 point 4): concurrent enqueues share one commit and
one fsync, and none is answered before that fsync has returned."""

from __future__ import annotations

import trio

from semantica import protocol as p
from semantica.api import GroupCommitter
from semantica.domain import EnqueueRequest, ValidationError
from semantica.store import EnqueueGroup, StorageUnavailable, Store

NOW = 1_000_000


def committer_for(store: Store, durable) -> GroupCommitter:
    return GroupCommitter(store, lambda: NOW, p.Counters(), durable=durable)


def one_job(**fields) -> EnqueueGroup:
    fields.setdefault("job_type", "noop")
    return EnqueueGroup([EnqueueRequest(**fields)], batch=False)


async def test_concurrent_enqueues_are_answered_once_their_shared_commit_is_synced(tmp_path):
    store = Store.open(tmp_path / "a.db", group_sync=True)
    synced: list[int] = []  # the commits each fsync covered, as it returned
    answers: list[list[int]] = []  # what had been synced when each enqueue was answered

    async def durable() -> None:
        covers = store.commits
        await trio.sleep(0.05)  # a slow disk: the handlers must still be waiting
        synced.append(covers)

    committer = committer_for(store, durable)

    async def enqueue(n: int) -> None:
        [result] = await committer.submit(one_job(queue=f"q{n}"))
        assert result.job.queue == f"q{n}"
        answers.append(list(synced))

    async with trio.open_nursery() as nursery:
        for n in range(5):
            nursery.start_soon(enqueue, n)
    assert store.commits == 1  # one transaction for the five
    assert synced == [1]  # and one fsync, covering it
    assert answers == [[1]] * 5  # nobody answered before it
    store.close()


async def test_a_refused_sync_is_every_waiting_enqueues_error(tmp_path):
    store = Store.open(tmp_path / "a.db", group_sync=True)

    async def refuse() -> None:
        raise StorageUnavailable("the database cannot be synced to disk (EIO)")

    committer = committer_for(store, refuse)
    errors: list[Exception] = []

    async def enqueue(group: EnqueueGroup) -> None:
        try:
            await committer.submit(group)
        except (StorageUnavailable, ValidationError) as exc:
            errors.append(exc)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(enqueue, one_job())
        nursery.start_soon(enqueue, one_job(priority="high"))  # refused on its own
        nursery.start_soon(enqueue, one_job())
    kinds = sorted(type(e).__name__ for e in errors)
    assert kinds == ["StorageUnavailable", "StorageUnavailable", "ValidationError"]
    store.close()


async def test_nothing_stored_means_no_sync(tmp_path):
    store = Store.open(tmp_path / "a.db", group_sync=True)
    calls = []

    async def durable() -> None:
        calls.append(store.commits)

    committer = committer_for(store, durable)
    try:
        await committer.submit(one_job(job_type=""))
    except ValidationError:
        pass
    else:
        raise AssertionError("an empty job_type must be refused")
    assert calls == []
    store.close()


async def test_enqueues_arriving_during_a_sync_are_committed_and_answered(tmp_path):
    store = Store.open(tmp_path / "a.db", group_sync=True)
    syncing = trio.Event()
    synced_ids: set[str] = set()  # jobs committed before a sync that has returned

    async def durable() -> None:
        syncing.set()
        committed = {job.id for job in store.list()[0]}
        await trio.sleep(0.05)
        synced_ids.update(committed)

    committer = committer_for(store, durable)
    answered: list[str] = []

    async def enqueue(name: str) -> None:
        [result] = await committer.submit(one_job(queue=name))
        assert result.job.id in synced_ids, f"{name} was answered before its sync"
        answered.append(name)

    with trio.fail_after(5):  # a request left without a leader would hang here
        async with trio.open_nursery() as nursery:
            nursery.start_soon(enqueue, "first")
            await syncing.wait()  # the first commit's sync is going on
            nursery.start_soon(enqueue, "during")
            nursery.start_soon(enqueue, "during-too")
    assert sorted(answered) == ["during", "during-too", "first"]
    assert store.commits == 2
    store.close()


async def test_a_failing_announcement_after_the_commit_still_answers_every_enqueue(tmp_path):
    """What runs after the commit (waking the dispatcher, the waiters) may fail: the
    jobs are stored, so every request in the batch is answered with its job."""
    store = Store.open(tmp_path / "a.db", group_sync=True)

    async def durable() -> None:
        pass

    committer = committer_for(store, durable)

    def announce(results) -> None:
        raise OSError("disk I/O error while reading the queue")

    committer.on_committed = announce
    answered: list[str] = []

    async def enqueue(n: int) -> None:
        [result] = await committer.submit(one_job(queue=f"q{n}"))
        answered.append(result.job.queue)

    with trio.fail_after(5):  # a follower left unwoken would hang here
        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(enqueue, n)
    assert sorted(answered) == ["q0", "q1", "q2"]
    assert len(store.list()[0]) == 3
    store.close()


async def test_a_slow_disks_fsync_leaves_the_loop_while_any_other_client_is_connected(tmp_path):
    """Once an fsync has been slow, the next run in a worker thread if any other
    connection is open (idle or not: its next request is served meanwhile), on the
    loop for a lone client; loop turns for others to join are taken only for
    clients that could (`may_have_company`)."""
    import threading

    from semantica.durability import WalSync

    store = Store.open(tmp_path / "a.db", group_sync=True)
    threads: list[bool] = []  # whether each fsync ran on the loop's thread
    real_sync = store.sync_wal
    loop_thread = threading.get_ident()

    def sync_wal() -> None:
        threads.append(threading.get_ident() == loop_thread)
        real_sync()

    store.sync_wal = sync_wal
    wal = WalSync(store)
    wal.may_have_company = lambda: False
    for others in (True, False):
        wal.others_connected = lambda others=others: others
        wal._inline = False  # the last fsync was slow
        store.enqueue(EnqueueRequest(job_type="noop"), now=NOW)
        await wal.durable()
    assert threads == [False, True]
    store.close()
