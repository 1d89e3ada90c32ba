"""`semantica-cli` as a person and an agent use it: a real subprocess against a real
daemon; human output, `--json`, exit codes (0 ok, 1 failed, 2 usage, 3 not running)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import make_home, remove_home, start_daemon

from semantica.cli import parse_when

CLI = str(Path(sys.executable).with_name("semantica-cli"))


def cli(
    home: Path, *args: str, input: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMANTICA_")}
    env.update(SEMANTICA_HOME=str(home), COLUMNS="200")
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, env=env, input=input, timeout=timeout
    )


def ok(home: Path, *args: str) -> str:
    done = cli(home, *args)
    assert done.returncode == 0, (args, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr
    return done.stdout


def doc(home: Path, *args: str):
    return json.loads(ok(home, *args, "--json"))


@pytest.fixture(scope="module")
def daemon():
    d = start_daemon(SEMANTICA_WORKERS="4")
    yield d
    d.stop()
    remove_home(d.home)


@pytest.fixture
def home(daemon) -> Path:
    return daemon.home


def test_enqueue_quiet_prints_only_the_id_and_wait_exits_0_when_done(home):
    job_id = ok(home, "enqueue", "noop", "-q").strip()
    assert len(job_id) == 36 and "\n" not in job_id
    assert "DONE" in ok(home, "wait", job_id)
    assert doc(home, "show", job_id)["state"] == "DONE"


def test_enqueue_takes_every_field_as_a_flag(home, tmp_path):
    payload = tmp_path / "payload.json"
    payload.write_text('{"seconds": 0.01}')
    first = doc(home, "enqueue", "noop", "--tag", "flags")
    job = doc(
        home, "enqueue", "sleep", "--payload", f"@{payload}", "--subject", "s1",
        "--queue", "cli-flags", "--priority", "5", "--max-attempts", "2",
        "--backoff-base-ms", "50", "--backoff-factor", "1.5", "--deadline-ms", "5000",
        "--ttl-ms", "60000", "--schedule-at", "+50ms", "--depends-on", first["id"],
        "--tag", "flags", "--parent", first["id"], "--chain", "c-flags",
        "--env", "LANG=C.UTF-8", "--supersede-running",
    )  # fmt: skip
    assert job["payload"] == {"seconds": 0.01} and job["subject_key"] == "s1"
    assert (job["queue"], job["priority"], job["max_attempts"]) == ("cli-flags", 5, 2)
    assert (job["backoff_base_ms"], job["backoff_factor"]) == (50, 1.5)
    assert (job["deadline_ms"], job["ttl_ms"]) == (5000, 60000)
    assert job["depends_on"] == [first["id"]] and job["parent_job_id"] == first["id"]
    assert (job["user_tag"], job["chain_group_id"]) == ("flags", "c-flags")
    assert job["env"] == {"LANG": "C.UTF-8"} and job["schedule_at"] > job["created_at"]
    assert doc(home, "wait", job["id"])["state"] == "DONE"


def test_list_show_and_status_for_people_and_programs(home):
    job_id = ok(home, "enqueue", "noop", "-q", "--subject", "listed.py").strip()
    ok(home, "wait", job_id)
    table = ok(home, "list", "--subject", "listed.py")
    assert job_id in table and "DONE" in table and "STATE" in table
    assert ok(home, "ls", "--subject", "listed.py") == table or job_id in ok(home, "ls")
    page = doc(home, "list", "--subject", "listed.py")
    assert [j["id"] for j in page["jobs"]] == [job_id]
    panel = ok(home, "show", job_id)
    assert job_id in panel and "attempts" in panel and '"ok": true' in panel
    status = doc(home, "status")
    assert status["daemon_running"] and status["jobs_by_state"]["DONE"] >= 1
    assert "DONE" in ok(home, "status")


def test_wait_exits_1_when_the_job_fails_and_logs_show_why(home):
    job_id = ok(home, "enqueue", "fail", "-q", "--payload", '{"mode": "permanent"}').strip()
    waited = cli(home, "wait", job_id)
    assert waited.returncode == 1 and "FAILED" in waited.stdout
    assert "permanent failure" in ok(home, "logs", job_id, "-n", "20")
    chunk = doc(home, "logs", job_id)
    assert chunk["eof"] and any("PermanentError" in line for line in chunk["lines"])
    again = doc(home, "retry", job_id)
    assert again["parent_job_id"] == job_id


def test_wait_timeout_exits_1_while_the_job_still_runs(home):
    job_id = ok(home, "enqueue", "sleep", "-q", "--payload", '{"seconds": 5}').strip()
    waited = cli(home, "wait", job_id, "--timeout", "0.3", "--json")
    assert waited.returncode == 1
    assert json.loads(waited.stdout)["state"] in ("QUEUED", "RUNNING")
    ok(home, "cancel", job_id)


def test_logs_follow_streams_json_lines_until_the_job_ends(home):
    script = "for i in 1 2 3; do echo tick $i; sleep 0.2; done"
    job_id = ok(home, "enqueue", "shell", "-q", "-p", json.dumps({"argv": ["sh", "-c", script]}))
    lines = [json.loads(x) for x in ok(home, "logs", job_id.strip(), "-f", "--json").splitlines()]
    assert {"job_id": job_id.strip(), "line": "tick 3"} in lines
    assert [x["line"] for x in lines if x["line"].startswith("tick")] == [
        "tick 1",
        "tick 2",
        "tick 3",
    ]


def test_cancel_by_tag_and_exactly_one_target(home):
    ok(home, "pause", "cli-cancel")
    for _ in range(2):
        ok(home, "enqueue", "noop", "-q", "--queue", "cli-cancel", "--tag", "cli-t")
    assert len(doc(home, "cancel", "--tag", "cli-t")["cancelled"]) == 2
    assert "cancelled 0 job(s)" in ok(home, "cancel", "--tag", "cli-t")
    for args in ((), ("x", "--tag", "t")):
        refused = cli(home, "cancel", *args)
        assert refused.returncode == 2 and "exactly one" in refused.stderr


def test_queues_pause_resume_and_runners(home):
    assert doc(home, "pause", "cli-q")["paused"] is True
    assert "cli-q" in ok(home, "queues") and "paused" in ok(home, "queues")
    assert any(q["name"] == "cli-q" for q in doc(home, "queues")["queues"])
    assert "resumed" in ok(home, "resume", "cli-q")
    assert "index_file" in ok(home, "runners")
    assert {"noop", "shell"} <= {r["name"] for r in doc(home, "runners")["runners"]}


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (("enqueue", "noop", "--payload", "{oops"), 2, "--payload is not JSON"),
        (("enqueue", "noop", "--payload", "[1]"), 2, "must be a JSON object"),
        (("enqueue", "noop", "--payload", "@/nonexistent.json"), 2, "cannot read it"),
        (("enqueue", "noop", "--env", "NOEQUALS"), 2, "NAME=VALUE"),
        (("enqueue", "noop", "--schedule-at", "tomorrowish"), 2, "ISO 8601"),
        (("enqueue", "no_such_type"), 1, "installed:"),
        (("enqueue", "noop", "--max-attempts", "0"), 1, "max_attempts"),
        (("list", "--state", "NOPE"), 2, "use one of"),
        (("show", "no-such-id"), 1, "no job"),
        (("enqueue",), 2, "Missing argument"),
    ],
)
def test_bad_input_is_one_clear_line_with_the_right_exit_code(home, args, code, says):
    done = cli(home, *args)
    assert done.returncode == code, (done.stdout, done.stderr)
    assert says in done.stderr and "Traceback" not in done.stderr


def test_errors_in_json_mode_are_a_json_document(home):
    done = cli(home, "show", "no-such-id", "--json")
    assert done.returncode == 1 and done.stdout == ""
    assert json.loads(done.stderr)["error"]["code"] == 4004


def test_parse_when_accepts_epoch_relative_and_iso():
    assert parse_when("1700000000000", 0) == 1700000000000
    assert parse_when("+30s", 1000) == 31_000
    assert parse_when("5m", 0) == 300_000
    assert parse_when("2026-12-01T09:00:00+00:00", 0) == 1796115600000


def test_with_the_daemon_down_reads_still_work_and_writes_exit_3():
    daemon = start_daemon()
    home = daemon.home
    try:
        job_id = ok(home, "enqueue", "shell", "-q", "-p", '{"argv": ["echo", "kept"]}').strip()
        ok(home, "wait", job_id)
        ok(home, "shutdown")
        assert daemon.proc.wait(timeout=20) == 0
        for args in (("enqueue", "noop"), ("cancel", job_id), ("queues",), ("pause", "q")):
            down = cli(home, *args)
            assert down.returncode == 3, args
            assert "daemon is not running" in down.stderr and "semantica" in down.stderr
            assert len(down.stderr.strip().splitlines()) == 1
        listed = cli(home, "list")
        assert listed.returncode == 0 and job_id in listed.stdout
        assert "not running: showing the data" in listed.stderr
        assert doc(home, "show", job_id)["state"] == "DONE"
        assert "kept" in ok(home, "logs", job_id)
        assert doc(home, "status")["daemon_running"] is False
    finally:
        daemon.stop()
        remove_home(home)


def test_with_no_daemon_ever_started_every_command_exits_3():
    home = make_home()
    try:
        for args in (("list",), ("status",), ("enqueue", "noop")):
            done = cli(home, *args)
            assert done.returncode == 3 and "not running" in done.stderr, args
    finally:
        remove_home(home)


def test_maintenance_and_backup_commands(home, tmp_path):
    report = doc(home, "maintenance")
    assert {"jobs_deleted", "vacuum", "db_bytes_before", "db_bytes_after"} <= report.keys()
    assert "removed" in ok(home, "maintenance") and "MiB" in ok(home, "maintenance")
    copy = tmp_path / "copy.db"
    backup = doc(home, "backup", str(copy))
    assert backup["path"] == str(copy) and copy.stat().st_size == backup["bytes"] > 0
    again = cli(home, "backup", str(copy))
    assert again.returncode == 1 and "exists already" in again.stderr
