"""Listeners: a Unix socket (owner-only) and localhost TCP (token), two framings each.

A connection's first byte picks the framing: `{`, `[` or whitespace is
newline-delimited JSON-RPC (persistent, pipelined); a letter is HTTP/1.1 (`POST /`
with a JSON-RPC body, parsed by h11). Limits keep one client from starving others:
message size (4013 before the message is buffered whole), idle and slow-client
timeouts, a connection cap that evicts the longest-idle connection first, and a
per-connection token bucket (4029).
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import math
import os
import socket
import stat
import struct
import sys
import time
from pathlib import Path
from typing import Any

import h11
import msgspec
import trio

from semantica import log, metrics
from semantica import protocol as p
from semantica.api import Api

READ_CHUNK = 65536
# A connection answered this recently may send again soon (see Server._has_company).
COMPANY_WINDOW_S = 0.002
COMPANY_SCAN_MAX = 16
CLOSE_DRAIN_S = 0.1  # how long a refused or evicted client may still be sending
HTTP_HEADER_LIMIT = 64 * 1024


class Limits(msgspec.Struct, kw_only=True, frozen=True):
    max_message_bytes: int = 16 * 1024 * 1024
    max_connections: int = 512
    idle_timeout_s: float = 300.0
    request_timeout_s: float = 30.0  # from a message's first byte to its last
    rate_per_s: float = 20_000.0
    rate_burst: float = 5_000.0
    drain_grace_s: float = 10.0


class TokenBucket:
    """Per-connection rate limit: `rate` calls a second, bursts up to `burst`."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def take(self, n: int, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= n:
            self.tokens -= n
            return True
        return False


class SocketInUse(RuntimeError):
    """Another live daemon answers on the socket path."""


class ConnectionClosed(Exception):
    """The peer went away, timed out, or broke the framing: stop serving it."""


# --------------------------------------------------------------------------- listeners


# macOS and the BSDs: getsockopt(SOL_LOCAL, LOCAL_PEERCRED) fills a struct xucred
# {u_int cr_version; uid_t cr_uid; short cr_ngroups; gid_t cr_groups[16]}, which is
# what getpeereid() reads. Python has neither name, so both are spelled out here.
SOL_LOCAL, LOCAL_PEERCRED = 0, 0x001
XUCRED = struct.Struct("IIh")  # the leading fields; the groups are not needed


def peer_uid(sock: Any) -> int | None:
    """The connecting process's uid over a Unix socket: SO_PEERCRED on Linux, the
    getpeereid() credentials elsewhere; None if the system tells neither (the caller
    then refuses the connection: a socket that cannot check its peer stays closed)."""
    if hasattr(socket, "SO_PEERCRED"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        return uid
    if sys.platform == "darwin" or "bsd" in sys.platform:
        try:
            creds = sock.getsockopt(SOL_LOCAL, LOCAL_PEERCRED, 76)  # sizeof(struct xucred)
        except OSError:
            return None
        if len(creds) >= XUCRED.size:
            return XUCRED.unpack_from(creds)[1]
    return None


def _check_socket_dir(directory: Path) -> None:
    mode = directory.stat().st_mode
    if stat.S_IMODE(mode) & 0o077:
        raise PermissionError(
            f"the socket directory {directory} is open to other users "
            f"(mode {stat.S_IMODE(mode):04o}): use a 0700 directory for SEMANTICA_SOCKET_PATH"
        )


def _remove_stale_socket(path: Path) -> None:
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(
            f"{path} exists and is not a socket: move it away or pick another path"
        )
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1.0)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)
        log.event("stale_socket_removed", path=str(path))
        return
    except OSError as exc:
        if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        path.unlink(missing_ok=True)
        return
    finally:
        probe.close()
    raise SocketInUse(
        f"another daemon is answering on {path}: stop it first (semantica-cli shutdown), "
        "or give this one another SEMANTICA_SOCKET_PATH"
    )


