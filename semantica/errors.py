"""Errors the SDK raises: one class per stable JSON-RPC error code (SPEC §6)."""

from __future__ import annotations

from typing import Any

from semantica import protocol as p


class SemanticaError(Exception):
    """An error answered by the daemon: `code`, a message to act on, and `data`."""

    code: int = p.INTERNAL_ERROR

    def __init__(self, message: str, *, code: int | None = None, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.data = data

    def __str__(self) -> str:
        return f"{self.message} (error {self.code})" if self.code else self.message


class DaemonNotRunning(SemanticaError):
    """Nothing answers on the socket or port: the daemon is not running."""

    code = 0


class ConnectionLost(SemanticaError):
    """The connection broke mid-call; the call may or may not have been carried out."""

    code = 0


class ProtocolError(SemanticaError):
    """The request was malformed JSON-RPC (-32700, -32600, -32601, -32602)."""


class InternalError(SemanticaError):
    code = p.INTERNAL_ERROR


class ValidationFailed(SemanticaError):
    code = p.VALIDATION


class NotFound(SemanticaError):
    code = p.NOT_FOUND


class Conflict(SemanticaError):
    code = p.CONFLICT


class TooLarge(SemanticaError):
    code = p.TOO_LARGE


class RateLimited(SemanticaError):
    code = p.RATE_LIMITED


class Unauthorized(SemanticaError):
    code = p.UNAUTHORIZED


class StorageUnavailable(SemanticaError):
    code = p.STORAGE_UNAVAILABLE


_BY_CODE: dict[int, type[SemanticaError]] = {
    p.PARSE_ERROR: ProtocolError,
    p.INVALID_REQUEST: ProtocolError,
    p.METHOD_NOT_FOUND: ProtocolError,
    p.INVALID_PARAMS: ProtocolError,
    p.INTERNAL_ERROR: InternalError,
    p.VALIDATION: ValidationFailed,
    p.NOT_FOUND: NotFound,
    p.CONFLICT: Conflict,
    p.TOO_LARGE: TooLarge,
    p.RATE_LIMITED: RateLimited,
    p.UNAUTHORIZED: Unauthorized,
    p.STORAGE_UNAVAILABLE: StorageUnavailable,
}


def error_from(err: p.ErrorObject) -> SemanticaError:
    """The SemanticaError subclass for an error object from the daemon."""
    cls = _BY_CODE.get(err.code, SemanticaError)
    return cls(err.message, code=err.code, data=err.data)


def error_for(exc: Exception) -> SemanticaError:
    """The SemanticaError the daemon would answer for this exception from the store
    (4001 naming the field, 4004, ...): for the CLI reading a stopped daemon's data."""
    err = p.rpc_error_for(exc)
    return error_from(p.ErrorObject(code=err.code, message=err.message, data=err.data))
