"""A real daemon process on a temporary SEMANTICA_HOME, and raw ways to talk to it.

`start_daemon()` launches `python -m semantica.daemon` and waits for its sd_notify
READY=1 on a socket of our own, so tests never sleep-and-poll for readiness.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

import semantica

READY_TIMEOUT_S = 20.0
NOTIFY_POLL_S = 0.2  # how often a wait for an sd_notify message checks the daemon lives
PORT_ATTEMPTS = 3


def live_group_members(pgid: int) -> list[int]:
    """The processes of a process group that still run (zombies do not count)."""
    members = []
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) == pgid and proc.status() != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (OSError, psutil.Error):
            continue
    return members


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Daemon:
    def __init__(self, home: Path, env: dict[str, str], extra_args: list[str]) -> None:
        self.home = home
        self.env = env
        self.extra_args = extra_args
        self.socket_path = home / "semantica.sock"
        self.port = int(env["SEMANTICA_RPC_PORT"])
        self.proc: subprocess.Popen | None = None
        self.log_path = home.parent / "daemon.log"
        self._notify: socket.socket | None = None

    @property
    def token(self) -> str:
        return (self.home / "token").read_text().strip()

    def start(self, wait_ready: bool = True) -> Daemon:
        """Launch the daemon; with `wait_ready`, return once it is serving.

        `free_port()` lets its port go before the daemon binds it, and a test in
        another pytest-xdist worker (or any process's outgoing connection) may take
        it meanwhile. A daemon that exits because of that is started again on
        another free port; a port the test chose itself is never changed."""
        for attempt in range(PORT_ATTEMPTS):
            log_start = self.log_path.stat().st_size if self.log_path.exists() else 0
            self._launch()
            if not wait_ready:
                return self
            try:
                self.wait_for_notify("READY=1")
                return self
            except AssertionError:
                taken = f"cannot listen on 127.0.0.1:{self.port}: Address already in use"
                retry = (
                    self.port_chosen_for_us()
                    and attempt + 1 < PORT_ATTEMPTS
                    and self.proc is not None
                    and self.proc.poll() is not None
                    and taken in self.log_path.read_bytes()[log_start:].decode(errors="replace")
                )
                if not retry:
                    raise
                self._close_notify()
                self.port = self.env.picked_port = free_port()
                self.env["SEMANTICA_RPC_PORT"] = str(self.port)
        raise AssertionError("unreachable")

    def port_chosen_for_us(self) -> bool:
        """Whether the port is daemon_env's pick, which start() may replace (not one
        the test asked for)."""
        return isinstance(self.env, DaemonEnv) and self.env.picked_port == self.port

    def _launch(self) -> None:
        notify_path = str(self.home.parent / "notify.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(notify_path)
        self._notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._notify.bind(notify_path)
        env = {**self.env, "NOTIFY_SOCKET": notify_path}
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "semantica.daemon", *self.extra_args],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()

    def wait_for_notify(self, message: str, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait for an sd_notify message; fail at once if the daemon has exited
        without sending it (its last messages are read first)."""
        assert self._notify is not None
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            exited = self.proc is not None and self.proc.poll() is not None
            self._notify.settimeout(0 if exited else min(left, NOTIFY_POLL_S))
            try:
                got = self._notify.recv(4096).decode()
            except (TimeoutError, BlockingIOError):
                if exited:
                    raise AssertionError(
                        f"daemon exited ({self.proc.returncode}) without sending {message}; "
                        f"its log:\n{self.log()}"
                    ) from None
                continue
            if message in got.split("\n"):
                return
        raise AssertionError(f"daemon never sent {message}; its log:\n{self.log()}")

    def _close_notify(self) -> None:
        if self._notify is not None:
            self._notify.close()
            self._notify = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def client(self, **kwargs) -> semantica.Client:
        return semantica.Client(self.socket_path, **kwargs)

    def tcp_client(self, **kwargs) -> semantica.Client:
        kwargs.setdefault("token", self.token)
        return semantica.Client(host="127.0.0.1", port=self.port, **kwargs)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"daemon did not stop on SIGTERM; its log:\n{self.log()}"
            ) from None
        finally:
            self._close_notify()

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()


