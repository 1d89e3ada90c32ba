"""The runner zygote: a pre-started, single-threaded* process that has imported the
runner and every plugin, and forks one fresh process per SUBPROCESS job, and the
WARM pool's workers.

A new interpreter costs ~100 ms of CPU before it runs a line of a job; a fork of this
process and its exit cost 1-3 ms by the host (bench/exec_bench.py measures it), and
the child starts with the plugins imported.
Each child is still a fresh process for one job: its own session and process group,
the job's environment, directory, log, resource limits and parent watch, set up
exactly as `python -m semantica.runner` would.

Protocol, on a SOCK_SEQPACKET Unix socket (fd `SEMANTICA_ZYGOTE_FD`) to the daemon:
  -> {"env": {...}, "cwd": "...", "log_path": "...", "rlimits": "<json>",
      "spare": pid | null} with two fds (SCM_RIGHTS): the job's stdin (the RunSpec)
     and its result channel; the child makes its working directory and opens its
     log (stdout and stderr). "spare": run it on that spare (see below)
  -> {..., "log_path": null}: the child becomes a WARM worker instead
     (runner.serve_warm), its first fd the control channel its jobs come on; its
     stdout is /dev/null and its stderr the zygote's (the daemon's log) until its
     first job points both at that job's log
  <- {"spawned": pid}          (in request order)
  <- {"failed": "why"}         (instead, when the fork failed: EAGAIN at the process
                                limit, ENOMEM; that job only, the zygote carries on)
  <- {"exited": pid, "status": code}   (negative: killed by that signal)
  <- {"ready": pid}            (once, at start)
  <- {"spare": pid}            (a process forked ahead, for a request naming it)
  <- {"spare_gone": pid}       (it died while it waited: no request can name it)
EOF on the socket: the daemon is gone or done; the zygote exits.

Processes are forked ahead (spares, `SEMANTICA_ZYGOTE_SPARES` of them, one per
worker slot): each leaves the zygote's session and waits on a socket of its own. A
request naming one goes to it, so the request is answered without waiting for a
fork (the daemon names the spare it recorded with the job's claim, or one no claim
has reserved). Spares are forked again while no request waits, so a fork is off the
path from the daemon's request to a running job. A request naming no spare, or one
that is gone (killed while it waited), forks a child for itself, as when no spare
can be forked (at the process limit). A spare's exit is not reported until it has
a job.

The zygote is a child subreaper (Linux): what a runner forked and left behind is
re-parented to it and reaped here, so a killed fork bomb's processes do not linger as
zombies holding the user's process slots where init does not reap them. Only the
exits of the runners it forked are reported.

When the daemon is gone (EOF on the socket, or its PID exits), the zygote stops
every runner's process group (TERM, then KILL after a grace) before it exits; each
runner also has SIGKILL as its parent-death signal, should the zygote itself be
killed.

* Apart from the thread that watches the daemon's PID (runner.watch_parent); a
  forked child has only the forking thread, as POSIX says.
"""

from __future__ import annotations

import array
import contextlib
import gc
import math
import os
import select
import signal
import socket
import sys
import threading
import time

import msgspec

from semantica import runner

ZYGOTE_FD_ENV = "SEMANTICA_ZYGOTE_FD"
SPARES_ENV = "SEMANTICA_ZYGOTE_SPARES"
SPARE_REFILL_AFTER_REFUSAL_S = 1.0
FDS_PER_JOB = 2
MAX_REQUEST_BYTES = 1024 * 1024


class SpawnRequest(msgspec.Struct, forbid_unknown_fields=True):
    env: dict[str, str]
    cwd: str
    log_path: str | None  # None: a WARM worker (each of its jobs opens its own log)
    rlimits: str
    spare: int | None = None  # run it on the spare of this pid (its claim recorded it)


_encode = msgspec.json.Encoder().encode
_decode_request = msgspec.json.Decoder(SpawnRequest).decode


def _preload_plugins() -> None:
    """Import every installed plugin now, so each child starts with them loaded."""
    for name, target in _entry_points():
        name = name.lower()
        if name in runner._loaded_plugins:
            continue  # the first one of a name wins, as in installed_runners()
        try:
            plugin = _load_target(target)
        except (Exception, SystemExit):  # the child that needs it reports why, in its log
            continue
        if callable(plugin):
            runner._loaded_plugins[name] = plugin


