"""Starting and stopping runner processes: the only module that starts processes.

Each attempt runs in a fresh `python -m semantica.runner` process: its own session
and process group, an environment built from the allowlist (never the daemon's
own), umask 077, a working directory of its own, stdin carrying only the job spec,
stdout and stderr appended to `logs/<job_id>.log`, and the result on a separate
pipe. The runner applies its resource limits itself, before any plugin code is
imported, and watches the daemon's PID so that it dies with it (see runner.py):
doing either here would need a preexec hook, unsafe in a process with threads, and
PR_SET_PDEATHSIG would fire when the trio worker thread that spawned it exits.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import msgspec
import psutil
import trio

from semantica import log
from semantica.domain import ExecutionMode, Job, Outcome
from semantica.plugins import Progress, Ready, Result, RunSpec, WarmJob
from semantica.runner import open_job_log, read_small

ZYGOTE_START_TIMEOUT_S = 30.0
ZYGOTE_REPLY_TIMEOUT_S = 10.0
# How long a SUBPROCESS claim waits for the zygote's spare before it goes ahead
# without one (the process is then recorded once forked). The zygote forks one in a
# few ms, or says it cannot; this bounds the wait if it does neither.
SPARE_WAIT_S = 5.0
# Set up by the launcher for `python -m semantica.runner`; a zygote's child gets these
# through its request instead.
RUNNER_SETUP_VARS = frozenset(
    {"SEMANTICA_RLIMITS", "SEMANTICA_PARENT_PID", "SEMANTICA_RESULT_FD", "SEMANTICA_PLUGIN_PATH"}
)
KILL_GRACE_S = 2.0  # between SIGTERM and SIGKILL
CHANNEL_DRAIN_S = 0.5  # after the runner exits, for its last message to be read
START_TIME_SLACK_MS = 50  # a process start time is known to the clock tick (10 ms)
MAX_RESULT_BYTES = 16 * 1024 * 1024
READ_CHUNK = 65536  # bytes read from a runner's result channel at once
WARM_READY_TIMEOUT_S = 30.0  # for a new WARM worker to start and load the plugins

_decode_message = msgspec.json.Decoder(Progress | Result | Ready).decode
_encode = msgspec.json.Encoder().encode


class SandboxLimits(msgspec.Struct, kw_only=True, frozen=True):
    """Resource limits of every runner (SPEC §4). CPU time follows each job's deadline."""

    address_space_bytes: int = 8 * 1024**3
    open_files: int = 1024
    processes: int = 4096  # RLIMIT_NPROC counts all of the user's processes
    cpu_slack_s: int = 5  # CPU seconds allowed beyond the deadline, as a backstop


def runner_environment(
    daemon_env: dict[str, str], allowlist: frozenset[str], job_env: dict[str, str]
) -> dict[str, str]:
    """Only allowlisted names from the daemon's environment, then the job's own `env`."""
    env = {k: v for k, v in daemon_env.items() if k in allowlist}
    env.update(job_env)
    return env


def process_start_time(pid: int) -> int | None:
    """The process's start time (Unix milliseconds), to tell a reused PID apart: what
    start_ms(psutil.Process(pid)) gives. On Linux /proc/<pid>/stat is read here in
    three system calls; psutil's Process() reads it through buffered objects, and
    more than once."""
    if _PROC_STAT:
        try:
            stat = read_small(f"/proc/{pid}/stat".encode())
            # After the command's closing parenthesis: field 3 (state) onwards; the
            # start time in clock ticks since boot is field 22.
            ticks = int(stat[stat.rindex(b")") + 2 :].split()[19])
            return round((ticks / _CLOCK_TICKS + boot_time()) * 1000)
        except (OSError, ValueError, IndexError):
            return None
    try:
        return start_ms(psutil.Process(pid))
    except psutil.Error:
        return None


_PROC_STAT = sys.platform.startswith("linux") and os.path.exists("/proc/self/stat")
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if _PROC_STAT else 100
_CLOCK_BOOTTIME = getattr(time, "CLOCK_BOOTTIME", None)
_boot_time_checked: bool | None = None  # whether boot_time() may compute (None: not yet)
BOOT_CLOCKS_GAP_S = 0.0002  # most the boot clock may move while the wall clock is read


def boot_time() -> float:
    """The boot time as psutil reads it (Linux: the `btime` of /proc/stat), afresh:
    the kernel derives it from the wall clock, and a start time read after a clock
    step must agree with what recovery reads later.

    The kernel's btime is the whole seconds of CLOCK_REALTIME - CLOCK_BOOTTIME, so it
    is computed from those two clocks instead of reading /proc/stat (several KB of
    counters: 5 % of the daemon's time per SUBPROCESS job). The wall clock is read
    between two readings of the boot clock: if those are more than
    BOOT_CLOCKS_GAP_S apart (the thread was held up between them), or the offset is
    within a millisecond of a whole second (where the readings could round apart),
    psutil is asked instead. The first call checks the computation against psutil;
    if they differ (a kernel that says otherwise), psutil is asked every time."""
    global _boot_time_checked
    if _CLOCK_BOOTTIME is not None and _boot_time_checked is not False:
        booted = time.clock_gettime(_CLOCK_BOOTTIME)
        wall = time.time()
        booted_after = time.clock_gettime(_CLOCK_BOOTTIME)
        offset = wall - (booted + booted_after) / 2
        if booted_after - booted < BOOT_CLOCKS_GAP_S and 0.001 < offset % 1 < 0.999:
            computed = float(math.floor(offset))
            if _boot_time_checked:
                return computed
            _boot_time_checked = computed == psutil.boot_time()
            if _boot_time_checked:
                return computed
    return psutil.boot_time()


def start_ms(proc: psutil.Process) -> int:
    """When `proc` started, in Unix milliseconds (the kernel knows it to 10 ms)."""
    return round(proc.create_time() * 1000)


