"""JSON-RPC 2.0: envelopes, method params, error codes and the codec. No I/O.

Bytes in, `Call`s out; results or errors in, bytes out. The server feeds it whole
messages (one NDJSON line or one HTTP body) and writes back what it returns.
"""

from __future__ import annotations

import json
from typing import Any, Literal

import msgspec

from semantica.domain import EnqueueRequest, IllegalTransition, Job, ValidationError
from semantica.plugins import RunnerInfo
from semantica.store import JobFilter, NotFound, QueueInfo, StorageUnavailable

# --------------------------------------------------------------------------- error codes

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
VALIDATION = 4001
NOT_FOUND = 4004
CONFLICT = 4009
TOO_LARGE = 4013
RATE_LIMITED = 4029
UNAUTHORIZED = 4030
STORAGE_UNAVAILABLE = 5003


class RpcError(Exception):
    """An error to send back as a JSON-RPC error object."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        self.code, self.message, self.data = code, message, data
        super().__init__(message)


def rpc_error_for(exc: Exception) -> RpcError:
    """The JSON-RPC error a person can act on, for an exception from the store."""
    match exc:
        case RpcError():
            return exc
        case ValidationError():
            return RpcError(VALIDATION, str(exc), {"field": exc.field})
        case NotFound():
            return RpcError(NOT_FOUND, str(exc), {exc.what: exc.ident})
        case IllegalTransition():
            return RpcError(
                CONFLICT,
                str(exc),
                {"id": exc.job_id, "state": exc.current.value, "wanted": exc.target.value},
            )
        case StorageUnavailable():
            return RpcError(
                STORAGE_UNAVAILABLE,
                f"storage unavailable: {exc}",
                {"retry": "after the cause is fixed; reads still work"},
            )
        case _:
            return RpcError(
                INTERNAL_ERROR,
                "internal error: the daemon log has the details; please report it",
                {"type": type(exc).__name__},
            )


# --------------------------------------------------------------------------- envelopes

Id = int | float | str | None


class Request(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    jsonrpc: Literal["2.0"]
    method: str
    params: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))
    id: Id | msgspec.UnsetType = msgspec.UNSET


class ErrorObject(msgspec.Struct, omit_defaults=True):
    code: int
    message: str
    data: Any = None


class Response(msgspec.Struct):
    """Always carries `jsonrpc` and `id` (null when unknown); exactly one of result/error."""

    jsonrpc: Literal["2.0"] = "2.0"
    result: Any = msgspec.UNSET
    error: ErrorObject | msgspec.UnsetType = msgspec.UNSET
    id: Id = None


class ResponseIn(msgspec.Struct):
    """A response as a client reads it; `result` stays raw until its type is known."""

    jsonrpc: Literal["2.0"]
    id: Id = None
    result: msgspec.Raw | msgspec.UnsetType = msgspec.UNSET
    error: ErrorObject | msgspec.UnsetType = msgspec.UNSET


# --------------------------------------------------------------------------- params


class Params(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """Base of every method's params; unknown fields are refused."""


class EnqueueBatchParams(Params):
    jobs: list[EnqueueRequest]


class JobIdParams(Params):
    id: str


class CancelParams(Params):
    id: str | None = None
    tag: str | None = None
    chain: str | None = None


class ListParams(JobFilter, forbid_unknown_fields=True, kw_only=True):
    """The store's filters, plus paging."""

    limit: int = 100
    cursor: str | None = None


class WaitParams(Params):
    id: str
    timeout_ms: int = 30_000


class QueueParams(Params):
    queue: str


class ConfigureQueueParams(Params):
    queue: str
    concurrency: int | None


class TailParams(Params):
    id: str
    n: int = 100
    offset: int | None = None
    wait_ms: int = 0


class HealthParams(Params):
    integrity_check: bool = False


class NoParams(Params):
    pass


class MaintenanceParams(Params):
    force_vacuum: bool = False


class BackupParams(Params):
    path: str


class AuthParams(Params):
    token: str


# --------------------------------------------------------------------------- results
# What methods return, shared by the daemon (encoding) and the SDK (decoding).


class JobPage(msgspec.Struct, kw_only=True):
    jobs: list[Job]
    next_cursor: str | None


class JobList(msgspec.Struct, kw_only=True):
    jobs: list[Job]


class Cancelled(msgspec.Struct, kw_only=True):
    cancelled: list[str]
    dependents_cancelled: list[str] = msgspec.field(default_factory=list)


class QueueList(msgspec.Struct, kw_only=True):
    queues: list[QueueInfo]


class Counters(msgspec.Struct, kw_only=True):
    """Throughput counters of SPEC §8, since the daemon started."""

    job_enqueue_total: int = 0
    job_complete_total: int = 0
    job_failed_total: int = 0
    job_retry_total: int = 0
    enqueue_commits_total: int = 0  # commits carrying enqueues; group commit shares them


