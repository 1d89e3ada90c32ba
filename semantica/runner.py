"""What runs inside a runner process: load the job's plugin, call it, report how it went.

Started by the launcher as `python -m semantica.runner` (or, later, forked from a
pre-started zygote that calls `run_job` directly). The protocol:

- stdin: one RunSpec JSON document, then EOF. The runner reads it all, then points
  fd 0 at /dev/null.
- result channel: fd `RESULT_FD` (3), or the fd named by `SEMANTICA_RESULT_FD` when
  that is set. The runner writes NDJSON `RunnerMessage`s there, tagged by "type":
  any number of `{"type":"progress",...}` lines, each written as the plugin reports
  it, then exactly one `{"type":"result",...}` line. The fd is made non-inheritable,
  so programs a plugin executes do not hold it open.
- stdout and stderr are the job's log: the plugin's prints, the `ctx.logger` records
  (timestamped, UTC), and for every failure its message and full traceback.
- exit status 0 whenever a Result was written, success or failure. Anything else
  (a plugin calling `os._exit`, a signal, a crash before the Result) is for the
  launcher to classify from the exit status; the runner does not catch SystemExit.
- SIGTERM sets the job's cancellation flag (`ctx.cancelled()`); the launcher sends
  SIGKILL after its grace period.
- optional environment, read and removed before any plugin code runs:
  `SEMANTICA_RLIMITS` (JSON: {"cpu", "as", "nofile", "nproc", "core", "fsize"} ->
  setrlimit; cpu gets a hard limit one second above the soft one) and
  `SEMANTICA_PARENT_PID` (the daemon's pid: when it dies the runner's process group
  gets SIGTERM, then SIGKILL after a grace; watched with a pidfd, or kqueue, not with
  PR_SET_PDEATHSIG, which fires when the spawning *thread* exits), and
  `SEMANTICA_PLUGIN_PATH` (the daemon's PYTHONPATH, absolute: put on sys.path, so
  the runner finds every plugin the daemon lists, while the job's environment,
  built from the allowlist, carries no PYTHONPATH of the daemon's).

Failures become a Result with `error_kind`:
  "permanent"        PermanentError, or an exception whose `permanent` attribute is true
  "retryable"        RetryableError; `retry_after_ms` as it asked
  "exception"        any other Exception (retried with backoff)
  "bad_result"       the return value is not JSON-encodable by msgspec, or too large
  "unknown_job_type" no plugin of that name; the message lists the installed ones
  "plugin_load"      the plugin's entry point failed to import, or is not callable
  "bad_spec"         stdin did not hold a RunSpec
The last four are permanent too.

Imports stay few (msgspec and the standard library) so a runner starts fast.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from semantica.plugins import (
    ENTRY_POINT_GROUP,
    MAX_RESULT_SUMMARY_BYTES,
    RESULT_FD,
    RESULT_FD_ENV,
    RETRY_AFTER_MAX_MS,
    JobContext,
    Output,
    PermanentError,
    Progress,
    Ready,
    Result,
    RetryableError,
    RunSpec,
    WarmJob,
)

RLIMITS_ENV = "SEMANTICA_RLIMITS"
PARENT_PID_ENV = "SEMANTICA_PARENT_PID"
PLUGIN_PATH_ENV = "SEMANTICA_PLUGIN_PATH"
PARENT_GONE_GRACE_S = 2.0  # between SIGTERM and SIGKILL to our group once the daemon is gone
MAX_ERROR_MESSAGE_CHARS = 4000

_encode = msgspec.json.Encoder().encode
_decode_spec = msgspec.json.Decoder(RunSpec).decode
_decode_warm_job = msgspec.json.Decoder(WarmJob).decode


# --------------------------------------------------------------------------- the channel


class ResultChannel:
    """The write end of the result pipe: one NDJSON line per message, written at once.

    At most one Result goes through a channel; progress reported after it (from a
    thread the plugin left behind) is dropped. If the reader is gone, writes are
    dropped too: nobody is left to tell.
    """

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.result_sent = False
        self._lock = threading.Lock()

    def send(self, message: Progress | Result | Ready) -> None:
        line = _encode(message) + b"\n"
        with self._lock:
            if self.result_sent:
                if isinstance(message, Result):
                    raise RuntimeError("semantica runner: a Result was already sent")
                return
            if isinstance(message, Result):
                self.result_sent = True
            view = memoryview(line)
            while view:
                try:
                    written = os.write(self.fd, view)
                except BrokenPipeError:
                    return
                view = view[written:]


# --------------------------------------------------------------------------- running one job


class _CancelFlag:
    __slots__ = ("requested",)

    def __init__(self) -> None:
        self.requested = False

    def __call__(self) -> bool:
        return self.requested


def _install_sigterm_handler(flag: _CancelFlag) -> None:
    def on_sigterm(signum: int, frame: Any) -> None:
        if not flag.requested:
            flag.requested = True
            _write_stderr_raw(b"semantica runner: SIGTERM received: the job is asked to stop\n")

    # Outside the main thread no handler can be installed: cancellation goes unseen.
    with contextlib.suppress(ValueError):
        signal.signal(signal.SIGTERM, on_sigterm)


def run_job(
    spec: RunSpec, result_fd: int, *, warm: bool = False, baseline: _WorkerState | None = None
) -> bool:
    """Run one attempt in this process and write its messages to `result_fd`.

    Writes any progress, then exactly one Result line, whatever the plugin does,
    except leave the process (SystemExit, os._exit, a fatal signal). Does not close
    `result_fd` and may be called again in the same process for the next job.
    Returns whether this process must exit now: SIGTERM arrived meanwhile (the
    launcher is stopping it), or, for a WARM worker given its `baseline`, the job left
    something behind that would reach the next job (a thread, lowered limits).
    A `warm` worker also reports what the daemon needs to decide whether to reuse it:
    its resident memory, and whether the job left a process behind.
    """
    channel = ResultChannel(result_fd)
    flag = _CancelFlag()
    _install_sigterm_handler(flag)
    result = _run(spec, channel, flag)
    _flush_std_streams()
    if flag.requested and result.error_kind is None:
        # Asked to stop, the job wound down and returned: its work is not done. (When
        # the daemon sent the signal, a cancel or a deadline, it decides the outcome
        # itself; from anyone else, the attempt is retried. A signal that lands just
        # after a job that did finish makes it run again: at least once, as ever.)
        result = _report(
            Result(error_kind="signal", exit_code=-signal.SIGTERM),
            "the job got SIGTERM and stopped before it finished",
        )
    left = None if baseline is None or flag.requested else baseline.left_behind()
    if left is not None:
        _note(f"this worker retires after the job: {left}, which would reach the next job")
    if flag.requested or left is not None:
        result = msgspec.structs.replace(result, worker_exits=True, worker_exit_reason=left)
    elif warm:
        rss, children = _own_fitness()
        result = msgspec.structs.replace(result, worker_rss_bytes=rss, worker_children=children)
    channel.send(result)
    return flag.requested or left is not None


def _run(spec: RunSpec, channel: ResultChannel, flag: _CancelFlag) -> Result:
    logger = _job_logger(spec.trace_id)
    started = time.monotonic()
    _note(f"job {spec.job_id} attempt {spec.attempt}: {spec.job_type.lower()}")
    plugin, failure = _load_plugin(spec.job_type)
    if failure is not None:
        return failure
    artifacts_dir = Path(spec.artifacts_dir)  # made when the plugin first asks for it
    ctx = JobContext(
        job_id=spec.job_id,
        job_type=spec.job_type,
        payload=spec.payload,
        attempt=spec.attempt,
        deadline_ms=spec.deadline_ms,
        artifacts_dir=artifacts_dir,
        logger=logger,
        emit=channel.send,
        is_cancelled=flag,
    )
    try:
        value = plugin(ctx)
    except Exception as exc:
        return _failure(exc)
    result = _success(value, artifacts_dir)
    if result.error_kind is None:
        _note(f"job {spec.job_id} attempt {spec.attempt}: done in {_since(started):.3f}s")
    return result


def _own_fitness() -> tuple[int | None, bool | None]:
    """(resident bytes, whether this process has children), read from /proc on Linux;
    (None, None) elsewhere, and the daemon looks for itself."""
    try:
        rss = int(read_small(b"/proc/self/statm").split()[1]) * _PAGE_SIZE
        children = bool(read_small(f"/proc/self/task/{os.getpid()}/children".encode()).strip())
    except (OSError, ValueError, IndexError):
        return None, None
    return rss, children


def read_small(path: bytes) -> bytes:
    """A small /proc file in three system calls (open() buffered took eight)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _note(message: str) -> None:
    """The runner's own INFO line in the job log, as the job logger writes it, on a
    line of its own. Written directly: in a freshly forked runner each object the
    logging machinery touches costs a page copy."""
    _flush_std_streams()
    start = b"" if _at_line_start(2) else b"\n"
    line = f"{_timestamp()} INFO semantica.job{_trace_suffix}: {message}\n"
    _write_stderr_raw(start + line.encode(errors="replace"))


