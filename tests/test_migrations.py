"""Schema migrations by PRAGMA user_version, and the daemon's --init on a real home."""

from __future__ import annotations

import os
import stat
import subprocess
import sys

import apsw
import pytest

from semantica.domain import EnqueueRequest
from semantica.store import MigrationFailed, SchemaTooNew, Store, latest_schema_version, migrate


def tables(db: apsw.Connection) -> set[str]:
    return {
        r[0] for r in db.execute("SELECT name FROM sqlite_schema WHERE name NOT LIKE 'sqlite_%'")
    }


def test_migrate_up_down_and_up_again(tmp_path):
    db = apsw.Connection(str(tmp_path / "m.db"))
    latest = latest_schema_version()
    assert migrate(db) == (0, latest)
    assert {"jobs", "queues", "subjects", "job_deps"} <= tables(db)
    assert migrate(db, 0) == (latest, 0)
    assert tables(db) == set()
    assert migrate(db) == (0, latest)
    assert db.execute("PRAGMA user_version").fetchall()[0][0] == latest
    db.close()


def test_migrate_is_a_no_op_when_current(tmp_path):
    db = apsw.Connection(str(tmp_path / "m.db"))
    migrate(db)
    assert migrate(db) == (latest_schema_version(),) * 2
    db.close()


def test_a_database_newer_than_the_code_is_refused_untouched(tmp_path):
    path = tmp_path / "future.db"
    db = apsw.Connection(str(path))
    db.execute(f"PRAGMA user_version = {latest_schema_version() + 1}")
    db.close()
    with pytest.raises(SchemaTooNew, match="upgrade Semantica"):
        Store.open(path)
    db = apsw.Connection(str(path))
    assert tables(db) == set()
    db.close()


def test_a_failing_migration_leaves_the_old_version(tmp_path):
    db = apsw.Connection(str(tmp_path / "m.db"))
    db.execute("CREATE TABLE jobs (x)")  # collides with the first migration
    with pytest.raises(MigrationFailed, match=r"from schema version 0 to .* still version 0"):
        migrate(db)
    assert db.execute("PRAGMA user_version").fetchall()[0][0] == 0
    assert tables(db) == {"jobs"}
    db.close()


def test_unknown_target_version_is_refused(tmp_path):
    db = apsw.Connection(str(tmp_path / "m.db"))
    with pytest.raises(ValueError, match="does not exist"):
        migrate(db, latest_schema_version() + 5)
    db.close()


def run_semantica(*args, home):
    env = {**os.environ, "SEMANTICA_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "semantica.daemon", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_init_creates_a_private_home_and_database(tmp_path):
    home = tmp_path / "home"
    proc = run_semantica("--init", home=home)
    assert proc.returncode == 0, proc.stderr
    assert f"created {home} (mode 0700)" in proc.stdout
    assert "at schema version" in proc.stdout
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "meta.db").stat().st_mode) == 0o600
    store = Store.open(home / "meta.db")
    store.enqueue(EnqueueRequest(job_type="noop"), now=1)
    store.close()
    again = run_semantica("--init", home=home)
    assert again.returncode == 0 and "created" not in again.stdout


def test_bad_configuration_is_one_clear_line(tmp_path):
    proc = run_semantica("--init", "--rpc-port", "99999", home=tmp_path / "h")
    assert proc.returncode == 2
    assert "SEMANTICA_RPC_PORT=99999 is out of range" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_runner_start_times_become_integer_milliseconds(tmp_path):
    db = apsw.Connection(str(tmp_path / "m.db"))
    migrate(db, 5)
    store = Store(db, str(tmp_path / "m.db"))
    # A running job, and jobs cancelled and superseded while running: terminal ones
    # keep their runner's start time, and the trigger keeping them final must not
    # stop the migration.
    starts = {"RUNNING": 1_764_600_000.123, "CANCELLED": 1_764_600_001.5, "SUPERSEDED": 2.25}
    for state, start in starts.items():
        job = store.enqueue(EnqueueRequest(job_type="noop"), now=1_000).job
        db.execute(
            "UPDATE jobs SET state = ?, runner_pid = 42, runner_start_time = ?, "
            "started_at = 1000, finished_at = CASE WHEN ? = 'RUNNING' THEN NULL ELSE 2000 END "
            "WHERE id = ?",
            (state, start, state, job.id),
        )
    migrate(db)
    rows = db.execute(
        "SELECT state, runner_start_time, typeof(runner_start_time) FROM jobs ORDER BY seq"
    ).fetchall()
    assert rows == [
        ("RUNNING", 1_764_600_000_123, "integer"),
        ("CANCELLED", 1_764_600_001_500, "integer"),
        ("SUPERSEDED", 2_250, "integer"),
    ]
    with pytest.raises(apsw.ConstraintError, match="terminal state"):  # final again
        db.execute("UPDATE jobs SET priority = 1 WHERE state = 'CANCELLED'")
    migrate(db, 5)  # and back: REAL seconds again
    back = db.execute("SELECT runner_start_time FROM jobs ORDER BY seq").fetchall()
    assert back == [(start,) for start in starts.values()]
    db.close()
