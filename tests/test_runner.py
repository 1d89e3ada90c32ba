"""The runner process, run for real: `python -m semantica.runner` with a spec on stdin.

Each test starts the runner the way the launcher does: its own session, a filtered
environment, cwd = a job directory, stdout+stderr to a log file, and the result pipe
on fd 3 (or on the fd named by SEMANTICA_RESULT_FD). A third-party plugin is
installed by writing a package and its `*.dist-info` into a directory on PYTHONPATH.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from semantica_runners.python import python
from semantica_runners.shell import shell

from semantica.plugins import (
    RESULT_FD,
    RESULT_FD_ENV,
    JobContext,
    PermanentError,
    Progress,
    Result,
    RunSpec,
)

REPO = Path(__file__).resolve().parent.parent
TIMEOUT_S = 10.0
_decode = msgspec.json.Decoder(Progress | Result).decode

PLUGIN_SOURCE = """
import os
import sys
import threading
import time

from semantica.plugins import JobContext, Output, RetryableError


def retry_later(ctx: JobContext):
    raise RetryableError("rate limited", retry_after_ms=1234)


def progress(ctx: JobContext):
    for i in range(1, 4):
        ctx.progress(i / 4, f"step {i}")
    ctx.logger.info("all steps done")
    return {"steps": 3}


def context(ctx: JobContext):
    (ctx.artifacts_dir / "out.txt").write_text("hi")
    print("printed to stdout")
    ctx.logger.warning("logged through ctx.logger")
    return Output(
        result_summary={
            "job_id": ctx.job_id,
            "job_type": ctx.job_type,
            "attempt": ctx.attempt,
            "deadline_ms": ctx.deadline_ms,
            "payload": ctx.payload,
            "cwd": os.getcwd(),
            "artifacts_dir": str(ctx.artifacts_dir),
            "semantica_env": sorted(k for k in os.environ if k.startswith("SEMANTICA_")),
            "stdin": sys.stdin.read(),
            "cancelled": ctx.cancelled(),
        },
        artifacts=["out.txt", "/elsewhere/abs.bin"],
    )


def bad_result(ctx):
    return {"x": object()}


def huge_result(ctx):
    return "x" * (9 * 1024 * 1024)


def bad_progress(ctx):
    ctx.progress(1.5)


class Flagged(Exception):
    permanent = True


def flagged(ctx):
    raise Flagged("flagged as permanent by a class attribute")


def limits(ctx):
    import resource

    return {
        "nofile": resource.getrlimit(resource.RLIMIT_NOFILE),
        "cpu": resource.getrlimit(resource.RLIMIT_CPU),
    }


def stray_thread(ctx):
    threading.Thread(target=time.sleep, args=(60,), name="forgotten").start()
    return {"ok": True}


NOT_CALLABLE = 42


def cyclic(ctx):
    loop = []
    loop.append(loop)
    return loop
"""

ENTRY_POINTS = """\
[semantica.runners]
Retry_Later = semantica_testplugin:retry_later
progress = semantica_testplugin:progress
context = semantica_testplugin:context
bad_result = semantica_testplugin:bad_result
huge_result = semantica_testplugin:huge_result
bad_progress = semantica_testplugin:bad_progress
flagged = semantica_testplugin:flagged
limits = semantica_testplugin:limits
stray_thread = semantica_testplugin:stray_thread
not_callable = semantica_testplugin:NOT_CALLABLE
broken = semantica_testplugin_missing:func
exits_on_import = semantica_testplugin_exits:func
cyclic = semantica_testplugin:cyclic
"""


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A third-party plugin distribution, found by importlib.metadata via PYTHONPATH."""
    root = tmp_path_factory.mktemp("site")
    (root / "semantica_testplugin.py").write_text(PLUGIN_SOURCE)
    (root / "semantica_testplugin_exits.py").write_text('raise SystemExit("not today")\n')
    dist = root / "semantica_testplugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: semantica-testplugin\nVersion: 1.0\n"
    )
    (dist / "entry_points.txt").write_text(ENTRY_POINTS)
    return root


class Run(msgspec.Struct):
    returncode: int
    messages: list[Progress | Result]
    log: str

    @property
    def result(self) -> Result:
        results = [m for m in self.messages if isinstance(m, Result)]
        assert len(results) == 1, self
        assert isinstance(self.messages[-1], Result), "the Result is the last message"
        return results[0]


