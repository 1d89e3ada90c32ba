"""`semantica-cli` as a person and an agent use it: a real subprocess against a real
daemon; human output, `--json`, exit codes (0 ok, 1 failed, 2 usage, 3 not running)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from harness import make_home, remove_home, start_daemon

from semantica.cli import parse_when
from semantica.domain import State

CLI = str(Path(sys.executable).with_name("semantica-cli"))
JOB_ID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"


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


def test_enqueue_for_people_says_the_id_and_state(home):
    ok(home, "pause", "cli-human")
    said = ok(home, "enqueue", "noop", "--queue", "cli-human").strip()
    found = re.fullmatch(rf"enqueued ({JOB_ID}) QUEUED", said)
    assert found, said
    assert doc(home, "show", found.group(1))["queue"] == "cli-human"
    ok(home, "cancel", found.group(1))


def test_pause_for_people_says_the_queue_is_paused(home):
    assert ok(home, "pause", "cli-p").strip() == "queue cli-p paused"
    assert {q["name"]: q["paused"] for q in doc(home, "queues")["queues"]}["cli-p"] is True
    assert ok(home, "resume", "cli-p").strip() == "queue cli-p resumed"
    assert {q["name"]: q["paused"] for q in doc(home, "queues")["queues"]}["cli-p"] is False


def test_retry_for_people_names_the_new_job(home):
    failed = ok(home, "enqueue", "fail", "-q", "--max-attempts", "1", "-p", '{"mode": "permanent"}')
    assert cli(home, "wait", failed.strip()).returncode == 1
    said = ok(home, "retry", failed.strip()).strip()
    found = re.fullmatch(rf"retrying as ({JOB_ID})", said)
    assert found and found.group(1) != failed.strip(), said
    assert doc(home, "show", found.group(1))["parent_job_id"] == failed.strip()


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


def test_logs_follow_for_people_prints_the_lines_until_the_job_ends(home):
    script = "for i in 1 2 3; do echo tock $i; sleep 0.1; done"
    job_id = ok(home, "enqueue", "shell", "-q", "-p", json.dumps({"argv": ["sh", "-c", script]}))
    followed = ok(home, "logs", job_id.strip(), "--follow").splitlines()
    assert [line for line in followed if line.startswith("tock")] == ["tock 1", "tock 2", "tock 3"]
    assert doc(home, "show", job_id.strip())["state"] == "DONE"  # it returned at the end


def test_cancel_by_tag_and_exactly_one_target(home):
    ok(home, "pause", "cli-cancel")
    for _ in range(2):
        ok(home, "enqueue", "noop", "-q", "--queue", "cli-cancel", "--tag", "cli-t")
    assert len(doc(home, "cancel", "--tag", "cli-t")["cancelled"]) == 2
    assert "cancelled 0 job(s)" in ok(home, "cancel", "--tag", "cli-t")
    for args in ((), ("x", "--tag", "t")):
        refused = cli(home, "cancel", *args)
        assert refused.returncode == 2 and "exactly one" in refused.stderr


def test_cancel_one_job_with_json(daemon):
    with daemon.client() as c:
        c.pause("cli-cancel-one")
        job_id = c.enqueue(job_type="noop", queue="cli-cancel-one").id
        cancelled = doc(daemon.home, "cancel", job_id)
        assert cancelled == {"cancelled": [job_id], "dependents_cancelled": []}
        assert c.get(job_id).state is State.CANCELLED
    again = cli(daemon.home, "cancel", job_id, "--json")  # a finished job stays as it is
    assert again.returncode == 1 and json.loads(again.stderr)["error"]["code"] == 4009


def test_cancel_a_chain_and_what_depends_on_it(daemon):
    with daemon.client() as c:
        c.pause("cli-chain")
        chained = [
            c.enqueue(job_type="noop", queue="cli-chain", chain_group_id="cli-c1").id
            for _ in range(2)
        ]
        other = c.enqueue(job_type="noop", queue="cli-chain", chain_group_id="cli-c2").id
        dependent = c.enqueue(job_type="noop", queue="cli-chain", depends_on=[chained[0]]).id
        said = ok(daemon.home, "cancel", "--chain", "cli-c1").strip()
        assert said == "cancelled 2 job(s) and 1 job(s) depending on them"
        assert {c.get(i).state for i in [*chained, dependent]} == {State.CANCELLED}
        assert c.get(other).state is State.QUEUED
        c.cancel(chain="cli-c2")


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
        (("enqueue", "noop", "--payload", '{"a": NaN}'), 2, "NaN is not a JSON value"),
        (("enqueue", "noop", "--payload", "@/nonexistent.json"), 2, "cannot read it"),
        (("enqueue", "noop", "--env", "NOEQUALS"), 2, "NAME=VALUE"),
        (("enqueue", "noop", "--schedule-at", "tomorrowish"), 2, "ISO 8601"),
        (("enqueue", "no_such_type"), 1, "installed:"),
        (("enqueue", "noop", "--max-attempts", "0"), 1, "max_attempts"),
        (("list", "--state", "NOPE"), 2, "use one of"),
        (("show", "no-such-id"), 1, "no job"),
        (("enqueue",), 2, "Missing argument"),
        (("list", "--limit", "abc"), 2, "Invalid value for '--limit'"),
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


USAGE_ERRORS = [
    (("enqueue",), "Missing argument 'job_type'", "semantica-cli enqueue --help"),
    (("list", "--limit", "abc"), "Invalid value for '--limit'", "semantica-cli list --help"),
    (("list", "--bogus"), "No such option: --bogus", "semantica-cli list --help"),
    (("no-such-command",), "No such command 'no-such-command'", "semantica-cli --help"),
    (("service", "bogus"), "No such command 'bogus'", "semantica-cli service --help"),
    (("enqueue", "noop", "--payload", "[1]"), "must be a JSON object", None),
]


@pytest.mark.parametrize(("args", "says", "hint"), USAGE_ERRORS)
def test_usage_errors_are_one_red_line_and_a_hint_never_a_box(home, args, says, hint):
    done = cli(home, *args)
    assert done.returncode == 2 and done.stdout == "", done.stderr
    lines = done.stderr.splitlines()
    assert lines[0].startswith("error: ") and says in lines[0], lines
    assert lines[1:] == ([f"try `{hint}`"] if hint else []), lines
    assert "╭" not in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize(("args", "says", "hint"), USAGE_ERRORS)
def test_usage_errors_with_json_are_one_json_line(home, args, says, hint):
    done = cli(home, *args, "--json")
    assert done.returncode == 2 and done.stdout == "", done.stderr
    [line] = done.stderr.splitlines()
    error = json.loads(line)["error"]
    assert error["code"] == "usage" and says in error["message"], error


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


def test_with_the_daemon_down_errors_and_waiting_reasons_are_the_daemons():
    """Offline, a bad --limit was 'semantica-cli failed unexpectedly ... please report
    it', -n -2 was taken, and a job scheduled an hour ahead read 'ready' (fixed)."""
    daemon = start_daemon()
    home = daemon.home
    try:
        later = ok(home, "enqueue", "noop", "-q", "--schedule-at", "+1h").strip()
        ok(home, "shutdown")
        assert daemon.proc.wait(timeout=20) == 0
        shown = doc(home, "show", later)
        assert shown["waiting_reason"].startswith("scheduled: schedule_at is in 3")
        assert shown["waiting_reason"].endswith("(daemon not running)")
        for args, says in (
            (("list", "-n", "0"), "limit: must be between 1 and 1000"),
            (("list", "--cursor", "garbage"), "cursor: is not a cursor"),
            (("logs", later, "-n", "-2"), "n: must be between 0 and 100000"),
        ):
            done = cli(home, *args)
            assert done.returncode == 1 and says in done.stderr, (args, done.stderr)
            assert "unexpectedly" not in done.stderr and "Traceback" not in done.stderr
        missing = cli(home, "show", "no-such-id", "--json")
        assert missing.returncode == 1
        assert json.loads(missing.stderr.splitlines()[-1])["error"]["code"] == 4004
    finally:
        daemon.stop()
        remove_home(home)