def _entry_points() -> list[tuple[str, str]]:
    """(name, "module:attr") of every installed plugin, in entry point order.

    Read in a throwaway child: importlib.metadata and what it imports (email, zipfile,
    csv...) are about 5 MB of heap, and each fork copies the page tables of the whole
    heap, so the zygote must not hold them. A child that needs a plugin not preloaded
    still finds it through importlib.metadata itself (runner._load_plugin).
    """
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(read_fd)
            import importlib.metadata

            found = importlib.metadata.entry_points(group=runner.ENTRY_POINT_GROUP)
            data = _encode([(ep.name, ep.value) for ep in found])
            while data:
                data = data[os.write(write_fd, data) :]
            code = 0
        finally:
            os._exit(code)
    os.close(write_fd)
    with open(read_fd, "rb") as pipe:
        data = pipe.read()
    os.waitpid(pid, 0)
    try:
        return [(str(n), str(t)) for n, t in msgspec.json.decode(data)]
    except (msgspec.DecodeError, TypeError, ValueError):
        return []  # the children look each plugin up themselves


def _load_target(target: str) -> object:
    """What EntryPoint.load() returns for "package.module:attr.attr [extras]"."""
    import importlib

    module, _, attrs = target.partition(":")
    obj: object = importlib.import_module(module.strip())
    for attr in attrs.split("[", 1)[0].strip().split("."):
        if attr:
            obj = getattr(obj, attr)
    return obj


def _recv_request(sock: socket.socket) -> tuple[bytes, list[int]] | None:
    fds = array.array("i")
    data, ancdata, _flags, _addr = sock.recvmsg(
        MAX_REQUEST_BYTES, socket.CMSG_SPACE(FDS_PER_JOB * fds.itemsize)
    )
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if not data:
        for fd in fds:
            os.close(fd)
        return None
    return data, list(fds)


def _leave_zygote(inherited: list[int]) -> None:
    """In a forked child, first: its own session and process group, the default
    signal handling, and none of the zygote's sockets or pipes."""
    os.setsid()
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    if runner.parent_pidfd is not None:
        inherited = [*inherited, runner.parent_pidfd]  # the zygote's watch on the daemon
    for fd in inherited:
        with contextlib.suppress(OSError):
            os.close(fd)


def _spare(control: socket.socket, zygote_pid: int) -> None:
    """In a spare: wait for the request of the job this process will run, then run
    it as a child forked for it would. Never returns. EOF (the zygote is gone or
    stopping): exit."""
    code = 1
    try:
        received = _recv_request(control)
        control.close()
        if received is None:
            code = 0
        else:
            data, fds = received
            _child(_decode_request(data), fds, zygote_pid)
    finally:
        os._exit(code)


def _child(request: SpawnRequest, fds: list[int], zygote_pid: int) -> None:
    """In the forked child (after _leave_zygote): become the job's runner process,
    or a WARM worker (no `log_path`). Never returns."""
    code = 1
    try:
        if request.log_path is None:
            _warm_worker(request, fds, zygote_pid)
        else:
            _job_runner(request, request.log_path, fds, zygote_pid)
        code = 0
    except SystemExit as exc:  # a plugin's sys.exit(): its status, as a fresh runner's
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        runner._flush_std_streams()
        os._exit(code)


def _job_runner(request: SpawnRequest, log_path: str, fds: list[int], zygote_pid: int) -> None:
    """Run the one job whose spec comes on the first fd, its output in its log."""
    stdin_fd, result_fd = fds
    try:
        log_fd = runner.open_job_log(log_path)
    except OSError as exc:  # the attempt fails (and is retried) saying why
        message = f"the runner could not open the job log {log_path}: {exc}"
        runner.ResultChannel(result_fd).send(
            runner.Result(error_kind="spawn", error_message=message)
        )
        os._exit(0)
    os.dup2(stdin_fd, 0)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    for fd in (stdin_fd, log_fd):
        if fd > 2:
            os.close(fd)
    os.set_inheritable(result_fd, False)
    _enter_sandbox(request, zygote_pid)
    raw = runner._read_spec()
    try:
        spec = runner._decode_spec(raw)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        message = f"stdin did not hold a RunSpec ({len(raw)} bytes): {exc}"
        runner.ResultChannel(result_fd).send(
            runner._report(runner.Result(error_kind="bad_spec", permanent=True), message)
        )
        os._exit(0)
    runner.run_job(spec, result_fd)
    os.close(result_fd)
    runner._exit_despite_stray_threads()


def _warm_worker(request: SpawnRequest, fds: list[int], zygote_pid: int) -> None:
    """Be a WARM worker, with the sandbox a worker started as `python -m
    semantica.runner --warm` has (also a subreaper of what its jobs leave), its jobs
    coming on the first fd. Stdin and stdout stay the zygote's /dev/null."""
    control_fd, result_fd = fds
    os.set_inheritable(control_fd, False)
    os.set_inheritable(result_fd, False)
    _enter_sandbox(request, zygote_pid)
    runner._become_subreaper()
    runner.serve_warm(control_fd, result_fd, dict(os.environ))