def _since(started: float) -> float:
    return time.monotonic() - started


_loaded_plugins: dict[str, Any] = {}  # a WARM worker loads each plugin once
_plugin_threads: set[int | None] = set()  # started while a plugin was imported


def _load_plugin(job_type: str) -> tuple[Any, Result | None]:
    """The plugin registered as `job_type` (any case), or a permanent failure saying why."""
    wanted = job_type.lower()
    if (plugin := _loaded_plugins.get(wanted)) is not None:
        return plugin, None
    import importlib.metadata  # only here: a forked runner has its plugin loaded already

    entry_points = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    for ep in entry_points:  # the first one of a name wins, as in installed_runners()
        if ep.name.lower() == wanted:
            break
    else:
        installed = sorted({ep.name.lower() for ep in entry_points})
        message = (
            f"no runner plugin for job type {job_type!r}; installed: "
            f"{', '.join(installed) if installed else '(none)'}"
        )
        return None, _report(Result(error_kind="unknown_job_type", permanent=True), message)
    before = {t.ident for t in threading.enumerate()}
    try:
        plugin = ep.load()
    except (Exception, SystemExit) as exc:  # a module that exits as it is imported, too
        return None, _failure(
            exc, f"cannot load runner plugin {ep.name!r} ({ep.value})", kind="plugin_load"
        )
    if not callable(plugin):
        message = f"runner plugin {ep.name!r} ({ep.value}) is not callable: {plugin!r}"
        return None, _report(Result(error_kind="plugin_load", permanent=True), message)
    _loaded_plugins[wanted] = plugin
    # Threads its import started (a metrics pusher, an SDK's exporter) are the
    # plugin's own, meant to live as long as the process: not a job's leftovers.
    _plugin_threads.update(t.ident for t in threading.enumerate() if t.ident not in before)
    return plugin, None