class LatencyHistogram(msgspec.Struct, kw_only=True):
    """Observations in milliseconds: `cumulative[i]` of them were ≤ `buckets_ms[i]`
    (None: +Inf, so the last equals `count`)."""

    count: int = 0
    sum_ms: float = 0.0
    buckets_ms: list[float | None] = msgspec.field(default_factory=list)
    cumulative: list[int] = msgspec.field(default_factory=list)


class StatsResult(msgspec.Struct, kw_only=True):
    jobs_by_state: dict[str, int]
    jobs_by_queue: dict[str, dict[str, int]]
    running: int
    db_size_bytes: int
    uptime_s: float
    counters: Counters
    wal_fsyncs_total: int = 0  # group fsyncs that acknowledged writes (synchronous=FULL)
    wal_checkpoints_total: int = 0  # WAL checkpoints: in a worker thread, or after a commit
    maintenance_runs_total: int = 0
    dispatcher_wakeups_total: int = 0  # times the dispatcher looked again (no idle polling)
    scheduler_pop_latency_ms: LatencyHistogram = msgspec.field(default_factory=LatencyHistogram)
    job_start_latency_ms: LatencyHistogram = msgspec.field(default_factory=LatencyHistogram)


class HealthResult(msgspec.Struct, kw_only=True):
    ok: bool
    check: str
    problems: list[str]
    wal_bytes: int
    disk_free_bytes: int
    db_path: str
    schema_version: int
    version: str
    pid: int
    uptime_s: float
    state: str


class LogChunk(msgspec.Struct, kw_only=True):
    lines: list[str]
    offset: int  # pass it back to read what follows
    eof: bool  # the job has ended and everything it wrote has been read


class RunnerList(msgspec.Struct, kw_only=True):
    runners: list[RunnerInfo]


class Stopping(msgspec.Struct, kw_only=True):
    stopping: bool


class Authenticated(msgspec.Struct, kw_only=True):
    authenticated: bool


class MaintenanceReport(msgspec.Struct, kw_only=True):
    jobs_deleted: int
    files_deleted: int  # log files and artifact / work directories of deleted jobs
    orphans_deleted: int  # files and directories no job refers to
    vacuum: str  # "none", "incremental" or "full"
    db_bytes_before: int
    db_bytes_after: int
    duration_ms: int
    longest_hold_ms: float = 0.0  # the longest step that ran on the daemon's event loop
    phases_ms: dict[str, int] = msgspec.field(default_factory=dict)


class BackupReport(msgspec.Struct, kw_only=True):
    path: str
    bytes: int
    duration_ms: int


WAIT_TIMEOUT_MAX_MS = 3_600_000

# The one table of methods: name -> params type. Handlers live in api.py.
METHODS: dict[str, type[msgspec.Struct]] = {
    "dev.enqueue.v1": EnqueueRequest,
    "dev.enqueue_batch.v1": EnqueueBatchParams,
    "dev.cancel.v1": CancelParams,
    "jobs.get.v1": JobIdParams,
    "jobs.list.v1": ListParams,
    "jobs.wait.v1": WaitParams,
    "queues.list.v1": NoParams,
    "queues.pause.v1": QueueParams,
    "queues.resume.v1": QueueParams,
    "queues.configure.v1": ConfigureQueueParams,
    "jobs.retry.v1": JobIdParams,
    "logs.tail.v1": TailParams,
    "runners.list.v1": NoParams,
    "admin.stats.v1": NoParams,
    "admin.health.v1": HealthParams,
    "admin.shutdown.v1": NoParams,
    "admin.maintenance.v1": MaintenanceParams,
    "admin.backup.v1": BackupParams,
}

AUTH_METHOD = "auth"

_params_decoders = {name: msgspec.json.Decoder(t) for name, t in METHODS.items()}
_auth_decoder = msgspec.json.Decoder(AuthParams)
_request_decoder = msgspec.json.Decoder(Request)
_batch_decoder = msgspec.json.Decoder(list[msgspec.Raw])
_any_decoder = msgspec.json.Decoder()
_encoder = msgspec.json.Encoder()


# --------------------------------------------------------------------------- decoding


class Call(msgspec.Struct):
    """One decoded request: a method with typed params, or the error to answer it with."""

    id: Id
    is_notification: bool
    method: str = ""
    params: Any = None
    error: RpcError | None = None


# Besides DecodeError, msgspec raises these for input nested too deep or not UTF-8.
UNDECODABLE = (msgspec.DecodeError, RecursionError, UnicodeDecodeError)


def _unreadable(exc: Exception) -> RpcError:
    if isinstance(exc, RecursionError):
        return RpcError(PARSE_ERROR, "invalid JSON: nested too deeply")
    if isinstance(exc, UnicodeDecodeError):
        return RpcError(PARSE_ERROR, "invalid JSON: not valid UTF-8")
    return RpcError(PARSE_ERROR, "invalid JSON")