def kill_process_group(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False if it no longer exists."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError as exc:
        log.warning("kill_refused", pgid=pgid, error=str(exc))
        return False
    return True


def group_members(pgid: int, started_after_ms: int | None = None) -> list[psutil.Process]:
    """Processes still in a process group (the leader may be gone, its children not)."""
    members = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getpgid(proc.pid) != pgid:
                continue
            if started_after_ms is not None and start_ms(proc) + 10 < started_after_ms:
                continue  # older than the job: not one of its processes
            members.append(proc)
        except (ProcessLookupError, psutil.Error, OSError):
            continue
    return members


class MessageReader:
    """NDJSON messages from a runner's result channel: progress is handed on as it
    comes, each Result returned."""

    def __init__(self, stream: trio.lowlevel.FdStream) -> None:
        self.stream = stream
        self.buffer = bytearray()
        self.ready = False  # a WARM worker said it is ready for its first job

    async def wait_ready(self) -> bool:
        """Read until the runner says Ready (True), or its channel ends (False)."""
        await self.next_result(lambda fraction, message: None, until_ready=True)
        return self.ready

    async def next_result(
        self, on_progress: Callable[[float, str | None], None], *, until_ready: bool = False
    ) -> Result | None:
        """The next Result; None at the end of the channel (or when it overflows), or
        once a Ready has come (`until_ready`)."""
        while True:
            while (newline := self.buffer.find(b"\n")) >= 0:
                line = bytes(self.buffer[:newline])
                del self.buffer[: newline + 1]
                try:
                    message = _decode_message(line)
                except msgspec.DecodeError:
                    log.warning("runner_message_unreadable", bytes=len(line))
                    continue
                if isinstance(message, Result):
                    return message
                if isinstance(message, Ready):
                    self.ready = True
                    if until_ready:
                        return None
                    continue
                if until_ready:
                    continue  # (nothing else comes before Ready)
                try:  # progress is informative: failing to store it stops nothing
                    on_progress(min(1.0, max(0.0, message.fraction)), message.message)
                except Exception as exc:
                    log.warning("progress_not_recorded", error=str(exc))
            data = await _read_when_ready(self.stream)
            if not data:
                return None
            self.buffer += data
            if len(self.buffer) > MAX_RESULT_BYTES:
                log.warning("runner_channel_overflow")
                return None


async def _read_when_ready(stream: trio.lowlevel.FdStream) -> bytes:
    """The next bytes of a runner's channel (b"" at its end), waiting for them first.

    `FdStream.receive_some` yields once, then tries a read that finds nothing (the
    runner has just been handed its job) and only then waits: a pass of the event
    loop and two system calls more per job than this wait-then-read. Closing the
    stream meanwhile ends the wait with ClosedResourceError, as it does there."""
    fd = stream.fileno()
    if fd < 0:
        raise trio.ClosedResourceError("the channel was already closed")
    while True:
        await trio.lowlevel.wait_readable(fd)
        try:
            return os.read(fd, READ_CHUNK)
        except BlockingIOError:
            continue  # woken without data (spurious): wait again
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc


async def send_line(stream: trio.lowlevel.FdStream, data: bytes) -> None:
    """Write to a runner's control channel straight away when the pipe takes it all
    (the usual case: a job's line is small), else through trio for the rest.
    `FdStream.send_all` yields to the scheduler before every write."""
    if stream.fileno() < 0:
        raise trio.ClosedResourceError("the channel was already closed")
    try:
        sent = os.write(stream.fileno(), data)
    except BlockingIOError:
        sent = 0
    except OSError as exc:
        raise trio.BrokenResourceError(str(exc)) from exc
    if sent < len(data):
        await stream.send_all(memoryview(data)[sent:])


class Launcher:
    """Runs one attempt of a job in a sandboxed runner process and reports its Outcome."""

    def __init__(
        self,
        *,
        home: Path,
        env_allowlist: frozenset[str],
        limits: SandboxLimits | None = None,
        daemon_env: dict[str, str] | None = None,
        python: str = sys.executable,
        warm_max_jobs: int = 1000,
        warm_max_rss_bytes: int = 512 * 1024**2,
        use_zygote: bool = True,
        spares: int = 1,
    ) -> None:
        self.home = home
        self.logs_dir = home / "logs"
        self.work_dir = home / "work"
        self.artifacts_root = home / "artifacts"
        self._work_prefix = os.path.join(self.work_dir, "")
        self._logs_prefix = os.path.join(self.logs_dir, "")
        self._artifacts_prefix = os.path.join(self.artifacts_root, "")
        self.env_allowlist = env_allowlist
        self.limits = limits or SandboxLimits()
        self.daemon_env = dict(os.environ if daemon_env is None else daemon_env)
        self.python = python
        self.warm = WarmPool(self, max_jobs=warm_max_jobs, max_rss_bytes=warm_max_rss_bytes)
        self.zygote = Zygote(self) if use_zygote and sys.platform == "linux" else None
        self.spares = spares  # processes the zygote keeps forked ahead
        self._tree_made = False
        # The background tasks getting a runner ready for the next claim, and whether
        # the daemon is stopping (then none starts, and those running are cancelled).
        self._getting_ready: set[trio.CancelScope] = set()
        self._stopping = False

    def reserve_fresh_runner(self) -> tuple[int, int] | None:
        """The process a SUBPROCESS job claimed now would run in, to record with its
        claim (see Zygote.reserve_spare); None: recorded once it exists."""
        return None if self.zygote is None else self.zygote.reserve_spare()

    def claims_without_runner(self, mode: ExecutionMode) -> bool:
        """Whether a job of `mode` may be claimed with no process reserved for it
        (then recorded once its process exists): only when none can be had ahead."""
        if mode is ExecutionMode.WARM:
            return self.warm.spawn_failed is not None
        return self.zygote is None or not self.zygote.keeps_spares()

    def get_runner_ready(
        self, mode: ExecutionMode, nursery: trio.Nursery, ready: Callable[[], None]
    ) -> None:
        """Get a process for the next job of `mode` ready, in the background; `ready`
        is called once there is one (or none can be had ahead)."""
        if self._stopping:
            return
        if mode is ExecutionMode.WARM:
            self.warm.get_worker_ready(nursery, ready)
        elif self.zygote is not None:
            self.zygote.get_spare_ready(nursery, ready)

    def in_background(self, nursery: trio.Nursery, fn: Callable[[], Awaitable[None]]) -> None:
        """Run `fn` (getting a runner ready) in `nursery`, until the daemon stops."""

        async def run() -> None:
            with trio.CancelScope() as scope:
                self._getting_ready.add(scope)
                try:
                    await fn()
                finally:
                    self._getting_ready.discard(scope)

        nursery.start_soon(run)

    def stop_getting_ready(self) -> None:
        """The daemon is stopping: no runner is got ready any more (a worker or the
        zygote being started is left to the shutdown that follows)."""
        self._stopping = True
        for scope in self._getting_ready:
            scope.cancel()

    def has_runner_ready(self, mode: ExecutionMode) -> bool:
        """Whether a job of `mode` claimed now would find its process there (or is
        never to wait for one): an idle WARM worker, or the zygote's free spare."""
        if self.claims_without_runner(mode):
            return True
        if mode is ExecutionMode.WARM:
            return bool(self.warm.idle)
        assert self.zygote is not None  # (else claimed without one)
        return self.zygote.has_free_spare()

    def runner_starting(self, mode: ExecutionMode) -> str | None:
        """What a ready job of `mode` waits for while its process is got ready."""
        if mode is ExecutionMode.WARM:
            return self.warm.starting()
        return None if self.zygote is None else self.zygote.starting()

    def give_back_fresh_runner(self, pid: int) -> None:
        """Free the process `pid` reserved for a claim: no SUBPROCESS job was claimed
        with it, or the job that recorded it has ended without asking for it."""
        if self.zygote is not None:
            self.zygote.give_back_spare(pid)

    def make_tree(self) -> None:
        """The directories the runners make their own in (and start in)."""
        if not self._tree_made:
            for d in (self.logs_dir, self.work_dir, self.artifacts_root):
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._tree_made = True

    def log_path(self, job_id: str) -> Path:
        return Path(self._job_paths(job_id)[1])

    def artifacts_dir(self, job_id: str) -> Path:
        return Path(self._job_paths(job_id)[2])

    def _job_paths(self, job_id: str) -> tuple[str, str, str]:
        """(working directory, log file, artifacts directory) of a job, as text: made
        for every job, by joining strings rather than through pathlib."""
        return (
            f"{self._work_prefix}{job_id}",
            f"{self._logs_prefix}{job_id}.log",
            f"{self._artifacts_prefix}{job_id}",
        )

    async def run(
        self,
        job: Job,
        *,
        on_started: Callable[[int, int], None],
        on_progress: Callable[[float, str | None], None],
        trace_id: str | None = None,
        worker: WarmWorker | None = None,
    ) -> Outcome:
        """Run the job's current attempt to its end and return how it ended: in a
        fresh process (SUBPROCESS), or on a worker of the WARM pool (`worker`, when
        one was reserved for it and recorded with its claim).

        `on_started(pid, start_time)` is called as soon as the process is known
        (not for a `worker` given: its process is already recorded).
        Cancelling the caller's scope stops the process group (TERM, then KILL)
        before this returns or raises.
        """
        try:
            self.make_tree()
            cwd, log_path, artifacts_dir = self._job_paths(job.id)
            spec = self._spec(job, trace_id, artifacts_dir)
        except BaseException:
            if worker is not None:  # reserved for this job, which cannot run: back it goes
                self.warm.give_back(worker)
            raise
        if job.execution_mode is ExecutionMode.WARM:
            return await self.warm.run(job, spec, cwd, log_path, on_started, on_progress, worker)
        return await self._run_fresh(job, spec, cwd, log_path, on_started, on_progress)

    def _spec(self, job: Job, trace_id: str | None, artifacts_dir: str) -> RunSpec:
        return RunSpec(
            job_id=job.id,
            job_type=job.job_type,
            payload=job.payload,
            attempt=job.attempt,
            artifacts_dir=artifacts_dir,
            deadline_ms=job.deadline_ms,
            trace_id=trace_id,
        )

    async def _run_fresh(
        self,
        job: Job,
        spec: RunSpec,
        cwd: str,
        log_path: str,
        on_started: Callable[[int, int], None],
        on_progress: Callable[[float, str | None], None],
    ) -> Outcome:
        env = runner_environment(self.daemon_env, self.env_allowlist, job.env)
        env["SEMANTICA_RLIMITS"] = self._rlimits(job)
        env["SEMANTICA_PARENT_PID"] = str(os.getpid())
        env.update(self._plugin_path())
        read_fd, write_fd = os.pipe()
        env["SEMANTICA_RESULT_FD"] = str(write_fd)
        try:
            proc, unsent = await self._start_runner(
                env, cwd, log_path, write_fd, _encode(spec), recorded=job.runner_pid
            )
        except OSError as exc:  # no process: the process limit (EAGAIN), memory...
            os.close(read_fd)
            return self._not_started(exc, log_path)
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        messages = trio.lowlevel.FdStream(read_fd)
        result: list[Result] = []
        channel_closed = trio.Event()
        deadline_hit = False
        try:
            # Inside the try: if the PID cannot be recorded, the runner is stopped.
            # (The zygote's spare was recorded with the claim, if this is it.)
            start = getattr(proc, "start_time", None) or process_start_time(proc.pid) or 0
            if (proc.pid, start) != (job.runner_pid, job.runner_start_time):
                on_started(proc.pid, start)
            async with trio.open_nursery() as nursery:
                if unsent:
                    nursery.start_soon(self._feed_spec, proc, unsent)
                nursery.start_soon(
                    self._read_messages, messages, on_progress, result, channel_closed
                )
                with trio.move_on_after(job.deadline_ms / 1000) as deadline:
                    await proc.wait()
                if deadline.cancelled_caught:
                    deadline_hit = True
                    await self._stop(proc)
                # The runner has exited: its outcome is decided, so a cancel arriving
                # now (a drain, a late cancel) must not turn it into "stopped". The
                # result is written before the runner exits; a process the plugin
                # forked may still hold the pipe open, so do not wait for it for long.
                with trio.CancelScope(shield=True), trio.move_on_after(CHANNEL_DRAIN_S):
                    await channel_closed.wait()
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True):
                if proc.returncode is None:
                    await self._stop(proc)
                else:  # what the job forked and left behind goes with it
                    kill_process_group(proc.pid, signal.SIGKILL)
                await messages.aclose()
                if proc.stdin is not None:
                    await proc.stdin.aclose()
        return self._outcome(proc.returncode, result[-1] if result else None, deadline_hit, job)

    async def _start_runner(
        self,
        env: dict[str, str],
        cwd: str,
        log_path: str,
        result_fd: int,
        spec: bytes,
        recorded: int | None = None,
    ) -> tuple[trio.Process | ZygoteChild, bytes]:
        """A fresh runner process and what of its `spec` is still to be written to its
        stdin: forked by the zygote (which opens the job's log itself, off the event
        loop), or a new interpreter when the zygote is off or unavailable."""
        if self.zygote is not None:
            stdin_r, stdin_w = os.pipe()
            # The spec goes into the pipe now (it holds 64 KiB: all of most specs), so
            # the child reads it at once instead of waiting for the fork's reply.
            os.set_blocking(stdin_w, False)
            try:
                written = os.write(stdin_w, spec)
            except BlockingIOError:
                written = 0
            stdin: trio.lowlevel.FdStream | None = None
            if written == len(spec):
                os.close(stdin_w)
            else:
                stdin = trio.lowlevel.FdStream(stdin_w)
            child_env = {k: v for k, v in env.items() if k not in RUNNER_SETUP_VARS}
            try:
                pid, start = await self.zygote.spawn(
                    child_env,
                    cwd,
                    log_path,
                    env["SEMANTICA_RLIMITS"],
                    (stdin_r, result_fd),
                    recorded=recorded,
                )
            except ZygoteGone:
                if stdin is not None:
                    await stdin.aclose()
            except BaseException:
                if stdin is not None:
                    with trio.CancelScope(shield=True):
                        await stdin.aclose()
                raise
            else:
                return self.zygote.child(pid, stdin, start), spec[written:]
            finally:
                os.close(stdin_r)
        os.makedirs(cwd, 0o700, exist_ok=True)
        log_fd = open_job_log(log_path)
        try:
            proc = await trio.lowlevel.open_process(
                # -P: the job's working directory must not shadow our modules on sys.path.
                [self.python, "-P", "-m", "semantica.runner"],
                stdin=-1,  # subprocess.PIPE
                stdout=log_fd,
                stderr=log_fd,
                cwd=cwd,
                env=env,
                start_new_session=True,
                pass_fds=(result_fd,),
                umask=0o077,
            )
        finally:
            os.close(log_fd)
        return proc, spec

    def _not_started(self, exc: OSError, log_path: str) -> Outcome:
        """The attempt fails, to be retried by the policy; the job log says why."""
        message = f"the runner could not be started: {exc}"
        log.warning("runner_not_started", error=str(exc))
        with contextlib.suppress(OSError):
            log_fd = open_job_log(log_path)
            try:
                os.write(log_fd, f"semantica: {message}\n".encode())
            finally:
                os.close(log_fd)
        return Outcome(error_kind="spawn", error_message=message)

    def _plugin_path(self) -> dict[str, str]:
        """The daemon's PYTHONPATH, where it may have found plugins it lists: runners
        search it too, without PYTHONPATH entering the job's environment."""
        path = self.daemon_env.get("PYTHONPATH", "")
        entries = [os.path.abspath(p) for p in path.split(os.pathsep) if p]
        return {"SEMANTICA_PLUGIN_PATH": os.pathsep.join(entries)} if entries else {}

    def _rlimits(self, job: Job | None) -> str:
        """The sandbox's limits; CPU seconds follow the job's deadline (a WARM worker,
        started without a job, sets its CPU limit per job)."""
        limits = {
            "as": self.limits.address_space_bytes,
            "nofile": self.limits.open_files,
            "nproc": self.limits.processes,
        }
        if job is not None:
            limits["cpu"] = self.cpu_seconds(job)
        return _encode(limits).decode()

    def cpu_seconds(self, job: Job) -> int:
        return math.ceil(job.deadline_ms / 1000) + self.limits.cpu_slack_s

    async def _feed_spec(self, proc: trio.Process | ZygoteChild, spec: bytes) -> None:
        assert proc.stdin is not None
        try:
            await proc.stdin.send_all(spec)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the runner died before reading: its exit status tells why
        finally:
            await proc.stdin.aclose()

    async def _read_messages(
        self,
        stream: trio.lowlevel.FdStream,
        on_progress: Callable[[float, str | None], None],
        result: list[Result],
        closed: trio.Event,
    ) -> None:
        try:
            await self._read_lines(stream, on_progress, result)
        finally:
            closed.set()

    async def _read_lines(
        self,
        stream: trio.lowlevel.FdStream,
        on_progress: Callable[[float, str | None], None],
        result: list[Result],
    ) -> None:
        reader = MessageReader(stream)
        while (message := await reader.next_result(on_progress)) is not None:
            result.append(message)

    async def _stop(self, proc: trio.Process) -> None:
        """TERM the runner's process group, then KILL whatever is left after the grace."""
        kill_process_group(proc.pid, signal.SIGTERM)
        with trio.move_on_after(KILL_GRACE_S):
            await proc.wait()
        # Grandchildren may outlive the leader: the group is killed either way.
        kill_process_group(proc.pid, signal.SIGKILL)
        await proc.wait()

    def _outcome(
        self, returncode: int | None, result: Result | None, deadline_hit: bool, job: Job
    ) -> Outcome:
        if deadline_hit:
            return Outcome(
                error_kind="deadline",
                error_message=f"still running after deadline_ms={job.deadline_ms}: stopped",
                exit_code=returncode,
            )
        if result is not None and returncode == 0:
            return Outcome(
                error_kind=None if result.error_kind is None else result.error_kind,
                error_message=result.error_message,
                exit_code=0 if result.exit_code is None else result.exit_code,
                result_summary=result.result_summary,
                artifacts=result.artifacts,
                permanent=result.permanent,
                retry_after_ms=result.retry_after_ms,
            )
        if returncode is not None and returncode < 0:
            name = signal.Signals(-returncode).name if -returncode in signal.valid_signals() else ""
            return Outcome(
                error_kind="signal",
                error_message=f"the runner was killed by signal {-returncode} {name}".strip(),
                exit_code=returncode,
            )
        return Outcome(
            error_kind="exit",
            error_message=(
                f"the runner exited with status {returncode} without a result: "
                f"see {self.log_path(job.id)}"
            ),
            exit_code=returncode,
        )