def test_a_bad_setting_only_the_daemon_reads_does_not_stop_the_cli(home):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEMANTICA_")}
    env.update(SEMANTICA_HOME=str(home), SEMANTICA_WORKERS="-3", SEMANTICA_RPC_PORT="abc")
    done = subprocess.run([CLI, "status", "--json"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["daemon_running"] is True


def test_shutdown_with_json_and_the_daemon_exits_0():
    daemon = start_daemon()
    try:
        assert doc(daemon.home, "shutdown") == {"stopping": True}
        assert daemon.proc.wait(timeout=20) == 0
    finally:
        daemon.stop()
        remove_home(daemon.home)


@pytest.fixture(scope="module")
def stopped():
    """The home of a daemon that ran a job, then stopped: (home, that job's id)."""
    daemon = start_daemon()
    with daemon.client() as c:
        job_id = c.enqueue(job_type="noop").id
        c.wait(job_id, timeout_ms=10_000)
        c.shutdown()
    assert daemon.proc.wait(timeout=20) == 0
    yield daemon.home, job_id
    daemon.stop()
    remove_home(daemon.home)


DOWN_COMMANDS = [
    ("retry", "{id}"),
    ("resume", "default"),
    ("wait", "{id}"),
    ("maintenance",),
    ("backup", "{tmp}/copy.db"),
    ("shutdown",),
]


@pytest.mark.parametrize("args", DOWN_COMMANDS, ids=lambda args: args[0])
def test_with_the_daemon_down_commands_that_need_it_exit_3(stopped, tmp_path, args):
    home, job_id = stopped
    args = tuple(a.format(id=job_id, tmp=tmp_path) for a in args)
    down = cli(home, *args)
    assert down.returncode == 3 and down.stdout == "", (args, down.stdout, down.stderr)
    [line] = down.stderr.splitlines()
    assert line.startswith("error: the Semantica daemon is not running") and "`semantica`" in line
    as_json = cli(home, *args, "--json")
    assert as_json.returncode == 3 and as_json.stdout == ""
    [line] = as_json.stderr.splitlines()
    error = json.loads(line)["error"]
    assert error["code"] == "daemon_not_running" and "start it with" in error["message"]
    assert not (tmp_path / "copy.db").exists()


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


def test_backup_for_people_says_where_and_how_big(home, tmp_path):
    copy = tmp_path / "human.db"
    said = ok(home, "backup", str(copy)).strip()
    assert re.fullmatch(rf"backed up to {re.escape(str(copy))} \(\d+\.\d MiB\) in \d+ ms", said)
    assert copy.stat().st_size > 0


def test_a_home_that_is_not_a_directory_is_a_usage_error(tmp_path):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    for args in (("list",), ("list", "--json")):
        done = cli(not_a_dir, *args)
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert "is not a directory" in done.stderr and "Traceback" not in done.stderr