def _success(value: Any, artifacts_dir: Path) -> Result:
    if isinstance(value, Output):
        summary, artifacts = value.result_summary, value.artifacts
    else:
        summary, artifacts = value, []
    try:
        if not isinstance(artifacts, list | tuple):
            raise TypeError(f"Output.artifacts must be a list of paths, got {artifacts!r}")
        paths = [_artifact_path(a, artifacts_dir) for a in artifacts]
        encoded = _encode(summary)
    except (TypeError, ValueError, msgspec.EncodeError, RecursionError) as exc:  # a cycle too
        return _failure(exc, "the plugin's result cannot be encoded as JSON", kind="bad_result")
    if len(encoded) > MAX_RESULT_SUMMARY_BYTES:
        message = (
            f"the plugin's result is {len(encoded)} bytes encoded, more than the "
            f"{MAX_RESULT_SUMMARY_BYTES} allowed: write it to an artifact instead"
        )
        return _report(Result(error_kind="bad_result", permanent=True), message)
    return Result(result_summary=msgspec.Raw(encoded), artifacts=paths)


def _artifact_path(artifact: Any, artifacts_dir: Path) -> str:
    path = os.fspath(artifact)
    if not isinstance(path, str):
        raise TypeError(f"an artifact path must be a str or os.PathLike[str], got {artifact!r}")
    return str(artifacts_dir / path)  # an absolute path stays as it is


