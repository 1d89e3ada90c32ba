"""The Python SDK: `Client` (blocking) and `AsyncClient` (anyio: asyncio or trio).

Both speak newline-delimited JSON-RPC over one persistent connection: the Unix
socket by default, or TCP with the token. Results are the daemon's own Structs
(`Job`, `JobPage`, ...); errors are `SemanticaError` subclasses.

    with semantica.Client() as client:
        job = client.enqueue(job_type="index_file", subject_key="src/main.rs",
                             payload={"path": "src/main.rs"})
        done = client.wait(job.id, timeout_ms=10_000)
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from semantica import protocol as p
from semantica.domain import EnqueueRequest, Job, State
from semantica.errors import ConnectionLost, DaemonNotRunning, SemanticaError, error_from
from semantica.store import QueueInfo

T = TypeVar("T")
_decode_response = msgspec.json.Decoder(p.ResponseIn).decode
DEFAULT_TIMEOUT_S = 30.0
WAIT_SLACK_S = 10.0
MAINTENANCE_TIMEOUT_S = 3600.0  # a vacuum or a backup of a large database takes a while
START_HINT = "start it with `semantica` (or `make run` in a checkout), then retry"


class Target(msgspec.Struct, frozen=True):
    """Where the daemon listens: a Unix socket path, or a TCP host and port + token."""

    socket_path: str | None = None
    host: str | None = None
    port: int | None = None
    token: str | None = None

    def describe(self) -> str:
        return self.socket_path or f"{self.host}:{self.port}"


def resolve_target(
    socket_path: str | os.PathLike[str] | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
    home: str | os.PathLike[str] | None = None,
) -> Target:
    """Socket path, else TCP when host/port are given; defaults from SEMANTICA_* variables."""
    home_dir = Path(
        home or os.environ.get("SEMANTICA_HOME") or Path.home() / ".semantica"
    ).expanduser()
    if host is not None or port is not None:
        if token is None:
            token_file = home_dir / "token"
            try:
                token = token_file.read_text().strip()
            except OSError as exc:
                raise SemanticaError(
                    f"TCP needs the daemon's token and {token_file} cannot be read "
                    f"({exc.strerror}): pass token=..., or use the Unix socket",
                    code=p.UNAUTHORIZED,
                ) from None
        return Target(
            host=host or "127.0.0.1",
            port=port or int(os.environ.get("SEMANTICA_RPC_PORT") or 9527),
            token=token,
        )
    path = socket_path or os.environ.get("SEMANTICA_SOCKET_PATH") or home_dir / "semantica.sock"
    return Target(socket_path=os.fspath(path))


def _not_running(target: Target, exc: OSError) -> DaemonNotRunning:
    return DaemonNotRunning(
        f"the Semantica daemon is not running (nothing answers at {target.describe()}: "
        f"{exc.strerror or exc}): {START_HINT}"
    )


class _OutOfStep(Exception):
    """The reply read is not the one to the call just made: the connection is dropped."""


class _Closing(Exception):
    """The daemon's last word before it closes the connection: drop it, then raise
    `error` (so the next call connects afresh instead of failing on a dead socket)."""

    def __init__(self, error: SemanticaError) -> None:
        super().__init__(str(error))
        self.error = error


def _result(line: bytes, result_type: type[T], call_id: int) -> T:
    try:
        response = _decode_response(line)
    except msgspec.DecodeError as exc:
        raise SemanticaError(f"the daemon sent a reply this SDK cannot read: {exc}") from None
    # An error the daemon could not tie to a call (a message cut off as too large, a
    # connection closed to make room) carries a null id, and the daemon closes the
    # connection after it; any other reply must be to this call.
    if response.id is None and response.error:
        raise _Closing(error_from(response.error))
    if response.id != call_id:
        raise _OutOfStep(f"a reply to call {response.id!r} came for call {call_id}")
    if response.error is not msgspec.UNSET:
        raise error_from(response.error)
    if response.result is msgspec.UNSET:
        raise SemanticaError("the daemon sent a reply with neither a result nor an error")
    try:
        return msgspec.json.decode(response.result, type=result_type)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise SemanticaError(
            f"the daemon's result does not match this SDK ({exc}): is the daemon a "
            "different version? `semantica --version` tells"
        ) from None


def _unreachable(target: Target, exc: OSError) -> SemanticaError:
    """A connection that could not even be attempted (a socket path too long, a bad
    host name): a mistake in where to connect, not a daemon that is down."""
    return SemanticaError(f"cannot connect to the daemon at {target.describe()}: {exc}")


def _lost(method: str, exc: BaseException) -> ConnectionLost:
    return ConnectionLost(
        f"lost the connection to the daemon during {method} ({exc}); "
        "it may or may not have been carried out: check before retrying"
    )


# After a refused send (the daemon stopped reading a message too large and closed
# its end), how long to look for the error it sent first.
REFUSAL_READ_S = 1.0


def _enqueue_params(request: EnqueueRequest | None, fields: dict[str, Any]) -> Any:
    if request is not None and fields:
        raise TypeError("pass an EnqueueRequest or keyword fields, not both")
    return request if request is not None else fields


class _Methods:
    """Every method of the API, shared by both clients.

    Each returns `self._call(...)`: a value for Client, an awaitable for AsyncClient.
    Where to connect: the Unix socket (`socket_path`, else SEMANTICA_SOCKET_PATH, else
    `$SEMANTICA_HOME/semantica.sock`), or TCP when `host`/`port` are given, with
    `token` (else read from `$SEMANTICA_HOME/token`).
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        host: str | None = None,
        port: int | None = None,
        token: str | None = None,
        home: str | os.PathLike[str] | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
    ) -> None:
        self.target = resolve_target(socket_path, host=host, port=port, token=token, home=home)
        self.timeout = timeout
        self._buffer = bytearray()
        self._ids = itertools.count(1)

    def _call(self, method: str, params: Any, result_type: Any, timeout: float | None = None):
        raise NotImplementedError

    def enqueue(self, request: EnqueueRequest | None = None, /, **fields: Any) -> Job:
        """Enqueue one job (fields of SPEC §3); returns the stored job."""
        return self._call("dev.enqueue.v1", _enqueue_params(request, fields), Job)

    def enqueue_batch(self, jobs: list[EnqueueRequest | dict[str, Any]]) -> p.JobList:
        """Enqueue many jobs at once, all or nothing; `.jobs` is in order."""
        return self._call("dev.enqueue_batch.v1", {"jobs": jobs}, p.JobList)

    def get(self, job_id: str) -> Job:
        """The job with this id (NotFound if none)."""
        return self._call("jobs.get.v1", {"id": job_id}, Job)

    def list(
        self,
        *,
        state: State | str | None = None,
        queue: str | None = None,
        job_type: str | None = None,
        tag: str | None = None,
        chain: str | None = None,
        subject: str | None = None,
        parent: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> p.JobPage:
        """Jobs matching every given filter, newest first; pass `next_cursor` for more."""
        params = {
            "state": state,
            "queue": queue,
            "job_type": job_type,
            "tag": tag,
            "chain": chain,
            "subject": subject,
            "parent": parent,
            "limit": limit,
            "cursor": cursor,
        }
        return self._call(
            "jobs.list.v1", {k: v for k, v in params.items() if v is not None}, p.JobPage
        )

    def wait(self, job_id: str, timeout_ms: int = 30_000) -> Job:
        """Block until the job is final or `timeout_ms` passes; returns the job as it is."""
        return self._call(
            "jobs.wait.v1",
            {"id": job_id, "timeout_ms": timeout_ms},
            Job,
            timeout=timeout_ms / 1000 + WAIT_SLACK_S,
        )

    def cancel(
        self, job_id: str | None = None, *, tag: str | None = None, chain: str | None = None
    ) -> p.Cancelled:
        """Cancel a job by id, or all unfinished jobs with a tag or in a chain."""
        params = {"id": job_id, "tag": tag, "chain": chain}
        return self._call(
            "dev.cancel.v1", {k: v for k, v in params.items() if v is not None}, p.Cancelled
        )

    def retry(self, job_id: str) -> Job:
        """Run a FAILED, CANCELLED or EXPIRED job again, as a new job (returned)."""
        return self._call("jobs.retry.v1", {"id": job_id}, Job)

    def logs(
        self, job_id: str, *, n: int = 100, offset: int | None = None, wait_ms: int = 0
    ) -> p.LogChunk:
        """The last `n` lines of a job's log; or, with `offset`, what follows it,
        waiting up to `wait_ms` for more. Pass the returned offset to follow."""
        params: dict[str, Any] = {"id": job_id, "n": n, "wait_ms": wait_ms}
        if offset is not None:
            params["offset"] = offset
        return self._call("logs.tail.v1", params, p.LogChunk, timeout=wait_ms / 1000 + WAIT_SLACK_S)

    def runners(self) -> p.RunnerList:
        """Installed runner plugins: job type, target, distribution and version."""
        return self._call("runners.list.v1", {}, p.RunnerList)

    def queues(self) -> p.QueueList:
        """Every queue with its limit, paused flag and job counts."""
        return self._call("queues.list.v1", {}, p.QueueList)

    def pause(self, queue: str) -> QueueInfo:
        """Stop claiming from a queue; running jobs finish."""
        return self._call("queues.pause.v1", {"queue": queue}, QueueInfo)

    def resume(self, queue: str) -> QueueInfo:
        return self._call("queues.resume.v1", {"queue": queue}, QueueInfo)

    def configure_queue(self, queue: str, *, concurrency: int | None) -> QueueInfo:
        """Set a queue's own concurrency limit (None: only the global limit)."""
        return self._call(
            "queues.configure.v1", {"queue": queue, "concurrency": concurrency}, QueueInfo
        )

    def stats(self) -> p.StatsResult:
        return self._call("admin.stats.v1", {}, p.StatsResult)

    def health(self, *, integrity_check: bool = False) -> p.HealthResult:
        return self._call("admin.health.v1", {"integrity_check": integrity_check}, p.HealthResult)

    def maintenance(self, *, force_vacuum: bool = False) -> p.MaintenanceReport:
        """Delete finished jobs past retention and orphaned files, checkpoint, vacuum."""
        return self._call(
            "admin.maintenance.v1",
            {"force_vacuum": force_vacuum},
            p.MaintenanceReport,
            timeout=MAINTENANCE_TIMEOUT_S,
        )

    def backup(self, path: str | os.PathLike[str]) -> p.BackupReport:
        """A consistent copy of the database at `path` (absolute, not existing yet)."""
        return self._call(
            "admin.backup.v1",
            {"path": os.path.abspath(path)},
            p.BackupReport,
            timeout=MAINTENANCE_TIMEOUT_S,
        )

    def shutdown(self) -> p.Stopping:
        """Ask the daemon to drain and stop."""
        return self._call("admin.shutdown.v1", {}, p.Stopping)

    def call(self, method: str, params: Any = None) -> Any:
        """Any method by name, with untyped params and result."""
        return self._call(method, {} if params is None else params, Any)


class Client(_Methods):
    """Blocking client over one persistent connection; safe to share between threads."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
            self._buffer.clear()

    def metrics_text(self) -> str:
        """The daemon's Prometheus exposition (`GET /metrics`), as text."""
        import http.client

        t = self.target
        if t.socket_path is not None:
            conn = http.client.HTTPConnection("localhost", timeout=self.timeout)
        else:
            conn = http.client.HTTPConnection(t.host or "127.0.0.1", t.port, timeout=self.timeout)
        headers = {"Authorization": f"Bearer {t.token}"} if t.token else {}
        try:
            if t.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                conn.sock = sock
                sock.connect(t.socket_path)
            conn.request("GET", "/metrics", headers=headers)
            response = conn.getresponse()
            body = response.read()
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise _not_running(t, exc) from None
        except OSError as exc:
            raise ConnectionLost(
                f"lost the connection to the daemon during GET /metrics ({exc})"
            ) from None
        finally:
            conn.close()
        if response.status != 200:
            raise SemanticaError(f"GET /metrics answered {response.status}: {body[:300]!r}")
        return body.decode()

    def connect(self) -> Client:
        """Connect now (calls connect on first use anyway): DaemonNotRunning if nothing
        answers."""
        with self._lock:
            if self._sock is None:
                self._connect()
        return self

    def _connect(self) -> None:
        t = self.target
        try:
            if t.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.timeout)
                sock.connect(t.socket_path)
            else:
                sock = socket.create_connection((t.host, t.port), timeout=self.timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise _not_running(t, exc) from None
        except OSError as exc:
            raise _unreachable(t, exc) from None
        self._sock = sock
        if t.token is not None:
            self._roundtrip(p.AUTH_METHOD, {"token": t.token}, p.Authenticated, self.timeout)

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buffer.clear()

    def _roundtrip(self, method: str, params: Any, result_type: Any, timeout: float) -> Any:
        """One call and its reply. Whatever stops it half-way (a lost connection, a
        timeout, KeyboardInterrupt) drops the connection: a reply left unread would
        otherwise be taken for the next call's."""
        assert self._sock is not None
        sock = self._sock
        call_id = next(self._ids)
        try:
            sock.settimeout(timeout)
            try:
                sock.sendall(p.encode_request(method, params, call_id) + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                # Refused part-way (too large): the daemon's error may be there to read.
                sock.settimeout(REFUSAL_READ_S)
            while (newline := self._buffer.find(b"\n")) < 0:
                data = sock.recv(65536)
                if not data:
                    raise ConnectionResetError("the daemon closed the connection")
                self._buffer += data
            line = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            return _result(line, result_type, call_id)
        except (OSError, TimeoutError) as exc:
            self._drop()
            raise _lost(method, exc) from None
        except _OutOfStep as exc:
            self._drop()
            raise _lost(method, exc) from None
        except _Closing as closing:
            self._drop()
            raise closing.error from None
        except SemanticaError:
            raise
        except BaseException:
            self._drop()
            raise

    def _call(self, method: str, params: Any, result_type: Any, timeout: float | None = None):
        with self._lock:
            if self._sock is None:
                self._connect()
            return self._roundtrip(method, params, result_type, timeout or self.timeout)


class AsyncClient(_Methods):
    """Async client on anyio: `async with AsyncClient() as c: await c.get(job_id)`.

    Works under asyncio and trio. Calls on one client are serialised over its one
    connection; open several clients for parallel calls.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._stream: Any = None
        self._lock: Any = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._stream is not None:
            stream, self._stream = self._stream, None
            await stream.aclose()
        self._buffer.clear()

    async def _connect(self) -> None:
        import anyio

        t = self.target
        try:
            if t.socket_path is not None:
                self._stream = await anyio.connect_unix(t.socket_path)
            else:
                self._stream = await anyio.connect_tcp(t.host, t.port)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise _not_running(t, exc) from None
        except OSError as exc:
            if isinstance(exc.__cause__, FileNotFoundError | ConnectionRefusedError) or (
                exc.errno is None and "refused" in str(exc).lower()
            ):
                raise _not_running(t, exc) from None
            raise _unreachable(t, exc) from None
        if t.token is not None:
            await self._roundtrip(p.AUTH_METHOD, {"token": t.token}, p.Authenticated, self.timeout)

    async def _drop(self) -> None:
        import anyio

        with anyio.CancelScope(shield=True):  # also when the call was cancelled
            await self.aclose()

    async def _roundtrip(self, method: str, params: Any, result_type: Any, timeout: float) -> Any:
        """One call and its reply. Whatever stops it half-way (a lost connection, a
        timeout, a cancelled scope) drops the connection: a reply left unread would
        otherwise be taken for the next call's."""
        import anyio

        gone = (OSError, TimeoutError, anyio.EndOfStream, anyio.BrokenResourceError)
        call_id = next(self._ids)
        try:
            with anyio.fail_after(timeout):
                try:
                    await self._stream.send(p.encode_request(method, params, call_id) + b"\n")
                except gone:
                    if not self._buffer:  # refused part-way (too large): read its error
                        with anyio.move_on_after(REFUSAL_READ_S):
                            self._buffer += await self._stream.receive(65536)
                while (newline := self._buffer.find(b"\n")) < 0:
                    self._buffer += await self._stream.receive(65536)
            line = bytes(self._buffer[:newline])
            del self._buffer[: newline + 1]
            return _result(line, result_type, call_id)
        except (*gone, _OutOfStep) as exc:
            await self._drop()
            raise _lost(method, exc) from None
        except _Closing as closing:
            await self._drop()
            raise closing.error from None
        except SemanticaError:
            raise
        except BaseException:
            await self._drop()
            raise

    async def _call(self, method: str, params: Any, result_type: Any, timeout: float | None = None):
        import anyio

        if self._lock is None:
            self._lock = anyio.Lock()
        async with self._lock:
            if self._stream is None:
                await self._connect()
            return await self._roundtrip(method, params, result_type, timeout or self.timeout)