def kill_orphaned_runner(pid: int, start_time_ms: int | None) -> list[int]:
    """Stop what is left of a runner from a previous daemon: its process group.

    The group id is the runner's PID (each runner leads its own session). While any
    member lives, the kernel keeps that id from being reused, so signalling the group
    reaches only the job's processes; members older than the recorded start time are
    spared all the same. Returns the PIDs signalled.

    A live process with that PID but another start time is not the runner: the PID
    was reused, which the kernel allows only once the job's group is empty, so
    nothing of the job is left and that process (its own group's leader perhaps)
    is left alone.
    """
    if start_time_ms:
        now_started = process_start_time(pid)
        # Only later: a reused PID belongs to a process started after the runner. (An
        # earlier reading is the runner itself, seen through a wall clock stepped back.)
        if now_started is not None and now_started > start_time_ms + START_TIME_SLACK_MS:
            return []
    members = group_members(pid, started_after_ms=start_time_ms)
    if not members:
        return []
    pids = [p.pid for p in members]
    for proc in members:
        with contextlib.suppress(psutil.Error):
            proc.terminate()
    alive = _still_running(members, KILL_GRACE_S)
    for proc in alive:
        with contextlib.suppress(psutil.Error):
            proc.kill()
    _still_running(alive, KILL_GRACE_S)
    return pids