class Runner:
    """One runner process, started as the launcher would start it."""

    def __init__(
        self,
        tmp_path: Path,
        plugin_dir: Path,
        job_type: str,
        payload: dict[str, Any] | None = None,
        *,
        spec: bytes | None = None,
        env: dict[str, str] | None = None,
        fd_from_env: bool = False,
        no_result_fd: bool = False,
    ) -> None:
        self.cwd = tmp_path / "work"
        self.cwd.mkdir(exist_ok=True)
        self.artifacts_dir = tmp_path / "artifacts" / "job-1"
        self.log_path = tmp_path / "job-1.log"
        if spec is None:
            spec = msgspec.json.encode(
                RunSpec(
                    job_id="job-1",
                    job_type=job_type,
                    payload=payload or {},
                    attempt=2,
                    artifacts_dir=str(self.artifacts_dir),
                    deadline_ms=60_000,
                )
            )
        full_env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
        full_env["PYTHONPATH"] = str(plugin_dir)
        full_env.update(env or {})
        read_fd, write_fd = os.pipe()
        preexec = None
        keep: tuple[int, ...] = ()
        if fd_from_env:
            full_env[RESULT_FD_ENV] = str(write_fd)
            keep = (write_fd,)
        elif not no_result_fd:

            def preexec() -> None:  # put the pipe on fd 3, as the brief's launcher does
                os.dup2(write_fd, RESULT_FD)

        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "semantica.runner"],
                stdin=subprocess.PIPE,
                stdout=log,
                stderr=log,
                cwd=self.cwd,
                env=full_env,
                start_new_session=True,
                pass_fds=keep,
                close_fds=preexec is None,
                preexec_fn=preexec,
            )
        os.close(write_fd)
        self.read_fd = read_fd
        assert self.proc.stdin is not None
        self.proc.stdin.write(spec)
        self.proc.stdin.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, text: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while text not in self.log():
            assert self.proc.poll() is None, self.log()
            assert time.monotonic() < deadline, f"{text!r} never logged:\n{self.log()}"
            time.sleep(0.01)

    def finish(self) -> Run:
        data = read_until_eof(self.read_fd)
        returncode = self.proc.wait(timeout=TIMEOUT_S)
        messages = [_decode(line) for line in data.splitlines()]
        return Run(returncode=returncode, messages=messages, log=self.log())


def read_until_eof(fd: int, timeout_s: float = TIMEOUT_S) -> bytes:
    chunks = []
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "the runner kept its result channel open too long"
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
    finally:
        os.close(fd)


@pytest.fixture
def run(tmp_path: Path, plugin_dir: Path):
    def run(job_type: str, payload: dict[str, Any] | None = None, **kwargs: Any) -> Run:
        return Runner(tmp_path, plugin_dir, job_type, payload, **kwargs).finish()

    return run


@pytest.fixture
def start(tmp_path: Path, plugin_dir: Path):
    def start(job_type: str, payload: dict[str, Any] | None = None, **kwargs: Any) -> Runner:
        return Runner(tmp_path, plugin_dir, job_type, payload, **kwargs)

    return start


def assert_success(run: Run) -> Any:
    assert run.returncode == 0, run.log
    result = run.result
    assert result.error_kind is None, (result, run.log)
    assert result.error_message is None
    return result.result_summary


def assert_failure(run: Run, kind: str, *, permanent: bool, in_message: str) -> Result:
    assert run.returncode == 0, run.log
    result = run.result
    assert result.error_kind == kind, (result, run.log)
    assert result.permanent is permanent
    assert result.error_message is not None
    assert in_message in result.error_message, result.error_message
    assert in_message in run.log  # every failure is in the job log, too
    return result


# --------------------------------------------------------------------------- the protocol


def test_noop_succeeds_with_the_result_on_fd_3(run):
    result = run("noop")
    assert assert_success(result) == {"ok": True}
    assert result.result.artifacts == []
    assert "job job-1 attempt 2: noop" in result.log


def test_the_artifacts_directory_is_made_only_for_a_job_that_asks_for_it(run, tmp_path):
    assert_success(run("noop"))
    assert not (tmp_path / "artifacts").exists()  # a directory per job costs the disk
    assert_success(run("context"))  # writes out.txt into ctx.artifacts_dir
    made = tmp_path / "artifacts" / "job-1"
    assert made.is_dir() and (made.stat().st_mode & 0o777) == 0o700