async def open_unix_listener(path: Path, backlog: int = 512) -> trio.SocketListener:
    """Bind the socket owner-only: 0700 directory, umask 0177 during bind, then 0600."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_socket_dir(path.parent)
    _remove_stale_socket(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)
    try:
        await sock.bind(str(path))
    except OSError as exc:
        sock.close()
        if "too long" in str(exc) or exc.errno == errno.ENAMETOOLONG:
            raise OSError(
                f"socket path {path} is too long for a Unix socket ({len(str(path))} bytes; "
                "the limit is about 107): set a shorter SEMANTICA_SOCKET_PATH"
            ) from None
        raise
    finally:
        os.umask(old_umask)
    os.chmod(path, 0o600)
    sock.listen(backlog)
    return trio.SocketListener(sock)


# --------------------------------------------------------------------------- connections


class Conn:
    """State of one client connection."""

    def __init__(self, stream: trio.SocketStream, transport: str, limits: Limits) -> None:
        self.stream = stream
        self.transport = transport
        self.needs_auth = transport == "tcp"
        self.authenticated = False
        self.responding = False  # an HTTP response is being written
        self.bucket = TokenBucket(limits.rate_per_s, limits.rate_burst, time.monotonic())
        self.idle_since: float | None = time.monotonic()
        self.scope = trio.CancelScope()
        self.evicted = False
        self.is_http = False
        self.mid_message = False  # part of a message has arrived (for the timeout's log)
        self.request_started = trio.current_time()  # first byte of the HTTP request in progress


class Server:
    """Serves JSON-RPC on the given listeners until `drain()` and all clients are done."""

    def __init__(self, api: Api, *, limits: Limits, token: str | None) -> None:
        self.api = api
        self.limits = limits
        self.token = token
        self.conns: set[Conn] = set()
        self._accepting = trio.CancelScope()
        self._draining = False
        self._uid = os.geteuid()
        # A lone client's write need not wait scheduler turns for others to join it.
        api.committer.may_have_company = api.wal_sync.may_have_company = self._has_company
        # A slow fsync goes to a thread while any other connection is open: idle or
        # not, it may send a request meanwhile.
        api.wal_sync.others_connected = lambda: len(self.conns) > 1

    def _has_company(self) -> bool:
        """Whether another client could join this commit: one with a request under
        way, or answered within COMPANY_WINDOW_S (a busy client, about to send its
        next). An idle connection (a tool's, left open) cannot, and waiting loop
        turns for it would slow a lone client. Past COMPANY_SCAN_MAX connections
        company is assumed rather than looked for: the look is per request."""
        conns = self.conns
        if len(conns) < 2:
            return False
        if len(conns) > COMPANY_SCAN_MAX:
            return True
        now = time.monotonic()
        active = 0
        for conn in conns:  # the caller's own connection is one of the active
            if conn.idle_since is None or now - conn.idle_since < COMPANY_WINDOW_S:
                active += 1
                if active > 1:
                    return True
        return False

    async def serve(
        self,
        listeners: list[tuple[trio.SocketListener, str]],
        *,
        task_status=trio.TASK_STATUS_IGNORED,
    ) -> None:
        async with trio.open_nursery() as conns_nursery:
            with self._accepting:
                async with trio.open_nursery() as accepters:
                    for listener, transport in listeners:
                        accepters.start_soon(self._accept_loop, listener, transport, conns_nursery)
                    task_status.started()
            for listener, _ in listeners:
                await listener.aclose()
            # Draining: idle clients go now, busy ones after their reply, the rest at the deadline.
            for conn in list(self.conns):
                if conn.idle_since is not None:
                    conn.scope.cancel()
            conns_nursery.cancel_scope.deadline = trio.current_time() + self.limits.drain_grace_s

    def drain(self) -> None:
        """Stop accepting; let in-flight requests finish; close connections."""
        self._draining = True
        self._accepting.cancel()

    async def _accept_loop(
        self, listener: trio.SocketListener, transport: str, nursery: trio.Nursery
    ) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:  # EMFILE and friends: back off instead of spinning
                log.warning("accept_failed", error=str(exc), transport=transport)
                await trio.sleep(0.1)
                continue
            nursery.start_soon(self._serve_connection, stream, transport)

    async def _serve_connection(self, stream: trio.SocketStream, transport: str) -> None:
        async with stream:
            if transport == "unix":
                uid = peer_uid(stream.socket)
                if uid is None:
                    log.warning("connection_refused", reason="peer uid unknown on this system")
                    return
                if uid not in (self._uid, 0):
                    log.warning("connection_refused", reason="foreign uid", peer_uid=uid)
                    return
            conn = Conn(stream, transport, self.limits)
            if len(self.conns) >= self.limits.max_connections and not self._evict_idle():
                await self._refuse_over_cap(conn)
                return
            self.conns.add(conn)
            try:
                with conn.scope:
                    await self._serve_framing(conn)
                if conn.scope.cancelled_caught and not conn.evicted and not self._draining:
                    log.event(
                        "slow_client_dropped" if conn.mid_message else "idle_client_closed",
                        level=logging.WARNING if conn.mid_message else logging.DEBUG,
                        transport=transport,
                    )
            except ConnectionClosed:
                pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, ConnectionError):
                pass
            except Exception as exc:  # one client's trouble must never reach the daemon
                log.error(
                    "connection_failed",
                    transport=transport,
                    error=repr(exc),
                    exc_info=True,
                )
            finally:
                self.conns.discard(conn)
            if conn.evicted:
                body = p.encode(
                    p.error_response(
                        None, p.RpcError(p.RATE_LIMITED, "closed to make room for another client")
                    )
                )
                if not conn.is_http:
                    await self._send_quietly(stream, body + b"\n")
                elif conn.idle_since is None and not conn.responding:
                    # Its request came in as it was chosen to make room: say so, in HTTP.
                    # (An HTTP client expects an idle keep-alive connection to close.)
                    await self._send_quietly(stream, _http_503(body))

    async def _refuse_over_cap(self, conn: Conn) -> None:
        """Say 'too many connections' in the framing the client speaks (a second at most)."""
        err = p.RpcError(
            p.RATE_LIMITED,
            f"too many connections ({self.limits.max_connections}) are busy: "
            "retry shortly, and reuse one connection per client",
        )
        log.warning("connection_refused", reason="connection cap", transport=conn.transport)
        first = b""
        with trio.move_on_after(1), contextlib.suppress(ConnectionClosed, OSError):
            first = await self._receive(conn, trio.current_time() + 1)
        body = p.encode(p.error_response(None, err))
        data = _http_503(body) if first[:1].isalpha() else body + b"\n"
        await self._send_quietly(conn.stream, data)

    def _evict_idle(self) -> bool:
        idle = [c for c in self.conns if c.idle_since is not None and not c.evicted]
        if not idle:
            return False
        oldest = min(idle, key=lambda c: c.idle_since)
        oldest.evicted = True
        oldest.scope.cancel()
        self.conns.discard(oldest)
        log.event("connection_evicted", reason="connection cap reached")
        return True

    async def _send_quietly(self, stream: trio.SocketStream, data: bytes) -> None:
        """Send a last word, then close gently: half-close and, briefly, read what the
        client may still be sending. Closing a socket with unread input makes the
        kernel reset the connection, and the client would lose the answer just sent."""
        with (
            trio.move_on_after(1),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
        ):
            await stream.send_all(data)
            await stream.send_eof()
            with trio.move_on_after(CLOSE_DRAIN_S):
                while await stream.receive_some(READ_CHUNK):
                    pass

    async def _receive(self, conn: Conn, deadline: float) -> bytes:
        """Next bytes from the client, or ConnectionClosed at EOF.

        Past `deadline` the connection's own cancel scope fires and the connection
        ends (one scope per connection, its deadline moved: no new scope per read).
        """
        conn.scope.deadline = deadline
        try:
            data = await _receive_when_ready(conn.stream)
        finally:
            conn.scope.deadline = math.inf
        if not data:
            raise ConnectionClosed("peer closed")
        return data

    async def _serve_framing(self, conn: Conn) -> None:
        first = await self._receive(conn, trio.current_time() + self.limits.idle_timeout_s)
        if first[:1].isalpha():
            conn.is_http = True
            await self._serve_http(conn, first)
        else:
            await self._serve_ndjson(conn, first)

    # ----------------------------------------------------------------- NDJSON

    async def _serve_ndjson(self, conn: Conn, first: bytes) -> None:
        limits = self.limits
        buf = bytearray(first)
        started = trio.current_time()
        while True:
            newline = buf.find(b"\n")
            while newline < 0:
                if len(buf) > limits.max_message_bytes:
                    await self._refuse_oversized(conn, "NDJSON line")
                    return
                if buf.strip():  # a message is arriving: not idle, not to be evicted
                    conn.idle_since = None
                    deadline = started + limits.request_timeout_s
                else:
                    conn.idle_since = conn.idle_since or time.monotonic()
                    deadline = trio.current_time() + limits.idle_timeout_s
                conn.mid_message = bool(buf.strip())
                try:
                    data = await self._receive(conn, deadline)
                except ConnectionClosed:
                    if conn.mid_message:  # a last message without its newline
                        await self._answer_ndjson(conn, bytes(buf))
                    raise
                if not buf.strip():
                    started = trio.current_time()
                buf += data
                newline = buf.find(b"\n", max(0, len(buf) - len(data)))
            if newline > limits.max_message_bytes:  # it arrived with its newline at once
                await self._refuse_oversized(conn, "NDJSON line")
                return
            line = bytes(buf[:newline])
            del buf[: newline + 1]
            if line.strip():
                await self._answer_ndjson(conn, line)
                if self._draining:
                    return
                if b"\n" in buf:  # pipelined: let other clients in between two answers
                    await trio.lowlevel.checkpoint()
            started = trio.current_time()

    async def _answer_ndjson(self, conn: Conn, message: bytes) -> None:
        conn.idle_since = None
        reply = await self.process(message, conn)
        if reply is not None:
            await _send_now(conn.stream, reply + b"\n")
        conn.idle_since = time.monotonic()

    async def _refuse_oversized(self, conn: Conn, what: str) -> None:
        err = p.RpcError(
            p.TOO_LARGE,
            f"message too large: the limit is {self.limits.max_message_bytes} bytes per "
            f"{what}; split the work into smaller requests",
            {"limit_bytes": self.limits.max_message_bytes},
        )
        log.warning("message_too_large", transport=conn.transport)
        await conn.stream.send_all(p.encode(p.error_response(None, err)) + b"\n")

    # ----------------------------------------------------------------- HTTP

    async def _serve_http(self, conn: Conn, first: bytes) -> None:
        h = h11.Connection(h11.SERVER, max_incomplete_event_size=HTTP_HEADER_LIMIT)
        h.receive_data(first)
        while True:
            conn.request_started = trio.current_time()  # if already buffered (pipelined)
            request = await self._next_http_event(conn, h, None)
            if isinstance(request, h11.ConnectionClosed):
                return
            if not isinstance(request, h11.Request):
                raise ConnectionClosed("unexpected HTTP event")
            conn.idle_since = None
            await self._answer_http(conn, h, request, conn.request_started)
            # An early answer (401, 404, 413) leaves the body unread: the stream cannot be reused.
            if h.our_state is not h11.DONE or h.their_state is not h11.DONE or self._draining:
                return
            h.start_next_cycle()
            conn.responding = False
            conn.idle_since = time.monotonic()

    async def _next_http_event(self, conn: Conn, h: h11.Connection, started: float | None) -> Any:
        """The next h11 event. Before a request's first byte the idle timeout applies;
        from that byte on, the whole request must arrive within the request timeout."""
        while True:
            try:
                event = h.next_event()
            except h11.RemoteProtocolError as exc:
                await self._send_http(conn, h, exc.error_status_hint, None, close=True)
                raise ConnectionClosed("bad HTTP") from None
            if event is not h11.NEED_DATA:
                return event
            if started is None and (h.their_state is not h11.IDLE or h.trailing_data[0]):
                started = conn.request_started = trio.current_time()
            conn.mid_message = started is not None
            if conn.mid_message:  # a request is arriving: not idle, not to be evicted
                conn.idle_since = None
            deadline = (
                trio.current_time() + self.limits.idle_timeout_s
                if started is None
                else started + self.limits.request_timeout_s
            )
            try:
                data = await self._receive(conn, deadline)
            except ConnectionClosed:
                if h.their_state is h11.IDLE:
                    return h11.ConnectionClosed()
                raise
            if started is None:
                started = conn.request_started = trio.current_time()
            conn.idle_since = None
            h.receive_data(data)

    async def _answer_http(
        self, conn: Conn, h: h11.Connection, request: h11.Request, started: float
    ) -> None:
        _refuse_if_evicted(conn)
        headers = {k.lower(): v for k, v in request.headers}
        path = request.target.split(b"?")[0]
        if path not in (b"/", b"/metrics"):
            await self._send_http(
                conn, h, 404, p.RpcError(p.NOT_FOUND, "POST JSON-RPC to /, or GET /metrics")
            )
            return
        allowed = b"POST" if path == b"/" else b"GET"
        if request.method != allowed:
            message = "use POST / with a JSON-RPC body" if path == b"/" else "use GET /metrics"
            await self._send_http(
                conn,
                h,
                405,
                p.RpcError(p.INVALID_REQUEST, message),
                extra_headers=[("allow", allowed.decode())],
                head=request.method == b"HEAD",
            )
            return
        if conn.needs_auth:  # every HTTP request carries the token
            conn.authenticated = self._bearer_ok(headers.get(b"authorization", b""))
            if not conn.authenticated:
                log.warning("unauthorized_request", transport=conn.transport)
                await self._send_http(conn, h, 401, self._unauthorized())
                return
        if path == b"/metrics":
            await self._answer_metrics(conn, h, started)
            return
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limits.max_message_bytes:
            await self._send_http(conn, h, 413, self._too_large(), close=True)
            return
        if h.they_are_waiting_for_100_continue:
            await conn.stream.send_all(
                h.send(h11.InformationalResponse(status_code=100, headers=[]))
            )
        body = bytearray()
        while True:
            event = await self._next_http_event(conn, h, started)
            if isinstance(event, h11.Data):
                body += event.data
                if len(body) > self.limits.max_message_bytes:
                    await self._send_http(conn, h, 413, self._too_large(), close=True)
                    raise ConnectionClosed("oversized HTTP body")
            elif isinstance(event, h11.EndOfMessage):
                break
            else:
                raise ConnectionClosed("unexpected HTTP event")
        reply = await self.process(bytes(body), conn)
        await self._send_http_body(conn, h, 200 if reply is not None else 204, reply)

    async def _answer_metrics(self, conn: Conn, h: h11.Connection, started: float) -> None:
        """Prometheus text exposition of the daemon's stats."""
        while not isinstance(
            event := await self._next_http_event(conn, h, started), h11.EndOfMessage
        ):
            if not isinstance(event, h11.Data):
                raise ConnectionClosed("unexpected HTTP event")
        if not conn.bucket.take(1, time.monotonic()):
            await self._send_http(conn, h, 429, self._rate_limited_error())
            return
        body = metrics.exposition(self.api.stats)
        await self._send_http_body(conn, h, 200, body, content_type=metrics.CONTENT_TYPE)

    def _bearer_ok(self, header: bytes) -> bool:
        if self.token is None:
            return False
        scheme, _, credentials = header.strip().partition(b" ")
        if scheme.lower() != b"bearer":  # scheme names are case-insensitive (RFC 9110)
            return False
        return hmac.compare_digest(credentials.strip(), self.token.encode())

    def _unauthorized(self) -> p.RpcError:
        return p.RpcError(
            p.UNAUTHORIZED,
            "this TCP endpoint needs the token from $SEMANTICA_HOME/token: send "
            "'Authorization: Bearer <token>' over HTTP, or an 'auth' call first over NDJSON",
        )

    def _too_large(self) -> p.RpcError:
        return p.RpcError(
            p.TOO_LARGE,
            f"message too large: the limit is {self.limits.max_message_bytes} bytes; "
            "split the work into smaller requests",
            {"limit_bytes": self.limits.max_message_bytes},
        )

    async def _send_http(
        self,
        conn: Conn,
        h: h11.Connection,
        status: int,
        err: p.RpcError | None,
        close=False,
        extra_headers: list[tuple[str, str]] | None = None,
        head=False,
    ) -> None:
        body = p.encode(p.error_response(None, err)) if err is not None else None
        await self._send_http_body(
            conn, h, status, body, close=close, extra_headers=extra_headers, head=head
        )

    async def _send_http_body(
        self,
        conn: Conn,
        h: h11.Connection,
        status: int,
        body: bytes | None,
        close=False,
        content_type: str = "application/json",
        extra_headers: list[tuple[str, str]] | None = None,
        head=False,
    ) -> None:
        """One response. `head`: the request was HEAD, so the headers describe the
        body without it. A request whose body is left unread (an early answer) ends
        the connection, and the response says so."""
        if h.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        headers = [("server", "semantica"), *(extra_headers or [])]
        if body is not None:
            headers += [("content-type", content_type), ("content-length", str(len(body)))]
        elif status != 204:
            headers.append(("content-length", "0"))
        if close or h.their_state is not h11.DONE:
            headers.append(("connection", "close"))
        data = h.send(h11.Response(status_code=status, headers=headers))
        if body and not head:
            data += h.send(h11.Data(data=body))
        data += h.send(h11.EndOfMessage())
        conn.responding = True  # from here on an eviction must not add a response
        await conn.stream.send_all(data)

    # ----------------------------------------------------------------- JSON-RPC

    async def process(self, message: bytes, conn: Conn) -> bytes | None:
        """Answer one message (a request or a batch); None when nothing is owed."""
        _refuse_if_evicted(conn)
        decoded = p.decode_message(message)
        if isinstance(decoded, p.Call):
            if not conn.bucket.take(1, time.monotonic()):
                return self._rate_limited_reply([decoded])
            response = await self.run_call(decoded, conn)
            return None if response is None else p.encode(response)
        calls, _ = decoded
        if not conn.bucket.take(len(calls), time.monotonic()):
            return self._rate_limited_reply(calls, batch=True)
        responses: list[p.Response | None] = [None] * len(calls)

        async def run(index: int, call: p.Call) -> None:
            responses[index] = await self.run_call(call, conn)

        async with trio.open_nursery() as nursery:
            for index, call in enumerate(calls):
                nursery.start_soon(run, index, call)
        answered = [r for r in responses if r is not None]
        return p.encode(answered) if answered else None

    def _rate_limited_error(self) -> p.RpcError:
        return p.RpcError(
            p.RATE_LIMITED,
            f"rate limited: at most {self.limits.rate_per_s:g} calls a second per connection; "
            "slow down or batch jobs with dev.enqueue_batch.v1",
        )

    def _rate_limited_reply(self, calls: list[p.Call], batch: bool = False) -> bytes | None:
        err = self._rate_limited_error()
        if batch and len(calls) > self.limits.rate_burst:  # waiting would never let it in
            err = p.RpcError(
                p.RATE_LIMITED,
                f"rate limited: this batch has {len(calls)} calls, more than the "
                f"{self.limits.rate_burst:g} a connection may make at once: split it into "
                "smaller batches, or put its jobs in one dev.enqueue_batch.v1",
                {"batch_calls": len(calls), "burst": self.limits.rate_burst},
            )
        replies = [p.error_response(c.id, err) for c in calls if not c.is_notification]
        if not replies:
            return None
        return p.encode(replies if batch else replies[0])

    async def run_call(self, call: p.Call, conn: Conn) -> p.Response | None:
        if call.error is not None:
            response = p.error_response(call.id, call.error)
        elif call.method == p.AUTH_METHOD:
            response = self._authenticate(call, conn)
        elif conn.needs_auth and not conn.authenticated:
            response = p.error_response(call.id, self._unauthorized())
        else:
            log.debug("rpc_call", method=call.method, transport=conn.transport)
            try:
                result = await self.api.handle(call.method, call.params)
                response = p.result_response(call.id, result)
            except p.RpcError as err:
                response = p.error_response(call.id, err)
            except Exception as exc:
                log.error("request_failed", method=call.method, error=repr(exc), exc_info=True)
                response = p.error_response(call.id, p.rpc_error_for(exc))
        return None if call.is_notification else response

    def _authenticate(self, call: p.Call, conn: Conn) -> p.Response:
        if not conn.needs_auth:
            return p.result_response(call.id, p.Authenticated(authenticated=True))
        token = call.params.token.encode()
        if self.token is not None and hmac.compare_digest(token, self.token.encode()):
            conn.authenticated = True
            return p.result_response(call.id, p.Authenticated(authenticated=True))
        log.warning("unauthorized_request", transport=conn.transport)
        return p.error_response(call.id, self._unauthorized())


async def _receive_when_ready(stream: trio.SocketStream) -> bytes:
    """The next bytes from the client (b"" at EOF), waiting for them first.

    `receive_some` tries a read first, and a client that has just been answered
    has not sent its next request yet: that read fails, and trio then waits and
    reads again. Waiting first saves the failing system call and its exception on
    every request; data already there costs one scheduler pass, as it does in trio
    (which yields after a read that succeeds at once)."""
    if sys.platform == "win32":  # a socket is no file descriptor there
        return await stream.receive_some(READ_CHUNK)
    sock = stream.socket
    while True:
        await trio.lowlevel.wait_readable(sock)
        try:
            return os.read(sock.fileno(), READ_CHUNK)
        except BlockingIOError:
            continue  # woken without data (another reader, a spurious wake): wait again
        except OSError as exc:  # a reset, an unreachable peer: as trio's receive_some says
            raise trio.BrokenResourceError(str(exc)) from exc


async def _send_now(stream: trio.SocketStream, data: bytes) -> None:
    """Write a reply straight to the socket when its buffer takes it all, else
    through trio. trio's `send_all` yields to the scheduler after every send, which
    cost a pass of the event loop per request. The caller yields instead where
    that matters: the next read is a schedule point, and a pipelining client's
    next line waits for one (`_serve_ndjson`)."""
    try:
        sent = os.write(stream.socket.fileno(), data)
    except BlockingIOError:
        sent = 0
    if sent < len(data):
        await stream.send_all(memoryview(data)[sent:])


def _refuse_if_evicted(conn: Conn) -> None:
    """A connection picked as idle to make room, just as its request came in: do not
    serve that request (the cancellation is already on its way); the client is told
    why instead, when the connection ends."""
    if conn.evicted:
        raise ConnectionClosed("closed to make room for another client")


def _http_503(body: bytes) -> bytes:
    """A complete 'come back shortly' HTTP response, written without h11: the
    connection's HTTP state is unknown or gone when it is sent."""
    return (
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
        b"connection: close\r\nretry-after: 1\r\ncontent-length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def raise_fd_limit() -> None:
    """Let the connection cap, not the default 1024 descriptors, bound the clients."""
    if sys.platform == "win32":
        return
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