def _failure(exc: BaseException, context: str | None = None, *, kind: str | None = None) -> Result:
    """The Result for an exception, after writing it with its traceback to the job log."""
    retry_after_ms = None
    exit_code = _exit_code_of(exc) if kind is None else None
    if kind is not None:
        permanent = True
    elif isinstance(exc, PermanentError):
        kind, permanent = "permanent", True
    elif isinstance(exc, RetryableError):
        kind, permanent = "retryable", False
        retry_after_ms = _retry_after(exc.retry_after_ms)
    elif _flagged_permanent(exc):
        kind, permanent = "permanent", True
    elif exit_code is not None:
        kind, permanent = ("signal" if exit_code < 0 else "exit"), False
    else:
        kind, permanent = "exception", False
    message = _describe(exc)
    if context is not None:
        message = f"{context}: {message}"
    result = Result(
        error_kind=kind, permanent=permanent, retry_after_ms=retry_after_ms, exit_code=exit_code
    )
    return _report(result, message, exc)


def _exit_code_of(exc: BaseException) -> int | None:
    """The exit status an exception reports for a command the plugin ran: its own
    `exit_code` attribute (the shell runner's CommandFailed; not a class's, as click's
    exceptions have), or a subprocess.CalledProcessError's returncode; -255..255,
    negative for a signal."""
    import subprocess

    try:
        if isinstance(exc, subprocess.CalledProcessError):
            code = exc.returncode
        else:
            code = vars(exc).get("exit_code")
    except Exception:
        return None
    if isinstance(code, int) and not isinstance(code, bool) and 0 < abs(code) <= 255:
        return code
    return None


def _report(result: Result, message: str, exc: BaseException | None = None) -> Result:
    """Write a failure to the job log (stderr), then give back `result` with its message."""
    message = message[:MAX_ERROR_MESSAGE_CHARS]
    try:
        sys.stderr.write(
            f"{_timestamp()} ERROR semantica.runner: failed ({result.error_kind}): {message}\n"
        )
        if exc is not None:
            traceback.print_exception(exc, file=sys.stderr)
        sys.stderr.flush()
    except Exception:  # a plugin may have closed or replaced stderr: report anyway
        pass
    result.error_message = message
    return result


def _timestamp() -> str:
    """Now, as the job logger writes it."""
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z"


def _describe(exc: BaseException) -> str:
    try:
        text = str(exc)
    except Exception:
        text = "<unprintable exception>"
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


def _flagged_permanent(exc: BaseException) -> bool:
    try:
        return bool(getattr(exc, "permanent", False))
    except Exception:
        return False


def _retry_after(value: Any) -> int | None:
    """A RetryableError's retry_after_ms as the daemon takes it: a number of ms, held
    to RETRY_AFTER_MAX_MS (10**19 would not fit the database), or None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return min(round(value), RETRY_AFTER_MAX_MS)


_trace_suffix = ""


def _at_line_start(fd: int) -> bool:
    """Whether the log file behind `fd` is empty or ends with a newline (True when it
    cannot be read back: a pipe or a terminal)."""
    try:
        size = os.fstat(fd).st_size
        return size == 0 or os.pread(fd, 1, size - 1) == b"\n"
    except OSError:
        return True


class _LineStartHandler(logging.StreamHandler):
    """Starts each record on a line of its own, even after job output that did not
    end with a newline (`printf`), so the two never run together."""

    def emit(self, record: logging.LogRecord) -> None:
        _flush_std_streams()
        if not _at_line_start(2):
            _write_stderr_raw(b"\n")
        record.trace_suffix = _trace_suffix
        super().emit(record)


def _job_logger(trace_id: str | None = None) -> logging.Logger:
    """`semantica.job`, writing through a root handler on stderr (the job log); with
    tracing on, each line carries the attempt's `trace_id=`."""
    global _trace_suffix
    _trace_suffix = f" trace_id={trace_id}" if trace_id else ""
    root = logging.getLogger()
    if not any(isinstance(h, _LineStartHandler) for h in root.handlers):
        handler = _LineStartHandler(sys.stderr)
        formatter = logging.Formatter(
            "%(asctime)s.%(msecs)03dZ %(levelname)s %(name)s%(trace_suffix)s: %(message)s",
            datefmt="%Y-%m-%dT%H:%M:%S",
        )
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
        root.addHandler(handler)
        root.setLevel(logging.INFO)
    return logging.getLogger("semantica.job")


def _flush_std_streams() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _write_stderr_raw(data: bytes) -> None:
    """Write to fd 2 without Python's buffers or locks: safe in a signal handler."""
    with contextlib.suppress(OSError):
        os.write(2, data)


# --------------------------------------------------------------------------- the process