def test_result_fd_may_be_named_by_the_environment(run):
    assert assert_success(run("noop", fd_from_env=True)) == {"ok": True}


def test_job_type_is_case_insensitive(run):
    assert assert_success(run("NoOp")) == {"ok": True}
    # ...both ways: test_retryable_error_asks_for_its_delay runs "Retry_Later" as RETRY_LATER.


def test_unknown_job_type_names_the_installed_ones(run):
    result = assert_failure(
        run("no_such_thing"), "unknown_job_type", permanent=True, in_message="'no_such_thing'"
    )
    for name in ("noop", "sleep", "fail", "shell", "python", "index_file", "progress"):
        assert name in result.error_message


def test_context_reaches_the_plugin(run, tmp_path):
    result = run("context", {"k": [1, 2]})
    summary = assert_success(result)
    assert summary == {
        "job_id": "job-1",
        "job_type": "context",
        "attempt": 2,
        "deadline_ms": 60_000,
        "payload": {"k": [1, 2]},
        "cwd": str(tmp_path / "work"),
        "artifacts_dir": str(tmp_path / "artifacts" / "job-1"),
        "semantica_env": [],  # the runner's own variables do not reach plugin code
        "stdin": "",  # stdin held the spec only
        "cancelled": False,
    }
    artifacts_dir = tmp_path / "artifacts" / "job-1"
    assert result.result.artifacts == [str(artifacts_dir / "out.txt"), "/elsewhere/abs.bin"]
    assert (artifacts_dir / "out.txt").read_text() == "hi"
    assert "printed to stdout" in result.log
    # The logger's records are timestamped: "2025-01-31T12:00:00.123Z WARNING ..."
    line = next(ln for ln in result.log.splitlines() if "logged through ctx.logger" in ln)
    assert line[:4].isdigit() and line[10] == "T" and " WARNING " in line


def test_progress_arrives_before_the_result(run):
    result = run("progress")
    assert assert_success(result) == {"steps": 3}
    assert result.messages[:-1] == [
        Progress(fraction=0.25, message="step 1"),
        Progress(fraction=0.5, message="step 2"),
        Progress(fraction=0.75, message="step 3"),
    ]


def test_bad_spec_on_stdin_is_a_permanent_failure(run):
    assert_failure(run("noop", spec=b'{"job_id": 1}'), "bad_spec", permanent=True, in_message="")


def test_without_a_result_channel_the_runner_refuses_to_start(run):
    result = run("noop", no_result_fd=True)
    assert result.returncode == 2
    assert result.messages == []
    assert "no result channel" in result.log


# --------------------------------------------------------------------------- failures


def test_exception_fails_the_attempt_with_its_traceback_in_the_log(run):
    outcome = run("fail", {"mode": "exception"})
    result = assert_failure(
        outcome,
        "exception",
        permanent=False,
        in_message="RuntimeError: fail runner: raising as asked",
    )
    assert result.retry_after_ms is None
    assert "Traceback (most recent call last)" in outcome.log
    assert 'semantica_runners/basic.py", line' in outcome.log


def test_permanent_error_fails_the_job(run):
    assert_failure(
        run("fail", {"mode": "permanent"}),
        "permanent",
        permanent=True,
        in_message="PermanentError: fail runner: permanent failure",
    )


def test_payload_error_of_a_builtin_is_permanent(run):
    assert_failure(
        run("sleep", {"seconds": "soon"}),
        "permanent",
        permanent=True,
        in_message="'seconds' must be a number",
    )


def test_exception_flagged_permanent_by_class_attribute(run):
    assert_failure(run("flagged"), "permanent", permanent=True, in_message="Flagged: flagged")


def test_retryable_error_asks_for_its_delay(run):
    outcome = run("RETRY_LATER")
    result = assert_failure(outcome, "retryable", permanent=False, in_message="rate limited")
    assert result.retry_after_ms == 1234
    assert "Traceback" in outcome.log


def test_exit_leaves_no_result(run):
    result = run("fail", {"mode": "exit", "code": 3})
    assert result.returncode == 3
    assert result.messages == []


def test_signal_leaves_no_result(run):
    result = run("fail", {"mode": "signal"})
    assert result.returncode == -signal.SIGKILL
    assert result.messages == []