def _still_running(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    """Those of `procs` still running after up to `timeout` seconds. A zombie counts as
    gone: these are not our children, and whoever reaps them (init, which in some
    containers never does) is not ours to wait for, as psutil.wait_procs would."""

    def running(proc: psutil.Process) -> bool:
        try:
            return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
        except psutil.Error:
            return False

    deadline = time.monotonic() + timeout
    while (alive := [p for p in procs if running(p)]) and time.monotonic() < deadline:
        time.sleep(0.005)
    return alive


def is_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as exc:
        return exc.errno == errno.ESRCH
    return False


# --------------------------------------------------------------------------- WARM


class WarmWorker:
    """A long-lived runner and its channels: forked by the zygote, or a new
    interpreter (`python -m semantica.runner --warm`) when there is no zygote."""

    def __init__(
        self,
        proc: trio.Process | ZygoteChild,
        results: trio.lowlevel.FdStream,
        start_time: int | None = None,
    ) -> None:
        self.proc = proc
        self.pid = proc.pid
        self.start_time = start_time or process_start_time(proc.pid) or 0  # Unix ms
        self.reader = MessageReader(results)
        self.jobs_done = 0
        try:
            self._process: psutil.Process | None = psutil.Process(proc.pid)
        except psutil.Error:
            self._process = None

    def has_children(self) -> bool:
        """Whether a job left a process behind (then the worker is not reused)."""
        try:
            with open(f"/proc/{self.pid}/task/{self.pid}/children", "rb") as f:
                return bool(f.read().strip())
        except OSError:
            try:
                return bool(psutil.Process(self.pid).children())
            except psutil.Error:
                return True

    def rss_bytes(self) -> int:
        try:
            return self._process.memory_info().rss if self._process else 0
        except psutil.Error:
            return 0

    def alive(self) -> bool:
        """Whether the worker may still take a job, as far as is known now."""
        proc = self.proc
        if isinstance(proc, ZygoteChild):
            return proc.returncode is None and not proc.zygote_gone()
        return proc.returncode is None

    def drop(self) -> None:
        """Forget a worker found dead while idle: what its jobs left in its group is
        killed, and its channels are closed."""
        kill_process_group(self.pid, signal.SIGKILL)
        self.reader.stream.close()
        if self.proc.stdin is not None:
            self.proc.stdin.close()

    async def kill(self) -> None:
        """Stop the worker and everything a job started in its group."""
        with trio.CancelScope(shield=True):
            if self.proc.returncode is None:
                kill_process_group(self.pid, signal.SIGTERM)
                with trio.move_on_after(KILL_GRACE_S):
                    await self.proc.wait()
            kill_process_group(self.pid, signal.SIGKILL)
            await self.proc.wait()
            await self.reader.stream.aclose()
            if self.proc.stdin is not None:
                await self.proc.stdin.aclose()

    async def retire(self) -> None:
        """End the worker between jobs: EOF on its control channel, then make sure."""
        with trio.CancelScope(shield=True):
            if self.proc.stdin is not None:
                await self.proc.stdin.aclose()
            with trio.move_on_after(KILL_GRACE_S):
                await self.proc.wait()
            await self.kill()


class WarmPool:
    """WARM mode: runner processes reused across jobs, one job at a time each.

    A worker starts on first need and goes back to the pool after each job; it is
    retired after `max_jobs` jobs, past `max_rss_bytes`, or when a job left a process
    behind. One that dies, overruns a deadline or is cancelled is killed with its
    process group and simply not reused: the next job gets a new one. Each worker has
    the same sandbox as a fresh runner (own session, allowlisted environment, umask
    077, resource limits); the job's `env`, working directory, log file and CPU
    allowance are set in the worker for each job. Workers are forked by the zygote
    where there is one, else each is a new interpreter.
    """

    def __init__(self, launcher: Launcher, *, max_jobs: int, max_rss_bytes: int) -> None:
        self.launcher = launcher
        self.max_jobs = max_jobs
        self.max_rss_bytes = max_rss_bytes
        self.idle: list[WarmWorker] = []
        self.started = 0
        self._spawning = False  # a worker is being started ahead (get_worker_ready)
        # Why the last worker started ahead could not be (None: it could): claims
        # then go ahead without a worker, and each job's run starts one itself.
        self.spawn_failed: str | None = None

    async def run(
        self,
        job: Job,
        spec: RunSpec,
        cwd: str,
        log_path: str,
        on_started: Callable[[int, int], None],
        on_progress: Callable[[float, str | None], None],
        worker: WarmWorker | None = None,
    ) -> Outcome:
        recorded = worker is not None
        if worker is None:
            worker = self.reserve() or await self._spawn()
        reusable = False
        result: Result | None = None
        deadline_hit = False
        try:
            if not recorded:
                on_started(worker.pid, worker.start_time)
            line = _encode(
                WarmJob(
                    spec=spec,
                    env=job.env,
                    cwd=cwd,
                    log_path=log_path,
                    cpu_seconds=self.launcher.cpu_seconds(job),
                )
            )
            assert worker.proc.stdin is not None
            # If it died meanwhile, the channel's EOF says so below.
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await send_line(worker.proc.stdin, line + b"\n")
            with trio.move_on_after(job.deadline_ms / 1000) as deadline:
                result = await worker.reader.next_result(on_progress)
            deadline_hit = deadline.cancelled_caught
            if result is not None and not deadline_hit:
                worker.jobs_done += 1
                reusable = not result.worker_exits and self._still_fit(worker, result)
                if result.worker_exit_reason is not None:
                    log.event(
                        "warm_worker_recycled",
                        pid=worker.pid,
                        job_id=job.id,
                        reason=result.worker_exit_reason,
                    )
        finally:
            if reusable:
                self.idle.append(worker)
            elif result is not None and not deadline_hit:
                await worker.retire()
            else:
                await worker.kill()
        if result is None and not deadline_hit:  # the worker died during the job
            return self.launcher._outcome(worker.proc.returncode, None, False, job)
        return self.launcher._outcome(0 if result else None, result, deadline_hit, job)

    def reserve(self) -> WarmWorker | None:
        """An idle worker, taken out of the pool for a job about to be claimed (its
        PID is recorded with the claim); `give_back` it if no WARM job came. One
        that died while it waited (killed, or gone with the zygote that forked it)
        is dropped here, not handed a job that would fail with it."""
        if self.idle and self.launcher.zygote is not None:
            self.launcher.zygote.read_ready()  # the exits it reported, or its own end
        while self.idle:
            worker = self.idle.pop()
            if worker.alive():
                return worker
            log.event(
                "warm_worker_gone",
                level=logging.WARNING,
                pid=worker.pid,
                status=worker.proc.returncode,
                advice="it died while idle; the next WARM job gets another worker",
            )
            worker.drop()
        return None

    def give_back(self, worker: WarmWorker) -> None:
        self.idle.append(worker)

    def get_worker_ready(self, nursery: trio.Nursery, ready: Callable[[], None]) -> None:
        """In the background: start one more worker and put it in the pool, then call
        `ready`: a WARM job is claimed with its worker's PID recorded, never as
        RUNNING without a process."""
        if not self._spawning:
            self._spawning = True
            self.launcher.in_background(nursery, lambda: self._spawn_ahead(ready))

    async def _spawn_ahead(self, ready: Callable[[], None]) -> None:
        try:
            worker = await self._spawn()
        except Exception as exc:  # never the daemon's end: each job then tries itself
            self.spawn_failed = str(exc)
            log.event(
                "warm_worker_not_started",
                level=logging.WARNING,
                exc_info=not isinstance(exc, OSError),
                error=str(exc),
                advice="WARM jobs start anyway, each trying to start its worker; "
                "check the process and file limits",
            )
        else:
            self.idle.append(worker)
        finally:
            self._spawning = False
            ready()

    def starting(self) -> str | None:
        """What a WARM job waits for while a worker is got ready, or None."""
        return "a WARM worker is starting" if self._spawning else None

    def _still_fit(self, worker: WarmWorker, result: Result) -> bool:
        """Whether to reuse the worker: by its own report after the job where it
        gives one (Linux), else by looking at it from here."""
        if worker.jobs_done >= self.max_jobs:
            log.debug("warm_worker_recycled", pid=worker.pid, reason="max_jobs")
            return False
        left_process = result.worker_children
        if left_process is None:
            left_process = worker.has_children()
        if left_process:
            log.event("warm_worker_recycled", pid=worker.pid, reason="a job left a process")
            return False
        rss = result.worker_rss_bytes
        if rss is None:
            rss = worker.rss_bytes()
        if rss > self.max_rss_bytes:
            log.event("warm_worker_recycled", pid=worker.pid, reason="memory ceiling")
            return False
        return True

    async def _spawn(self) -> WarmWorker:
        """A new worker, once it says it is ready: forked by the zygote (a few
        milliseconds, its plugins already imported), or a new interpreter
        (100 ms and more) when the zygote is off or cannot be had."""
        launcher = self.launcher
        launcher.make_tree()
        worker = None
        if launcher.zygote is not None:
            worker = await self._fork(launcher.zygote)
        if worker is None:
            worker = await self._start_interpreter()
        proc = worker.proc
        try:
            with trio.move_on_after(WARM_READY_TIMEOUT_S) as waiting:
                await worker.reader.wait_ready()
        except BaseException:
            await worker.kill()
            raise
        if not worker.reader.ready:
            await worker.kill()
            why = (
                f"was not ready after {WARM_READY_TIMEOUT_S:g} s"
                if waiting.cancelled_caught
                else f"exited with status {proc.returncode} before it was ready"
            )
            raise OSError(
                f"the WARM worker (pid {proc.pid}) {why}: see the daemon's log for its own message"
            )
        self.started += 1
        self.spawn_failed = None
        log.debug("warm_worker_started", pid=proc.pid)
        return worker

    async def _fork(self, zygote: Zygote) -> WarmWorker | None:
        """A worker forked by the zygote, or None if the zygote is gone (then a new
        interpreter it is). A fork the zygote refused (the process limit) fails."""
        launcher = self.launcher
        env = runner_environment(launcher.daemon_env, launcher.env_allowlist, {})
        control_r, control_w = os.pipe()
        try:
            result_r, result_w = os.pipe()
        except BaseException:
            os.close(control_r)
            os.close(control_w)
            raise
        try:
            pid, start = await zygote.spawn(
                env, str(launcher.work_dir), None, launcher._rlimits(None), (control_r, result_w)
            )
        except BaseException as exc:
            os.close(control_w)
            os.close(result_r)
            if isinstance(exc, ZygoteGone):
                return None
            raise
        finally:
            os.close(control_r)
            os.close(result_w)
        proc = zygote.child(pid, trio.lowlevel.FdStream(control_w), start)
        return WarmWorker(proc, trio.lowlevel.FdStream(result_r), start)

    async def _start_interpreter(self) -> WarmWorker:
        launcher = self.launcher
        env = runner_environment(launcher.daemon_env, launcher.env_allowlist, {})
        env["SEMANTICA_RLIMITS"] = launcher._rlimits(None)
        env["SEMANTICA_PARENT_PID"] = str(os.getpid())
        env.update(launcher._plugin_path())
        read_fd, write_fd = os.pipe()
        env["SEMANTICA_RESULT_FD"] = str(write_fd)
        try:
            proc = await trio.lowlevel.open_process(
                [launcher.python, "-P", "-m", "semantica.runner", "--warm"],
                stdin=-1,  # subprocess.PIPE: the control channel
                stdout=subprocess.DEVNULL,  # each job points them at its own log;
                stderr=None,  # before the first job, trouble goes to the daemon's log
                cwd=launcher.work_dir,
                env=env,
                start_new_session=True,
                pass_fds=(write_fd,),
                umask=0o077,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)
        return WarmWorker(proc, trio.lowlevel.FdStream(read_fd))

    async def close(self) -> None:
        """Retire the idle workers (the daemon is stopping)."""
        idle, self.idle = self.idle, []
        for worker in idle:
            await worker.retire()


# --------------------------------------------------------------------------- zygote


class ZygoteChild:
    """A runner forked by the zygote: what the launcher needs of a trio.Process."""

    def __init__(
        self,
        pid: int,
        stdin: trio.lowlevel.FdStream | None,
        zygote: Zygote,
        start_time: int | None = None,
    ) -> None:
        self.pid = pid
        self.start_time = start_time  # known for a spare; else read when needed
        self.stdin = stdin
        self.returncode: int | None = None
        self.exited = trio.Event()
        self._zygote = zygote

    async def wait(self) -> int | None:
        while not self.exited.is_set():
            try:
                await self._zygote.pump(self.exited)
            except ZygoteGone:
                self.lost()
        return self.returncode

    def zygote_gone(self) -> bool:
        """Whether the zygote that forked it has gone (its children with it), seen
        before the task that acts on it has marked them lost."""
        return self._zygote._gone is not None

    def lost(self) -> None:
        """The zygote went before reporting this child's exit: stop it, count it killed
        (its parent-death signal kills it too)."""
        if not self.exited.is_set():
            kill_process_group(self.pid, signal.SIGKILL)
            self.returncode = -signal.SIGKILL
            self.exited.set()


def _zygote_message(data: bytes) -> dict | None:
    """A message read from the zygote's socket; None for EOF."""
    return msgspec.json.decode(data) if data else None


_NEVER = trio.Event()  # for waiters whose condition the loop around pump() checks


class ZygoteGone(Exception):
    """The zygote could not start or has died: spawn the runner directly instead."""


class ForkUnknown(OSError):
    """The zygote went after it was asked to fork this runner: a runner may have
    started with the job's spec (and dies with the zygote). The attempt fails, to be
    retried by the policy, rather than start a second runner at once."""


class ForkFailed(OSError):
    """The zygote could not fork this runner (EAGAIN at the process limit...); it
    carries on, and the attempt fails like any process that cannot start."""


class Zygote:
    """The daemon's end of `python -m semantica.zygote` (see zygote.py).

    Requests go one at a time (a lock). Whoever waits for a reply or an exit reads the
    socket for everyone while no other task does, handing `spawned` replies and
    `exited` reports on; the others wait for that, so no background task is needed.
    """

    def __init__(self, launcher: Launcher) -> None:
        self.launcher = launcher
        self.sock: trio.socket.SocketType | None = None
        self._raw: socket.socket | None = None  # the same socket, for reads that never wait
        self._reader: trio.CancelScope | None = None  # around the wait of pump()'s reader
        self._gone: str | None = None  # why the zygote is gone, seen by read_ready()
        self.proc: trio.Process | None = None
        self._request_lock = trio.Lock()
        self._reading = False  # one task reads the socket for all; the others wait
        self._changed = trio.Event()  # set (and replaced) after each message read
        self._spawned: list[int | str] = []  # pids, or why a fork failed, in request order
        self._children: dict[int, ZygoteChild] = {}
        self._early_exits: dict[int, int] = {}
        # The zygote's spares (pid -> start time): processes forked ahead, each for a
        # request that names it. Reserved by a claim that recorded it, until the
        # reply to its job's request (or that job's end) frees it.
        self._spares: dict[int, int] = {}
        self._reserved: set[int] = set()
        # Why claims do not wait for a spare now (None: they do): the zygote could not
        # start, or said it cannot fork a spare (until its next one), or none came.
        self._no_spare: str | None = None
        self._awaiting_spare = False  # a task is getting a spare ready (get_spare_ready)
        self._ready = False  # the zygote said it is ready (it has imported the plugins)

    async def _start(self) -> None:
        launcher = self.launcher
        try:
            launcher.make_tree()
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        except OSError as exc:  # out of file descriptors, say
            raise ZygoteGone(f"cannot start the zygote: {exc}") from None
        env = runner_environment(launcher.daemon_env, launcher.env_allowlist, {})
        env["SEMANTICA_RLIMITS"] = launcher._rlimits(None)
        env["SEMANTICA_PARENT_PID"] = str(os.getpid())
        env.update(launcher._plugin_path())
        env["SEMANTICA_ZYGOTE_FD"] = str(theirs.fileno())
        env["SEMANTICA_ZYGOTE_SPARES"] = str(launcher.spares)
        try:
            self.proc = await trio.lowlevel.open_process(
                [launcher.python, "-P", "-m", "semantica.zygote"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=None,  # the zygote's own trouble goes to the daemon's stderr
                cwd=launcher.work_dir,
                env=env,
                start_new_session=True,
                pass_fds=(theirs.fileno(),),
                umask=0o077,
            )
        except OSError as exc:
            ours.close()
            raise ZygoteGone(f"cannot start the zygote: {exc}") from None
        finally:
            theirs.close()
        self.sock = trio.socket.from_stdlib_socket(ours)
        self._raw = ours
        with trio.move_on_after(ZYGOTE_START_TIMEOUT_S):
            message = await self._receive()
            if message is not None and "ready" in message:
                log.event("zygote_started", pid=self.proc.pid)
                self._no_spare = None
                self._ready = True
                return
        await self.close()
        raise ZygoteGone("the zygote did not say it was ready")

    async def spawn(
        self,
        env: dict[str, str],
        cwd: str,
        log_path: str | None,
        rlimits: str,
        fds: tuple[int, int],
        recorded: int | None = None,
    ) -> tuple[int, int | None]:
        """Fork a runner with these (stdin, result) fds, its output appended to
        `log_path`; returns its pid, and its start time if it is a spare (read when
        the spare was announced). `recorded`: the pid the job's claim recorded (the
        spare reserved for it, if it is one). `log_path` None: a WARM worker, its
        first fd the control channel its jobs come on."""
        async with self._request_lock:
            if self.sock is None:
                await self._start()
            assert self.sock is not None
            self.read_ready()
            if self._gone is not None:  # before any request: a new interpreter instead
                await self._died(self._gone)
            spare = self._spare_for(recorded)
            request = _encode(
                {
                    "env": env,
                    "cwd": cwd,
                    "log_path": log_path,
                    "rlimits": rlimits,
                    "spare": spare,
                }
            )
            # Not cancellable half-way: a reply left unread would be taken as the
            # next request's, and a child forked for nobody would run.
            with trio.CancelScope(shield=True):
                with trio.move_on_after(ZYGOTE_REPLY_TIMEOUT_S):
                    try:
                        await self.sock.sendmsg(
                            [request],
                            [
                                (
                                    socket.SOL_SOCKET,
                                    socket.SCM_RIGHTS,
                                    array.array("i", fds).tobytes(),
                                )
                            ],
                        )
                    except OSError as exc:
                        await self._died(f"sending to the zygote failed: {exc}")
                    try:
                        while not self._spawned:
                            await self.pump(_NEVER)
                    except ZygoteGone as exc:
                        raise ForkUnknown(str(exc)) from None
                    reply = self._spawned.pop(0)
                    start = None
                    if spare is not None:  # it has this job, or it was gone
                        start = self._spares.pop(spare, None)
                        self._reserved.discard(spare)
                    if isinstance(reply, str):
                        raise ForkFailed(f"the zygote's {reply}")
                    return reply, start if reply == spare else None
                try:
                    await self._died(f"no reply from the zygote in {ZYGOTE_REPLY_TIMEOUT_S:g} s")
                except ZygoteGone as exc:
                    raise ForkUnknown(str(exc)) from None
                raise AssertionError("unreachable: _died raises")

    def reserve_spare(self) -> tuple[int, int] | None:
        """(pid, start time) of a spare, for the claim of a SUBPROCESS job to record:
        that job's request will name it. None if every spare is reserved (or none
        is known). `give_back_spare` it if no SUBPROCESS job was claimed."""
        self.read_ready()
        pid = self._free_spare()
        return None if pid is None else (pid, self._spares[pid])

    def keeps_spares(self) -> bool:
        """Whether a SUBPROCESS claim should wait for a spare, to record its process
        with the claim: spares are configured, and the zygote runs (or is to be
        started) and has not said it cannot fork one now."""
        return self.launcher.spares > 0 and self._no_spare is None

    def get_spare_ready(self, nursery: trio.Nursery, ready: Callable[[], None]) -> None:
        """In the background: start the zygote if it is not running, and wait for a
        spare no claim has reserved; then call `ready`. If none can be had (the
        zygote cannot start, dies, says it cannot fork one, or is silent for
        SPARE_WAIT_S), claims go ahead without one until the next spare."""
        if not self._awaiting_spare:
            self._awaiting_spare = True
            self.launcher.in_background(nursery, lambda: self._await_spare(ready))

    async def _await_spare(self, ready: Callable[[], None]) -> None:
        try:
            if self.sock is None:
                async with self._request_lock:
                    if self.sock is None:
                        await self._start()  # within its own ZYGOTE_START_TIMEOUT_S
            with trio.move_on_after(SPARE_WAIT_S) as waited:
                while self.keeps_spares() and not self.has_free_spare():
                    await self.pump(_NEVER)
            if waited.cancelled_caught and not self.has_free_spare():
                self._no_spare = f"no spare from the zygote in {SPARE_WAIT_S:g} s"
        except ZygoteGone as exc:
            self._no_spare = str(exc)
        except Exception as exc:  # never the daemon's end: jobs go ahead without a spare
            self._no_spare = repr(exc)
            log.error(
                "zygote_spare_not_ready",
                error=repr(exc),
                advice="SUBPROCESS jobs start without a spare; please report it",
                exc_info=True,
            )
        finally:
            self._awaiting_spare = False
            ready()

    def has_free_spare(self) -> bool:
        """Whether the zygote has forked a spare that no claim has reserved (none
        while it is not running: its spares are forgotten when it closes)."""
        self.read_ready()
        return self._unreserved_spare() is not None

    def starting(self) -> str | None:
        """What a SUBPROCESS job waits for while its process is got ready, or None."""
        if not self._awaiting_spare:
            return None
        if not self._ready:
            return "the zygote that forks runner processes is starting"
        return "the zygote is forking its runner process"

    def give_back_spare(self, pid: int) -> None:
        """Free a reservation: no SUBPROCESS job was claimed with it, or the job that
        recorded it ended without asking for its process (cancelled first...)."""
        self._reserved.discard(pid)
        if self._awaiting_spare:  # a task waiting for a free spare has one now
            if self._reader is not None:
                self._reader.cancel()
            self._tell_changed()

    def _spare_for(self, recorded: int | None) -> int | None:
        """The spare a request should name: the one its claim recorded, else one no
        claim has reserved (taken now), else none (the zygote forks for it)."""
        if recorded in self._spares:
            return recorded
        return self._free_spare()

    def _free_spare(self) -> int | None:
        """Reserve a spare no claim has reserved, if there is one."""
        pid = self._unreserved_spare()
        if pid is not None:
            self._reserved.add(pid)
        return pid

    def _unreserved_spare(self) -> int | None:
        return next((pid for pid in self._spares if pid not in self._reserved), None)

    def child(
        self, pid: int, stdin: trio.lowlevel.FdStream | None, start_time: int | None = None
    ) -> ZygoteChild:
        proc = ZygoteChild(pid, stdin, self, start_time)
        if pid in self._early_exits:
            proc.returncode = self._early_exits.pop(pid)
            proc.exited.set()
        elif self.sock is None:  # the zygote died since it forked this child
            proc.lost()
        else:
            self._children[pid] = proc
        return proc

    async def pump(self, until: trio.Event) -> None:
        """Return once `until` may have been set: after the next message is read and
        handed on, by this task if no other is reading, else by the one that is (or
        by `read_ready`, which wakes the reader)."""
        if until.is_set():
            return
        if self._reading:
            await self._changed.wait()
            return
        if self._gone is not None:
            await self._died(self._gone)
        if self.sock is None:
            raise ZygoteGone("the zygote is not running")
        self._reading = True
        try:
            with trio.CancelScope() as self._reader:
                data = await self.sock.recv(65536)
            if not self._reader.cancelled_caught:  # else read_ready() took what came
                self._handle(_zygote_message(data))
                if self._gone is not None:
                    await self._died(self._gone)
        finally:
            self._reader = None
            self._reading = False
            self._tell_changed()

    def read_ready(self) -> None:
        """Handle, without waiting, what the zygote has said that no task has read:
        a claim or a request then knows the spares forked or gone meanwhile (while no
        runner runs, nobody reads the socket). A task waiting in pump() is woken to
        look at what it waits for."""
        if self._raw is None:
            return
        handled = False
        while self._gone is None:
            try:
                data = self._raw.recv(65536, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                self._gone = f"reading from the zygote failed: {exc}"
                break
            handled = True
            self._handle(_zygote_message(data))
        if handled or self._gone is not None:
            if self._reader is not None:
                self._reader.cancel()
            self._tell_changed()

    def _tell_changed(self) -> None:
        changed, self._changed = self._changed, trio.Event()
        changed.set()

    def _handle(self, message: dict | None) -> None:
        """One message from the zygote; its death is noted in `_gone` for the next
        task that can wait to act on (pump, spawn)."""
        if message is None:
            self._gone = "the zygote closed its socket"
        elif "spawned" in message:
            self._spawned.append(message["spawned"])
        elif "spare_gone" in message:
            self._spares.pop(message["spare_gone"], None)
            self._reserved.discard(message["spare_gone"])
        elif "spare" in message:
            start = process_start_time(message["spare"])
            if start is not None:  # else it is gone already
                self._spares[message["spare"]] = start
                self._no_spare = None
        elif "no_spare" in message:
            self._no_spare = str(message["no_spare"])
        elif "failed" in message:
            self._spawned.append(str(message["failed"]))
        elif "exited" in message:
            pid, status = message["exited"], message["status"]
            proc = self._children.pop(pid, None)
            if proc is None:
                self._early_exits[pid] = status  # before `child()` registered it
            else:
                proc.returncode = status
                proc.exited.set()
        elif "refused" in message:
            self._gone = f"the zygote refused a request: {message['refused']}"

    async def _receive(self) -> dict | None:
        assert self.sock is not None
        return _zygote_message(await self.sock.recv(65536))

    async def _died(self, why: str) -> None:
        log.warning("zygote_gone", reason=why, advice="runners start without it until it is back")
        orphans, self._children = self._children, {}
        for proc in orphans.values():
            proc.lost()
        await self.close()
        raise ZygoteGone(why)

    async def close(self) -> None:
        self._ready = False
        self._spares.clear()
        self._reserved.clear()
        self._raw = None
        self._gone = None
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            with trio.CancelScope(shield=True):
                with trio.move_on_after(KILL_GRACE_S):
                    await self.proc.wait()
                if self.proc.returncode is None:
                    kill_process_group(self.proc.pid, signal.SIGKILL)
                    await self.proc.wait()
            self.proc = None
