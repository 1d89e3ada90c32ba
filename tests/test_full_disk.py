"""A full disk or a read-only database: writes fail with 5003 and say what to do,
reads keep working, nothing is corrupted, and service resumes by itself once the cause
is gone (SPEC §8, §10).

`SEMANTICA_HOME` lives on a small filesystem mounted for the test, so the disk really
fills, and the database file really turns read-only under the running daemon.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from harness import start_daemon

from semantica import protocol as p
from semantica.domain import State
from semantica.errors import StorageUnavailable

TMPFS_SIZE = "12m"
EXT4_SIZE = 32 * 2**20


@pytest.fixture
def small_disk():
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount_point = Path(tempfile.mkdtemp(prefix="sem-disk-"))
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE},mode=0700", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if mounted.returncode != 0:
        mount_point.rmdir()
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        with contextlib.suppress(OSError):
            mount_point.rmdir()


def fill(path: Path) -> None:
    """Write zeros to `path` until the filesystem has no space left."""
    block = b"\0" * (64 * 1024)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(block)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 512)


@pytest.fixture
def small_ext4():
    """A 32 MiB ext4 filesystem on a loop device: unlike tmpfs, ext4 enforces the
    immutable attribute on descriptors already open, for root too."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop filesystem and chattr +i need root")
    for tool in ("mkfs.ext4", "chattr", "mount", "umount"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed")
    base = Path(tempfile.mkdtemp(prefix="sem-ro-"))
    image, mount_point = base / "fs.img", base / "mnt"
    mount_point.mkdir()
    with open(image, "wb") as f:
        f.truncate(EXT4_SIZE)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    mounted = made.returncode == 0 and subprocess.run(
        ["mount", "-o", "loop", str(image), str(mount_point)], capture_output=True, text=True
    )
    if not mounted or mounted.returncode != 0:
        shutil.rmtree(base, ignore_errors=True)
        reason = (mounted.stderr if mounted else made.stderr).strip()
        pytest.skip(f"cannot make and loop-mount an ext4 filesystem here: {reason}")
    try:
        yield mount_point
    finally:
        subprocess.run(["chattr", "-R", "-i", str(mount_point)], capture_output=True)
        subprocess.run(["umount", "-l", str(mount_point)], check=False)
        shutil.rmtree(base, ignore_errors=True)


def assert_refused_with_5003(exc: StorageUnavailable, *says: str) -> None:
    assert exc.code == p.STORAGE_UNAVAILABLE == 5003
    assert str(exc.message).startswith("storage unavailable: "), exc.message
    for words in says:
        assert words in exc.message, exc.message
    assert exc.data == {"retry": "after the cause is fixed; reads still work"}


def assert_service_resumed(client, before) -> None:
    """Without a restart: a new write is taken, the held queue runs both jobs, and the
    whole database passes integrity_check."""
    again = client.enqueue(job_type="noop", subject_key="after")
    client.resume("default")
    assert client.wait(again.id, timeout_ms=20_000).state is State.DONE
    assert client.wait(before.id, timeout_ms=20_000).state is State.DONE
    health = client.health(integrity_check=True)
    assert health.ok and health.check == "integrity_check" and health.problems == []


def enqueue_until_refused(client) -> StorageUnavailable:
    big = {"blob": "x" * 200_000}
    for _ in range(200):  # the WAL may still have a few free pages to write into
        try:
            client.enqueue(job_type="noop", payload=big)
        except StorageUnavailable as exc:
            return exc
    pytest.fail("200 enqueues of 200 kB each fit on a full 12 MB disk")


def test_a_full_disk_refuses_writes_keeps_reads_and_recovers(small_disk):
    home = small_disk / "home"
    daemon = start_daemon(home, hold_queues=("default",))
    try:
        with daemon.client() as c:
            before = c.enqueue(job_type="noop", subject_key="kept")
            filler = small_disk / "filler"
            fill(filler)
            refused = enqueue_until_refused(c)
            assert_refused_with_5003(
                refused, "disk holding the database is full", "free space there"
            )

            # Reads keep working, and the job written before is intact.
            assert c.get(before.id).state is State.QUEUED
            assert c.stats() is not None
            assert daemon.proc.poll() is None, "the daemon must not die on a full disk"

            filler.unlink()
            assert_service_resumed(c, before)
    finally:
        daemon.stop()


def test_a_database_turned_read_only_refuses_writes_keeps_reads_and_recovers(small_ext4):
    """The database file and its WAL become read-only while the daemon runs.

    Not with `mount -o remount,ro`: the kernel refuses that while the daemon holds
    its files open for writing ("mount point is busy"), and an ext4 error remount
    (`emergency_ro`) cannot be undone without unmounting. Not with chmod either: root
    ignores file modes. `chattr +i` makes ext4 refuse every write to the file (EPERM),
    through descriptors already open and for root, and `chattr -i` gives it back.
    """
    home = small_ext4 / "home"
    daemon = start_daemon(home, hold_queues=("default",))
    db = home / "meta.db"
    try:
        with daemon.client() as c:
            before = c.enqueue(job_type="noop", subject_key="kept")
            assert Path(f"{db}-wal").exists()
            subprocess.run(["chattr", "+i", str(db), f"{db}-wal"], check=True)
            with pytest.raises(PermissionError):  # really read-only, for root too
                os.open(f"{db}-wal", os.O_WRONLY)

            with pytest.raises(StorageUnavailable) as refused:
                c.enqueue(job_type="noop", subject_key="refused")
            assert_refused_with_5003(refused.value, "read-only", "check its permissions")
            with pytest.raises(StorageUnavailable) as refused_cancel:
                c.cancel(before.id)
            assert refused_cancel.value.code == 5003

            # Reads keep working, and nothing refused was half-written.
            assert c.get(before.id).state is State.QUEUED
            assert [j.subject_key for j in c.list().jobs] == ["kept"]
            assert c.stats().jobs_by_state["QUEUED"] == 1
            health = c.health()
            assert health.ok and health.problems == []
            assert daemon.proc.poll() is None, "the daemon must not die on a read-only file"

            subprocess.run(["chattr", "-i", str(db), f"{db}-wal"], check=True)
            assert_service_resumed(c, before)
    finally:
        subprocess.run(["chattr", "-i", str(db), f"{db}-wal"], capture_output=True)
        daemon.stop()


def test_a_job_ending_on_a_full_disk_is_recorded_once_space_returns(small_disk):
    """The outcome the store cannot take is kept and retried with a growing pause:
    the dispatcher neither spins nor dies meanwhile (a regression: a passed retry time
    left at the head of its timer heap made every wait zero)."""
    import time

    home = small_disk / "home"
    daemon = start_daemon(home)
    try:
        with daemon.client() as c:
            job = c.enqueue(job_type="sleep", payload={"seconds": 0.4})
            deadline = time.monotonic() + 10
            while c.get(job.id).state is not State.RUNNING and time.monotonic() < deadline:
                time.sleep(0.02)
            filler = small_disk / "filler"
            fill(filler)
            time.sleep(0.6)  # the job ends now; recording its end fails
            before = c.stats().dispatcher_wakeups_total
            time.sleep(2.0)
            woke = c.stats().dispatcher_wakeups_total - before
            assert woke < 10, f"the dispatcher woke {woke} times in 2 s: it spins"
            assert daemon.proc.poll() is None, "the daemon must not die on a full disk"
            assert c.get(job.id).state is State.RUNNING  # not recorded yet
            filler.unlink()
            assert c.wait(job.id, timeout_ms=20_000).state is State.DONE
    finally:
        daemon.stop()