def apply_rlimits(spec: str) -> None:
    """setrlimit from `{"cpu": s, "as": bytes, "nofile": n, "nproc": n, ...}`; never raises.

    Limits only go down: a value above the current hard limit is capped to it. One
    that cannot be applied is reported on stderr and skipped.
    """
    import resource

    names = {
        "cpu": resource.RLIMIT_CPU,
        "as": resource.RLIMIT_AS,
        "nofile": resource.RLIMIT_NOFILE,
        "nproc": resource.RLIMIT_NPROC,
        "core": resource.RLIMIT_CORE,
        "fsize": resource.RLIMIT_FSIZE,
    }
    try:
        limits = msgspec.json.decode(spec, type=dict[str, int])
    except msgspec.DecodeError as exc:
        sys.stderr.write(f"semantica runner: ignoring {RLIMITS_ENV}: {exc}\n")
        return
    for name, value in limits.items():
        which = names.get(name)
        if which is None or value < 0:
            sys.stderr.write(f"semantica runner: ignoring resource limit {name}={value}\n")
            continue
        try:
            _soft, hard = resource.getrlimit(which)
            capped = value if hard == resource.RLIM_INFINITY else min(value, hard)
            new_hard = capped
            if name == "cpu":  # SIGXCPU at the soft limit first, SIGKILL a second later
                new_hard = capped + 1 if hard == resource.RLIM_INFINITY else min(capped + 1, hard)
            resource.setrlimit(which, (capped, new_hard))
        except (OSError, ValueError) as exc:
            sys.stderr.write(f"semantica runner: cannot set resource limit {name}={value}: {exc}\n")


def watch_parent(parent_pid: int, on_gone: Callable[[], None] | None = None) -> bool:
    """Stop this process group (or call `on_gone`) when `parent_pid` (the daemon)
    exits. False: already gone.

    A daemon thread waits on a pidfd (Linux), a kqueue (macOS, BSD) or, failing both,
    polls the parent pid once a second.
    """
    if os.getppid() != parent_pid:
        return False
    thread = threading.Thread(
        target=_watch_parent,
        args=(parent_pid, on_gone or _stop_own_group),
        name="semantica-parent-watch",
        daemon=True,
    )
    thread.start()
    return True


parent_pidfd: int | None = None  # the watch thread's pidfd of the daemon, once open


def _watch_parent(parent_pid: int, on_gone: Callable[[], None]) -> None:
    import select

    global parent_pidfd
    try:
        pidfd = parent_pidfd = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):
        pidfd = None
    if pidfd is not None:
        if os.getppid() == parent_pid:  # else it died before the pidfd was opened
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)
            poller.poll()
    elif hasattr(select, "kqueue"):
        try:
            kq = select.kqueue()
            event = select.kevent(
                parent_pid,
                filter=select.KQ_FILTER_PROC,
                flags=select.KQ_EV_ADD | select.KQ_EV_ONESHOT,
                fflags=select.KQ_NOTE_EXIT,
            )
            if os.getppid() == parent_pid:
                kq.control([event], 1, None)
        except OSError:
            pass
    while os.getppid() == parent_pid:  # the fallback, and a check on the above
        time.sleep(1.0)
    on_gone()


def _stop_own_group() -> None:
    _write_stderr_raw(b"semantica runner: the daemon is gone: stopping the job\n")
    group = os.getpgrp()
    leader = group == os.getpid()  # our own group (as launched): take our children too

    def kill(sig: int) -> None:
        try:
            if leader:
                os.killpg(group, sig)
            else:
                os.kill(os.getpid(), sig)
        except OSError:
            pass

    kill(signal.SIGTERM)
    time.sleep(PARENT_GONE_GRACE_S)
    kill(signal.SIGKILL)


def _result_fd_from_env() -> int | None:
    text = os.environ.pop(RESULT_FD_ENV, None)
    try:
        fd = RESULT_FD if text is None else int(text)
        os.fstat(fd)
    except (ValueError, OSError):
        where = f"fd {text!r} (from {RESULT_FD_ENV})" if text is not None else f"fd {RESULT_FD}"
        sys.stderr.write(
            f"semantica runner: no result channel on {where}. The runner is started by "
            "the semantica daemon; it writes its messages to that fd.\n"
        )
        return None
    os.set_inheritable(fd, False)
    return fd