def _enter_sandbox(request: SpawnRequest, zygote_pid: int) -> None:
    """The request's working directory, environment and limits, and SIGKILL once
    the zygote is gone (exit now if it is already)."""
    runner.enter_work_dir(request.cwd)
    runner.set_environment(request.env)
    runner.apply_rlimits(request.rlimits)
    if not runner.die_with_parent(zygote_pid):
        sys.stderr.write("semantica runner: the zygote is already gone: not starting\n")
        os._exit(1)


_spares_wanted = 1  # processes kept forked ahead (SEMANTICA_ZYGOTE_SPARES)
_children: set[int] = set()  # the runners forked here, until their exit is reported
_spares: set[int] = set()  # forked ahead, waiting for a job (their exits are not reported)
_stopping = threading.Lock()  # held to fork, and to stop the runners
_stopped = False


def _stop_children() -> None:
    """Stop every runner's process group: TERM, then KILL what is left after the
    grace. From the main loop (EOF) or the parent watch, whichever comes first."""
    global _stopped
    with _stopping:
        _stopped = True
        groups = list(_children | _spares)
        if not groups:
            return
        for pgid in groups:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGTERM)
        deadline = time.monotonic() + runner.PARENT_GONE_GRACE_S
        while groups and time.monotonic() < deadline:
            time.sleep(0.01)
            with contextlib.suppress(ChildProcessError):
                while (pid := os.waitpid(-1, os.WNOHANG)[0]) > 0:
                    _children.discard(pid)
                    _spares.discard(pid)
            groups = [g for g in groups if _group_exists(g)]
        for pgid in groups:
            with contextlib.suppress(OSError):
                os.killpg(pgid, signal.SIGKILL)
        _children.clear()
        _spares.clear()


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def _daemon_gone() -> None:
    _stop_children()
    os._exit(0)


def serve(sock: socket.socket) -> int:
    """The zygote's loop: fork on request, report exits, until the socket closes or
    can no longer be written (the daemon is gone either way: the runners are stopped)."""
    try:
        return _serve(sock)
    except (BrokenPipeError, ConnectionError):
        _stop_children()
        return 0


def _serve(sock: socket.socket) -> int:
    zygote_pid = os.getpid()
    children = _children
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a handler, so the wakeup fd fires
    sock.sendall(_encode({"ready": zygote_pid}))
    spares: dict[int, socket.socket] = {}  # pid -> the socket its request goes to

    def to_close() -> list[int]:  # in a forked child: none of the zygote's fds
        return [sock.fileno(), wake_r, wake_w, *(c.fileno() for c in spares.values())]

    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    poller.register(wake_r, select.POLLIN)
    refill_at = 0.0  # after a refused fork: not before then (monotonic seconds)
    while True:
        # Spares are forked while no request or exit waits to be handled. After a
        # refused fork (the process limit), not again for a while: a slot that frees
        # up is left to the jobs, not taken at once for a spare.
        timeout = None
        if len(spares) < _spares_wanted:
            timeout = max(0, math.ceil((refill_at - time.monotonic()) * 1000))
        events = poller.poll(timeout)
        if not events:
            forked = _fork_spare(zygote_pid, to_close(), sock)
            if forked is None:
                refill_at = time.monotonic() + SPARE_REFILL_AFTER_REFUSAL_S
                # The daemon's claims stop waiting for a spare until the next one.
                sock.sendall(_encode({"no_spare": "the zygote cannot fork a spare now"}))
            else:
                spares[forked[0]] = forked[1]
            continue
        for fd, _event in events:
            if fd == wake_r:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
                _report_exits(sock, children)
                continue
            received = _recv_request(sock)
            if received is None:  # the daemon is gone, or done (then no runner is left)
                _stop_children()
                return 0
            data, fds = received
            try:
                request = _decode_request(data)
                if len(fds) != FDS_PER_JOB:
                    raise ValueError(f"{len(fds)} fds instead of {FDS_PER_JOB}")
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError) as exc:
                for fd in fds:
                    os.close(fd)
                sock.sendall(_encode({"refused": str(exc)}))
                continue
            pid: int | str | None = None
            control = spares.pop(request.spare, None) if request.spare is not None else None
            if control is not None:
                pid = _hand_to_spare((request.spare, control), data, fds)  # None: gone
            if pid is None:
                pid = _fork_child(request, fds, zygote_pid, to_close())
            for fd in fds:
                os.close(fd)
            sock.sendall(_encode({"failed": pid} if isinstance(pid, str) else {"spawned": pid}))
        _report_exits(sock, children)
        for pid in [p for p in spares if p not in _spares]:  # killed while it waited
            spares.pop(pid).close()
            sock.sendall(_encode({"spare_gone": pid}))
            # Replaced after a pause, as after a refused fork: something (an OOM
            # killer) may be killing them.
            refill_at = time.monotonic() + SPARE_REFILL_AFTER_REFUSAL_S
            sock.sendall(_encode({"no_spare": "the zygote's spare was killed"}))