def make_home(prefix: str = "sem-") -> Path:
    """A short path: Unix socket paths must stay under ~107 bytes."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    return base / "home"


class DaemonEnv(dict):
    """A daemon's environment, knowing the TCP port daemon_env picked for it (None:
    the test chose the port itself); a copy of it is a plain dict, with no pick."""

    picked_port: int | None = None


def daemon_env(home: Path, **overrides: str) -> DaemonEnv:
    env = DaemonEnv(
        (k, v) for k, v in os.environ.items() if not k.startswith(("SEMANTICA_", "NOTIFY_"))
    )
    env.update(
        SEMANTICA_HOME=str(home),
        SEMANTICA_RPC_PORT=str(free_port()),
        SEMANTICA_LOG_FORMAT="json",
        SEMANTICA_LOG_LEVEL="debug",
    )
    env.update(overrides)
    if "SEMANTICA_RPC_PORT" not in overrides:
        env.picked_port = int(env["SEMANTICA_RPC_PORT"])
    return env


# Queues the API tests use. Pausing them keeps their jobs QUEUED, so a test about the
# API sees the states it made, not a runner's progress.
API_TEST_QUEUES = (
    "default",
    "build",
    "bad-input-batch",
    "bad-input-rate",
    "bad-input-cap",
)


def start_daemon(
    home: Path | None = None,
    *args: str,
    hold_queues: tuple[str, ...] = (),
    **env_overrides: str,
) -> Daemon:
    """A running daemon; the `hold_queues` are paused before anything is enqueued."""
    home = home or make_home()
    daemon = Daemon(home, daemon_env(home, **env_overrides), list(args)).start()
    if hold_queues:
        with daemon.client() as c:
            for queue in hold_queues:
                c.pause(queue)
    return daemon


def helper_module(tmp_path_factory, module: str, source: str) -> str:
    """A directory holding `module`.py with `source`, for a `python` job's sys_path."""
    root = tmp_path_factory.mktemp(module)
    (root / f"{module}.py").write_text(source)
    return str(root)


NOBODY_LOCK_WAIT_S = 300.0
_nobody_lock_holders = 0  # in this process (flock is per open file: a nested take would wait)


@contextlib.contextmanager
def running_as_nobody() -> Iterator[None]:
    """Held while a test runs processes as the user nobody.

    The process limit counts every process of a user, and a test that limits
    nobody's counts them: a test in another pytest-xdist worker must not start
    processes as nobody meanwhile. An exclusive lock on a file (let go when the
    process holding it dies, too); taken again in the process that holds it, it
    is already held."""
    global _nobody_lock_holders
    fd = None if _nobody_lock_holders else _take_nobody_lock()
    _nobody_lock_holders += 1
    try:
        yield
    finally:
        _nobody_lock_holders -= 1
        if fd is not None:
            os.close(fd)  # and the lock with it


def _take_nobody_lock() -> int:
    path = Path(tempfile.gettempdir()) / "semantica-tests-nobody.lock"
    fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    deadline = time.monotonic() + NOBODY_LOCK_WAIT_S
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise AssertionError(
                    f"{path} stayed locked for {NOBODY_LOCK_WAIT_S:.0f} s: another test "
                    "process running as nobody hangs (or holds it: see fuser)"
                ) from None
            time.sleep(0.05)


def remove_home(home: Path) -> None:
    shutil.rmtree(home.parent, ignore_errors=True)


# --------------------------------------------------------------------------- raw talk


def ndjson_exchange(path_or_addr, payload: bytes, *, timeout: float = 10.0) -> list[bytes]:
    """Send bytes, half-close, and return every reply line until the daemon closes."""
    family = socket.AF_UNIX if isinstance(path_or_addr, str | Path) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path_or_addr) if family == socket.AF_UNIX else path_or_addr)
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return [line for line in data.split(b"\n") if line]


def http_post(
    daemon: Daemon, body: bytes, *, tcp: bool = False, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One HTTP/1.1 POST / over the Unix socket (or TCP); returns (status, body)."""
    import http.client

    if tcp:
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    else:
        conn = http.client.HTTPConnection("localhost", timeout=10)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        sock.connect(str(daemon.socket_path))
        conn.sock = sock
    try:
        conn.request("POST", "/", body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()
