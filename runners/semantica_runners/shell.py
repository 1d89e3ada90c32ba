"""`shell`: run a command, its output going to the job's log.

Payload:
    argv       non-empty list of strings: the program and its arguments, run directly
               (no shell: `$HOME`, `*` and `;` reach the program as they are)
    shell      optional bool, default false: run through `/bin/sh -c` instead; then
               argv may also be one string, argv[0] is the script and the rest its
               $0, $1, ...
    cwd        optional directory to run in; relative to the job's working directory
    env        optional {name: value} added to the runner's (allowlisted) environment
    timeout_s  optional positive number: kill the command after that long

Result: `{"exit_code": 0}`. A non-zero exit status, a death by signal or a timeout
fails the attempt (it is retried): the job's `error_kind` is then `exit` or `signal`
and its `exit_code` the command's (negative for a signal), or `exception` for a
timeout. A bad payload or a missing program fails the job.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from typing import Any

from semantica.plugins import JobContext
from semantica_runners._payload import (
    PayloadError,
    optional_number,
    optional_str,
    reject_unknown,
)

KEYS = {"argv", "shell", "cwd", "env", "timeout_s"}
KILL_GRACE_S = 2.0


class CommandFailed(RuntimeError):
    """The command ran and did not succeed; `exit_code` is negative for a signal."""

    def __init__(self, message: str, exit_code: int | None) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def shell(ctx: JobContext) -> dict[str, Any]:
    payload = ctx.payload
    reject_unknown(payload, KEYS, "shell")
    use_shell = payload.get("shell", False)
    if not isinstance(use_shell, bool):
        raise PayloadError(f"shell: 'shell' must be true or false, got {use_shell!r}")
    argv = _argv(payload.get("argv"), use_shell)
    cwd = optional_str(payload, "cwd", "shell")
    timeout_s = optional_number(payload, "timeout_s", "shell")
    env = _env(payload.get("env"))

    shown = argv if isinstance(argv, str) else shlex.join(argv)
    ctx.logger.info("shell: running %s%s", "sh -c " if use_shell else "", shown)
    for stream in (sys.stdout, sys.stderr):  # keep the log in order around the child's output
        stream.flush()
    try:
        proc = subprocess.Popen(argv, shell=use_shell, cwd=cwd, env=env, stdin=subprocess.DEVNULL)
    except FileNotFoundError as exc:
        what = f"directory {cwd!r}" if cwd and not os.path.isdir(cwd) else "program"
        raise PayloadError(f"shell: cannot run {shown}: no such {what} ({exc})") from exc
    except (PermissionError, NotADirectoryError) as exc:
        raise PayloadError(f"shell: cannot run {shown}: {exc}") from exc
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _stop(proc)
        raise CommandFailed(
            f"shell: {shown} still running after timeout_s={timeout_s:g}: killed", None
        ) from None
    finally:
        if proc.returncode is None:  # interrupted some other way: leave nothing behind
            _stop(proc)
    if code != 0:
        if code < 0:
            raise CommandFailed(f"shell: {shown} was killed by signal {-code}", code)
        raise CommandFailed(f"shell: {shown} exited with status {code}", code)
    return {"exit_code": 0}


def _argv(argv: Any, use_shell: bool) -> str | list[str]:
    if use_shell and isinstance(argv, str) and argv:
        return argv
    if (
        not isinstance(argv, list)
        or not argv
        or not all(isinstance(a, str) for a in argv)
        or not argv[0]
    ):
        raise PayloadError(
            f"shell: 'argv' must be a non-empty list of strings (program first), got {argv!r}"
        )
    if any("\0" in a for a in argv):
        raise PayloadError("shell: 'argv' must not contain NUL characters")
    return argv


def _env(extra: Any) -> dict[str, str] | None:
    if extra is None:
        return None
    if not isinstance(extra, dict) or not all(
        isinstance(k, str) and k and "=" not in k and isinstance(v, str) for k, v in extra.items()
    ):
        raise PayloadError(f"shell: 'env' must map variable names to strings, got {extra!r}")
    return {**os.environ, **extra}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=KILL_GRACE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