def _fork_spare(
    zygote_pid: int, inherited: list[int], sock: socket.socket
) -> tuple[int, socket.socket] | None:
    """Fork the process for the next job ahead of its request, and tell the daemon
    its pid (recorded with the claim of the job it will run): (pid, the socket its
    request goes to), or None when it cannot be forked now (the next request forks
    a child for itself then)."""
    try:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    except OSError:  # out of file descriptors: no spare for now
        return None
    with _stopping:
        try:
            if _stopped:
                raise OSError("the zygote is stopping")
            pid = os.fork()
        except OSError:
            ours.close()
            theirs.close()
            return None
        if pid == 0:
            _leave_zygote([*inherited, ours.fileno()])
            _spare(theirs, zygote_pid)
        _spares.add(pid)
    theirs.close()
    sock.sendall(_encode({"spare": pid}))
    return pid, ours


def _hand_to_spare(spare: tuple[int, socket.socket], data: bytes, fds: list[int]) -> int | None:
    """Pass a request to the spare (it becomes that job's runner): its pid, or None
    if it is gone (killed while it waited: it is reaped, not reported)."""
    pid, control = spare
    with _stopping:
        _spares.discard(pid)
        if _stopped:
            control.close()
            return None
        _children.add(pid)
    try:
        control.sendmsg(
            [data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        )
    except OSError:
        _children.discard(pid)
        return None
    finally:
        control.close()
    return pid


def _fork_child(
    request: SpawnRequest, fds: list[int], zygote_pid: int, inherited: list[int]
) -> int | str:
    """Fork a runner for this request: its pid, or why it could not be forked."""
    with _stopping:  # no fork while the runners are being stopped, or after
        try:
            if _stopped:
                raise OSError("the zygote is stopping: the daemon is gone")
            pid = os.fork()
        except OSError as exc:  # EAGAIN at the process limit, ENOMEM: this job only
            return f"fork failed: {exc}"
        if pid == 0:
            _leave_zygote(inherited)
            _child(request, fds, zygote_pid)
        _children.add(pid)
    return pid


def _report_exits(sock: socket.socket, children: set[int]) -> None:
    """Reap every exited child; report those of the runners this zygote forked (the
    others are what runners left behind, re-parented to this subreaper)."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        _spares.discard(pid)  # a spare killed while it waited: the next job forks anew
        if pid in children:
            children.discard(pid)
            sock.sendall(_encode({"exited": pid, "status": os.waitstatus_to_exitcode(status)}))


def main() -> int:
    try:
        fd = int(os.environ.pop(ZYGOTE_FD_ENV))
        sock = socket.socket(fileno=fd)
    except (KeyError, ValueError, OSError) as exc:
        sys.stderr.write(f"semantica zygote: no control socket ({exc}); the daemon starts it\n")
        return 2
    global _spares_wanted
    with contextlib.suppress(ValueError):
        _spares_wanted = max(0, int(os.environ.pop(SPARES_ENV, "1")))
    runner._drop_cwd_from_sys_path()
    runner._add_plugin_path()
    limits = os.environ.pop(runner.RLIMITS_ENV, None)
    if limits:
        runner.apply_rlimits(limits)
    parent = os.environ.pop(runner.PARENT_PID_ENV, None)
    if parent and not runner.watch_parent(int(parent), on_gone=_daemon_gone):
        return 1
    prepare_to_fork()
    return serve(sock)


def prepare_to_fork() -> None:
    """What every process forked from here starts with: this one a subreaper,
    SCHED_BATCH, every plugin and the logging machinery imported, the heap frozen.
    (bench/exec_bench.py forks from a process prepared the same way.)"""
    runner._become_subreaper()
    runner.run_as_batch()  # and so every runner it forks
    _preload_plugins()
    runner._job_logger()  # the logging machinery, imported once here
    # What is loaded now is shared with every child until written to. The collector
    # would write to all of it (a child's first collection copying the whole heap):
    # frozen, it leaves these objects alone.
    gc.collect()
    gc.freeze()


if __name__ == "__main__":
    sys.exit(main())