def test_result_that_is_not_json_is_a_bad_result(run):
    assert_failure(run("bad_result"), "bad_result", permanent=True, in_message="cannot be encoded")


def test_result_too_large_is_a_bad_result(run):
    assert_failure(run("huge_result"), "bad_result", permanent=True, in_message="write it to")


def test_progress_out_of_range_is_an_exception(run):
    assert_failure(run("bad_progress"), "exception", permanent=False, in_message="between 0 and 1")


def test_plugin_that_cannot_be_loaded(run):
    assert_failure(
        run("broken"), "plugin_load", permanent=True, in_message="No module named 'semantica_"
    )
    assert_failure(run("not_callable"), "plugin_load", permanent=True, in_message="not callable")
    # SystemExit as it is imported: the runner died with status 1, retried as 'exit'.
    assert_failure(run("exits_on_import"), "plugin_load", permanent=True, in_message="not today")


def test_a_result_that_refers_to_itself_is_a_bad_result(run):
    """A RecursionError escaped the encoding: the runner died, 'exit', retried (fixed)."""
    assert_failure(run("cyclic"), "bad_result", permanent=True, in_message="cannot be encoded")


# --------------------------------------------------------------------------- the process


def test_sigterm_sets_the_cancellation_flag_and_a_job_cut_short_is_not_done(start):
    """The plugin sees the flag and winds down; what it returns then is not a
    success (it was recorded DONE before: an audit found it), but a retryable
    'signal' failure. The daemon decides the outcome itself when it sent the signal."""
    runner = start("sleep", {"seconds": 30})
    runner.wait_for_log("attempt 2: sleep")
    began = time.monotonic()
    os.kill(runner.proc.pid, signal.SIGTERM)
    result = runner.finish()
    failed = assert_failure(result, "signal", permanent=False, in_message="got SIGTERM")
    assert failed.exit_code == -signal.SIGTERM
    assert time.monotonic() - began < 5
    assert "SIGTERM received" in result.log


def test_resource_limits_are_applied_before_the_plugin(run):
    limits = json.dumps({"nofile": 100, "cpu": 50})
    summary = assert_success(run("limits", env={"SEMANTICA_RLIMITS": limits}))
    assert summary == {"nofile": [100, 100], "cpu": [50, 51]}


def test_stray_threads_do_not_keep_the_runner_alive(run):
    began = time.monotonic()
    result = run("stray_thread")
    assert assert_success(result) == {"ok": True}
    assert time.monotonic() - began < 5
    assert "forgotten" in result.log


def test_runner_stops_when_the_daemon_dies(tmp_path, plugin_dir):
    """A stand-in daemon starts the runner with SEMANTICA_PARENT_PID, then exits."""
    read_fd, write_fd = os.pipe()
    spec = msgspec.json.encode(
        RunSpec(
            job_id="job-1",
            job_type="sleep",
            payload={"seconds": 30},
            attempt=1,
            artifacts_dir=str(tmp_path / "artifacts"),
            deadline_ms=60_000,
        )
    )
    log_path = tmp_path / "job.log"
    daemon_code = textwrap.dedent(
        f"""
        import os, subprocess, sys
        env = {{"PATH": os.environ["PATH"], "PYTHONPATH": {str(plugin_dir)!r},
                "SEMANTICA_RESULT_FD": "{write_fd}", "SEMANTICA_PARENT_PID": str(os.getpid())}}
        with open({str(log_path)!r}, "ab") as log:
            p = subprocess.Popen([sys.executable, "-m", "semantica.runner"],
                                 stdin=subprocess.PIPE, stdout=log, stderr=log,
                                 cwd={str(tmp_path)!r}, env=env, start_new_session=True,
                                 pass_fds=({write_fd},))
        os.close({write_fd})
        p.stdin.write({spec!r})
        p.stdin.close()
        sys.stdin.read()  # until the test says: die
        os._exit(0)
        """
    )
    daemon = subprocess.Popen(
        [sys.executable, "-c", daemon_code], stdin=subprocess.PIPE, pass_fds=(write_fd,)
    )
    os.close(write_fd)
    assert daemon.stdin is not None
    deadline = time.monotonic() + TIMEOUT_S
    while "attempt 1: sleep" not in (log_path.read_text() if log_path.exists() else ""):
        assert time.monotonic() < deadline, "the runner never started"
        time.sleep(0.01)
    daemon.stdin.close()
    assert daemon.wait(timeout=TIMEOUT_S) == 0
    messages = [_decode(line) for line in read_until_eof(read_fd, timeout_s=5).splitlines()]
    assert isinstance(messages[-1], Result)  # cut short: a retryable failure, told to nobody
    assert (messages[-1].error_kind, messages[-1].exit_code) == ("signal", -signal.SIGTERM)
    assert "the daemon is gone" in log_path.read_text()