def _id_of(raw: bytes) -> Id:
    """Best-effort id of an invalid request, so its error can name it (else null)."""
    try:
        obj = _any_decoder.decode(raw)
    except UNDECODABLE:
        try:  # the stdlib reads what msgspec refuses, e.g. lone surrogates like "\ud800"
            obj = json.loads(raw)
        except (ValueError, RecursionError):
            return None
    if isinstance(obj, dict):
        value = obj.get("id")
        if isinstance(value, int | float | str) and not isinstance(value, bool):
            return value
    return None


def _field_of(exc: msgspec.ValidationError) -> str | None:
    """`$.jobs[3].priority` -> `jobs[3].priority`, from msgspec's message."""
    text = str(exc)
    marker = " - at `$"
    if marker in text:
        return text.rsplit(marker, 1)[1].rstrip("`").lstrip(".") or None
    if "unknown field `" in text:
        return text.split("unknown field `", 1)[1].split("`", 1)[0]
    if "missing required field `" in text:
        return text.split("missing required field `", 1)[1].split("`", 1)[0]
    return None


def decode_params(method: str, raw: msgspec.Raw) -> Any:
    """Typed params for `method`, or RpcError -32601 (unknown) / -32602 (bad params)."""
    decoder = _auth_decoder if method == AUTH_METHOD else _params_decoders.get(method)
    if decoder is None:
        raise RpcError(
            METHOD_NOT_FOUND,
            f"no method {method!r}; methods are: {', '.join(sorted(METHODS))}",
            {"method": method},
        )
    raw_bytes = bytes(raw)
    if raw_bytes.lstrip()[:1] == b"[":
        raise RpcError(
            INVALID_PARAMS,
            "params must be an object with named fields, not an array",
            {"method": method},
        )
    try:
        return decoder.decode(raw_bytes)
    except msgspec.ValidationError as exc:
        field = _field_of(exc)
        raise RpcError(
            INVALID_PARAMS, f"invalid params for {method}: {exc}", {"field": field}
        ) from None
    except UNDECODABLE as exc:
        raise _unreadable(exc) from None


def decode_call(raw: bytes) -> Call:
    """Decode one request object (not a batch) into a Call; never raises."""
    try:
        req = _request_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        if isinstance(exc, msgspec.ValidationError):
            field = _field_of(exc)
            return Call(
                id=_id_of(raw),
                is_notification=False,
                error=RpcError(
                    INVALID_REQUEST,
                    f"not a valid JSON-RPC 2.0 request: {exc}",
                    None if field is None else {"field": field},
                ),
            )
        return Call(id=None, is_notification=False, error=_unreadable(exc))
    except (RecursionError, UnicodeDecodeError) as exc:
        return Call(id=None, is_notification=False, error=_unreadable(exc))
    notification = req.id is msgspec.UNSET
    call_id = None if notification else req.id
    try:
        params = decode_params(req.method, req.params)
    except RpcError as err:
        return Call(id=call_id, is_notification=notification, method=req.method, error=err)
    return Call(id=call_id, is_notification=notification, method=req.method, params=params)


def decode_message(data: bytes) -> tuple[list[Call], bool] | Call:
    """Decode one message: a single request, or a batch.

    Returns a single Call, or (calls, True) for a batch. Malformed JSON becomes a
    -32700 Call; an empty batch a single -32600 Call.
    """
    stripped = data.lstrip()
    if stripped[:1] != b"[":
        return decode_call(data)
    try:
        items = _batch_decoder.decode(data)
    except msgspec.ValidationError:
        return Call(id=None, is_notification=False, error=RpcError(INVALID_REQUEST, "bad batch"))
    except UNDECODABLE as exc:
        return Call(id=None, is_notification=False, error=_unreadable(exc))
    if not items:
        return Call(
            id=None,
            is_notification=False,
            error=RpcError(INVALID_REQUEST, "an empty batch is not a valid request"),
        )
    return [decode_call(bytes(item)) for item in items], True


# --------------------------------------------------------------------------- encoding


def result_response(call_id: Id, result: Any) -> Response:
    return Response(result=result, id=call_id)


def error_response(call_id: Id, err: RpcError) -> Response:
    return Response(error=ErrorObject(err.code, err.message, err.data), id=call_id)


def encode(response: Response | list[Response]) -> bytes:
    return _encoder.encode(response)


def encode_request(method: str, params: Any, call_id: Id | msgspec.UnsetType) -> bytes:
    """A request as a client sends it (params may be a Struct or a dict)."""
    return _encoder.encode(
        Request(
            jsonrpc="2.0", method=method, params=msgspec.Raw(_encoder.encode(params)), id=call_id
        )
    )


def encode_value(value: Any) -> bytes:
    return _encoder.encode(value)
