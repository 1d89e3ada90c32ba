"""A full disk: writes fail with 5003 and say what to do, reads keep working, nothing
is corrupted, and service resumes by itself once space returns (SPEC §8, §10).

`SEMANTICA_HOME` lives on a small tmpfs mounted for the test, so the disk really fills.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
from pathlib import Path

import pytest
from harness import start_daemon

from semantica.domain import State
from semantica.errors import StorageUnavailable

TMPFS_SIZE = "12m"


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
            assert "disk holding the database is full" in str(refused)
            assert "free space there" in str(refused)

            # Reads keep working, and the job written before is intact.
            assert c.get(before.id).state is State.QUEUED
            assert c.stats() is not None
            assert daemon.proc.poll() is None, "the daemon must not die on a full disk"

            filler.unlink()
            again = c.enqueue(job_type="noop", subject_key="after")
            c.resume("default")
            assert c.wait(again.id, timeout_ms=20_000).state is State.DONE
            assert c.wait(before.id, timeout_ms=20_000).state is State.DONE
            health = c.health(integrity_check=True)
            assert health.ok and health.check == "integrity_check" and health.problems == []
    finally:
        daemon.stop()