def test_runner_does_not_start_when_the_daemon_is_already_gone(run):
    result = run("noop", env={"SEMANTICA_PARENT_PID": "1"})  # not our parent
    assert result.returncode == 1
    assert result.messages == []
    assert "already gone" in result.log


# --------------------------------------------------------------------------- index_file


def test_index_file_on_a_file_of_the_repo(run):
    path = REPO / "semantica" / "plugins.py"
    data = path.read_bytes()
    summary = assert_success(run("INDEX_FILE", {"path": str(path)}))
    assert summary == {
        "path": str(path),
        "bytes": len(data),
        "lines": data.count(b"\n") + (0 if data.endswith(b"\n") else 1),
        "sha256": hashlib.sha256(data).hexdigest(),
        "language": "python",
    }


def test_index_file_takes_relative_paths_from_root(run):
    summary = assert_success(run("index_file", {"path": "runners/README.md", "root": str(REPO)}))
    assert summary["path"] == str(REPO / "runners" / "README.md")
    assert summary["language"] == "markdown"


def test_index_file_reports_progress_on_a_large_file(run, tmp_path):
    path = tmp_path / "big.bin"
    block = os.urandom(1024 * 1024 - 1) + b"\n"
    path.write_bytes(block * 10)
    result = run("index_file", {"path": str(path)})
    summary = assert_success(result)
    assert summary["bytes"] == 10 * len(block)
    assert summary["lines"] == 10 * block.count(b"\n")
    assert summary["sha256"] == hashlib.sha256(block * 10).hexdigest()
    assert summary["language"] == "unknown"
    fractions = [m.fraction for m in result.messages if isinstance(m, Progress)]
    assert len(fractions) >= 5
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0


def test_index_file_counts_a_last_line_without_newline_and_reads_shebangs(run, tmp_path):
    script = tmp_path / "tool"
    script.write_bytes(b"#!/usr/bin/env python3\nprint(1)")
    summary = assert_success(run("index_file", {"path": str(script)}))
    assert (summary["lines"], summary["language"]) == (2, "python")
    empty = tmp_path / "empty.rs"
    empty.write_bytes(b"")
    summary = assert_success(run("index_file", {"path": str(empty)}))
    assert (summary["bytes"], summary["lines"], summary["language"]) == (0, 0, "rust")


def test_index_file_rejects_what_it_cannot_read(run, tmp_path):
    assert_failure(
        run("index_file", {"path": str(tmp_path / "nope.py")}),
        "permanent",
        permanent=True,
        in_message="no such file",
    )
    result = assert_failure(
        run("index_file", {"path": "nope.py"}), "permanent", permanent=True, in_message="'root'"
    )
    assert "no such file" in result.error_message
    assert_failure(
        run("index_file", {"path": str(tmp_path)}),
        "permanent",
        permanent=True,
        in_message="is a directory",
    )
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert_failure(
        run("index_file", {"path": str(fifo)}),
        "permanent",
        permanent=True,
        in_message="not a regular file",
    )
    assert_failure(
        run("index_file", {"path": 7}), "permanent", permanent=True, in_message="'path' must be"
    )


# --------------------------------------------------------------------------- shell


def test_shell_runs_argv_without_a_shell(run):
    result = run("shell", {"argv": ["printf", "arg=[%s]\\n", "$HOME; echo injected"]})
    assert assert_success(result) == {"exit_code": 0}
    assert "arg=[$HOME; echo injected]" in result.log
    assert "\ninjected" not in result.log


def test_shell_true_goes_through_sh(run):
    result = run(
        "shell",
        {"argv": 'printf "home=[%s]\\n" "$MY_VAR"', "shell": True, "env": {"MY_VAR": "x y"}},
    )
    assert assert_success(result) == {"exit_code": 0}
    assert "home=[x y]" in result.log