def _read_spec() -> bytes:
    data = sys.stdin.buffer.read()
    _stdin_from_devnull()
    return data


def _stdin_from_devnull() -> None:
    """fd 0 reads nothing from here on (a plugin reading stdin gets EOF)."""
    devnull = os.open(os.devnull, os.O_RDONLY)
    if devnull != 0:  # fd 0 was closed: the open took its place
        os.dup2(devnull, 0)
        os.close(devnull)


def _drop_cwd_from_sys_path() -> None:
    # `python -m` puts the working directory first on sys.path; it is the job's own
    # directory, where an earlier attempt may have left any file: import nothing from it.
    if not sys.flags.safe_path and sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]


def _add_plugin_path() -> None:
    """Search the daemon's PYTHONPATH for plugins too (see SEMANTICA_PLUGIN_PATH)."""
    text = os.environ.pop(PLUGIN_PATH_ENV, None)
    if text:
        entries = [p for p in text.split(os.pathsep) if os.path.isabs(p) and p not in sys.path]
        sys.path[:0] = entries


def main() -> int:
    """`python -m semantica.runner`: the process around `run_job`."""
    result_fd = _result_fd_from_env()
    if result_fd is None:
        return 2
    _drop_cwd_from_sys_path()
    _add_plugin_path()
    limits = os.environ.pop(RLIMITS_ENV, None)
    if limits:
        apply_rlimits(limits)
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent and not watch_parent(int(parent)):
        sys.stderr.write("semantica runner: the daemon is already gone: not starting\n")
        return 1
    run_as_batch()
    raw = _read_spec()
    try:
        spec = _decode_spec(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        message = f"stdin did not hold a RunSpec ({len(raw)} bytes): {exc}"
        ResultChannel(result_fd).send(
            _report(Result(error_kind="bad_spec", permanent=True), message)
        )
        return 0
    run_job(spec, result_fd)
    os.close(result_fd)
    _exit_despite_stray_threads()
    return 0


def main_warm() -> int:
    """`python -m semantica.runner --warm`: a WARM worker, running job after job.

    Each line on stdin is a `WarmJob`; for each, the worker resets its environment to
    the one it started with plus the job's `env`, enters the job's directory, points
    stdout and stderr at the job's log, sets its CPU limit to what it has used plus
    the job's allowance, and calls `run_job`, whose Result line tells the daemon the
    job is over. Stdin is moved off fd 0 first, so a plugin reading stdin reads
    nothing instead of the next job. The worker exits at EOF on the control channel,
    and after a job during which SIGTERM came: that is how the daemon stops a worker
    whose job was cancelled or overran, and it need not wait out its grace then.
    """
    result_fd = _result_fd_from_env()
    if result_fd is None:
        return 2
    _drop_cwd_from_sys_path()
    _add_plugin_path()
    limits = os.environ.pop(RLIMITS_ENV, None)
    if limits:
        apply_rlimits(limits)
    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent and not watch_parent(int(parent)):
        sys.stderr.write("semantica runner: the daemon is already gone: not starting\n")
        return 1
    _become_subreaper()
    run_as_batch()
    control = os.dup(0)
    os.set_inheritable(control, False)
    _stdin_from_devnull()
    base_env = dict(os.environ)
    _preload_plugins()
    serve_warm(control, result_fd, base_env)
    return 0


def serve_warm(control_fd: int, result_fd: int, base_env: dict[str, str]) -> None:
    """A WARM worker's jobs, once its process is set up (by `main_warm`, or in a
    process the zygote forked): read `WarmJob` lines from `control_fd` and run each
    in an environment of `base_env` plus the job's own, until EOF or a job after
    which the worker must exit (then it exits at once)."""
    control = os.fdopen(control_fd, "rb", buffering=0)
    baseline = _WorkerState.capture()
    # Only now is the worker put in the pool: a job's deadline must not count the
    # interpreter's start and the plugins' imports (100 ms and more here).
    ResultChannel(result_fd).send(Ready())
    for line in _lines(control):
        try:
            job = _decode_warm_job(line)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            message = f"the control line did not hold a WarmJob ({len(line)} bytes): {exc}"
            ResultChannel(result_fd).send(
                _report(Result(error_kind="bad_spec", permanent=True), message)
            )
            continue
        _enter_job(job, base_env, baseline)
        stopping = run_job(job.spec, result_fd, warm=True, baseline=baseline)
        _flush_std_streams()
        if stopping:  # cancelled, past its deadline, or left something behind
            os._exit(0)  # without waiting for threads the job left running


def _preload_plugins() -> None:
    """Load every installed plugin before the first job, as the zygote has them
    imported. One that cannot be loaded is left for its job to report."""
    import importlib.metadata

    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        _load_plugin(ep.name)


def run_as_batch() -> None:
    """Linux: schedule this process (and what it forks) as SCHED_BATCH, the policy
    for non-interactive work. Its CPU share is unchanged (same nice value); only a
    runner woken by the daemon no longer preempts the daemon on its CPU, which here
    cost the daemon a third of its time while it handed out jobs."""
    batch = getattr(os, "SCHED_BATCH", None)
    if batch is None:
        return
    with contextlib.suppress(OSError):
        os.sched_setscheduler(0, batch, os.sched_param(0))


def _become_subreaper() -> None:
    """Linux: processes a job leaves behind are re-parented to this worker (not to
    init), so the daemon sees them and does not reuse the worker."""
    _prctl(36, 1)  # PR_SET_CHILD_SUBREAPER


def die_with_parent(parent_pid: int) -> bool:
    """Be killed (SIGKILL) when the parent process exits; False if it already has.

    Linux: the parent-death signal (PR_SET_PDEATHSIG), for a process forked by a
    single-threaded parent (the zygote; it fires when the forking *thread* exits).
    Elsewhere, the watch thread of `watch_parent`, which stops the whole group.
    """
    if not _prctl(1, signal.SIGKILL):  # PR_SET_PDEATHSIG
        return watch_parent(parent_pid)
    return os.getppid() == parent_pid  # else it died before the signal was armed


_libc: Any = None


def _prctl(option: int, arg: int) -> bool:
    """prctl(2) on Linux (libc loaded once, before any fork); False elsewhere or on failure."""
    global _libc
    if sys.platform != "linux":
        return False
    try:
        if _libc is None:
            import ctypes

            _libc = ctypes.CDLL(None, use_errno=True)
        return _libc.prctl(option, arg, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _lines(stream: Any) -> Any:
    buffer = b""
    while chunk := stream.read(65536):
        buffer += chunk
        while (newline := buffer.find(b"\n")) >= 0:
            yield buffer[:newline]
            buffer = buffer[newline + 1 :]


class _WorkerState:
    """What a WARM worker was like before its first job, so that each job starts
    from it: what one job changes must not reach the next."""

    LIMITS = ("RLIMIT_AS", "RLIMIT_NOFILE", "RLIMIT_NPROC", "RLIMIT_CORE", "RLIMIT_FSIZE")

    def __init__(
        self,
        umask: int,
        limits: dict[int, tuple[int, int]],
        threads: set[int],
        stdin: tuple[int, int] | None,
    ):
        self.umask = umask
        self.limits = limits
        self.threads = threads
        self.stdin = stdin  # (st_dev, st_ino) of what fd 0 reads: /dev/null

    @classmethod
    def capture(cls) -> _WorkerState:
        import resource

        umask = os.umask(0o077)
        os.umask(umask)
        limits = {}
        for name in cls.LIMITS:
            if (which := getattr(resource, name, None)) is not None:
                limits[which] = resource.getrlimit(which)
        threads = {t.ident for t in threading.enumerate() if t.ident}
        return cls(umask, limits, threads, _file_identity(0))

    def reset(self) -> None:
        """Before a job: the umask, and any limit the last job changed, back as they
        were (a lowered hard limit cannot go back up: `left_behind` retires the
        worker after such a job)."""
        import resource

        os.umask(self.umask)
        for which, wanted in self.limits.items():
            with contextlib.suppress(OSError, ValueError):
                if resource.getrlimit(which) != wanted:
                    resource.setrlimit(which, wanted)
        if _file_identity(0) != self.stdin:  # a job closed or moved fd 0
            _stdin_from_devnull()

    def left_behind(self) -> str | None:
        """After a job: what it left that the next job would inherit, or None."""
        import resource

        stray = [
            t.name
            for t in threading.enumerate()
            if t.is_alive() and t.ident not in self.threads and t.ident not in _plugin_threads
        ]
        if stray:
            return f"it left threads running ({', '.join(stray)})"
        for which, wanted in self.limits.items():
            if resource.getrlimit(which)[1] != wanted[1]:
                try:
                    resource.setrlimit(which, wanted)
                except (OSError, ValueError):
                    return "it lowered a hard resource limit"
        return None


def _enter_job(job: WarmJob, base_env: dict[str, str], baseline: _WorkerState) -> None:
    import resource

    set_environment({**base_env, **job.env})  # undoes the last job's, and its changes
    baseline.reset()
    enter_work_dir(job.cwd)
    _flush_std_streams()
    log_fd = _above_std_fds(open_job_log(job.log_path))
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    _restore_std_streams()
    # A soft limit only: each job raises it again to what the worker has used plus the
    # job's allowance (SIGXCPU past it ends the worker, and the daemon replaces it).
    usage = resource.getrusage(resource.RUSAGE_SELF)
    want = math.ceil(usage.ru_utime + usage.ru_stime) + job.cpu_seconds
    _soft, hard = resource.getrlimit(resource.RLIMIT_CPU)
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    try:
        resource.setrlimit(resource.RLIMIT_CPU, (want, hard))
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"semantica runner: cannot set the CPU limit to {want}s: {exc}\n")


def _above_std_fds(fd: int) -> int:
    """`fd`, moved above 2 if it landed on 0, 1 or 2 (a job closed one of them): the
    dup2 onto 1 and 2 that follows would otherwise close the log it just opened."""
    if fd > 2:
        return fd
    import fcntl

    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    os.close(fd)
    return moved


def _file_identity(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _restore_std_streams() -> None:
    """sys.stdout and sys.stderr are the streams on fds 1 and 2 again, made anew if a
    job closed them (a job may also have replaced them)."""
    for name, fd in (("stdout", 1), ("stderr", 2)):
        stream = getattr(sys, f"__{name}__")
        if stream is None or stream.closed:
            stream = open(  # noqa: SIM115  (it lives as long as the worker)
                fd, "w", encoding="utf-8", errors="backslashreplace", closefd=False
            )
            if fd == 2:
                stream.reconfigure(line_buffering=True)
            setattr(sys, f"__{name}__", stream)
        setattr(sys, name, stream)
    for handler in logging.getLogger().handlers:  # the job logger writes to stderr
        if isinstance(handler, _LineStartHandler) and handler.stream is not sys.stderr:
            handler.stream = sys.stderr  # not setStream(): it flushes the closed one


def set_environment(wanted: dict[str, str]) -> None:
    """Make os.environ exactly `wanted`, changing only what differs (each change is
    a putenv, and in a forked runner each object touched costs a page copy)."""
    current = dict(os.environ)
    if current == wanted:
        return
    for name in current.keys() - wanted.keys():
        del os.environ[name]
    for name, value in wanted.items():
        if current.get(name) != value:
            os.environ[name] = value


def enter_work_dir(path: str) -> None:
    """Make the job's working directory (0700; a retry finds it made) and enter it.
    Made here, in a forked runner or WARM worker, not on the daemon's event loop: a
    directory per job costs the disk some time. (A runner started as a new
    interpreter gets it from the launcher, as its cwd.)"""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:  # the tree above it was removed: make it again
        os.makedirs(path, 0o700, exist_ok=True)
    os.chdir(path)


def open_job_log(path: str) -> int:
    """The job's log file, for appending (read access lets the runner see whether the
    job's output ended a line)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_APPEND
    try:
        return os.open(path, flags, 0o600)
    except FileNotFoundError:  # the logs directory was removed: make it again
        os.makedirs(os.path.dirname(path), 0o700, exist_ok=True)
        return os.open(path, flags, 0o600)


def _exit_despite_stray_threads() -> None:
    """Exit now if the plugin left non-daemon threads running: the Result is written."""
    stray = [
        t.name
        for t in threading.enumerate()
        if t is not threading.main_thread() and not t.daemon and t.is_alive()
    ]
    if stray:
        sys.stderr.write(
            f"semantica runner: the plugin left threads running ({', '.join(stray)}); "
            "exiting without waiting for them\n"
        )
        _flush_std_streams()
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main_warm() if sys.argv[1:] == ["--warm"] else main())