def test_shell_cwd_and_env(run, tmp_path):
    (tmp_path / "here.txt").write_text("")
    result = run(
        "shell", {"argv": ["sh", "-c", "ls; echo v=$V"], "cwd": str(tmp_path), "env": {"V": "1"}}
    )
    assert_success(result)
    assert "here.txt" in result.log
    assert "v=1" in result.log


def test_shell_nonzero_exit_fails_the_attempt(run):
    outcome = run("shell", {"argv": ["sh", "-c", "echo about to fail; exit 3"]})
    result = assert_failure(outcome, "exit", permanent=False, in_message="exited with status 3")
    assert "CommandFailed" in result.error_message and result.exit_code == 3
    assert "about to fail" in outcome.log


def test_shell_timeout_kills_the_command(run):
    began = time.monotonic()
    assert_failure(
        run("shell", {"argv": ["sleep", "30"], "timeout_s": 0.2}),
        "exception",
        permanent=False,
        in_message="timeout_s=0.2",
    )
    assert time.monotonic() - began < 5


@pytest.mark.parametrize(
    "payload",
    [
        {},
        {"argv": []},
        {"argv": "ls"},
        {"argv": ["ls", 3]},
        {"argv": [""]},
        {"argv": ["ls"], "shell": "yes"},
        {"argv": ["ls"], "env": {"A": 1}},
        {"argv": ["ls"], "timeout_s": -1},
        {"argv": ["ls"], "unknown_key": 1},
    ],
)
def test_shell_rejects_a_bad_payload(payload, tmp_path):
    # In-process: a plugin is a plain function of a JobContext.
    with pytest.raises(PermanentError, match=r"^shell: "):
        shell(JobContext(job_id="t", payload=payload, artifacts_dir=tmp_path))


def test_shell_rejects_a_bad_payload_in_the_runner_too(run):
    assert_failure(
        run("shell", {"argv": []}), "permanent", permanent=True, in_message="'argv' must be"
    )


def test_shell_missing_program_is_permanent(run):
    assert_failure(
        run("shell", {"argv": ["/no/such/program"]}),
        "permanent",
        permanent=True,
        in_message="no such program",
    )


# --------------------------------------------------------------------------- python


def test_python_calls_a_function_by_name(run):
    summary = assert_success(
        run("python", {"callable": "json:dumps", "args": [[1, 2]], "kwargs": {"indent": None}})
    )
    assert summary == "[1, 2]"


def test_python_passes_the_context_when_asked(run):
    summary = assert_success(
        run(
            "python",
            {"callable": "semantica_testplugin:progress", "pass_context": True},
        )
    )
    assert summary == {"steps": 3}


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"callable": "json.dumps"}, "'module:function'"),
        ({"callable": "no_such_module_x:f"}, "cannot import module"),
        ({"callable": "json:no_such_function"}, "no attribute"),
        ({"callable": "json:__doc__"}, "not callable"),
        ({"callable": "json:dumps", "args": {}}, "'args' must be a list"),
        ({"callable": "json:dumps", "kwargs": []}, "'kwargs' must be an object"),
        ({"callable": "json:dumps", "sys_path": "/x"}, "'sys_path' must be"),
    ],
)
def test_python_rejects_a_bad_spec(payload, message, tmp_path):
    with pytest.raises(PermanentError, match=message):
        python(JobContext(job_id="t", payload=payload, artifacts_dir=tmp_path))


def test_python_rejects_a_bad_spec_in_the_runner_too(run):
    assert_failure(
        run("python", {"callable": "json:nope"}), "permanent", permanent=True, in_message="nope"
    )


def test_python_exceptions_are_the_callable_s_own(run):
    assert_failure(
        run("python", {"callable": "json:loads", "args": ["{"]}),
        "exception",
        permanent=False,
        in_message="JSONDecodeError",
    )


def test_only_an_exceptions_own_exit_code_within_a_status_byte_counts():
    from semantica import runner

    class Own(Exception):
        def __init__(self, code):
            super().__init__("x")
            self.exit_code = code

    class ClassLevel(Exception):  # as click's exceptions carry one
        exit_code = 2

    assert runner._exit_code_of(Own(7)) == 7
    assert runner._exit_code_of(Own(-9)) == -9
    assert runner._exit_code_of(subprocess.CalledProcessError(3, ["x"])) == 3
    for not_one in (Own(0), Own(2**70), Own(True), Own("7"), ClassLevel()):
        assert runner._exit_code_of(not_one) is None, not_one
