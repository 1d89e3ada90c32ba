"""Semantica: a local, durable task queue for AI coding agents.

The names below are imported lazily, on first use: runner processes import
`semantica.plugins` and must not pay for the SDK (or the store behind it) to start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "AsyncClient": "semantica.client",
    "Client": "semantica.client",
    "ConnectionLost": "semantica.errors",
    "DaemonNotRunning": "semantica.errors",
    "EnqueueRequest": "semantica.domain",
    "Job": "semantica.domain",
    "JobContext": "semantica.plugins",
    "NotFound": "semantica.errors",
    "Output": "semantica.plugins",
    "PermanentError": "semantica.plugins",
    "RetryableError": "semantica.plugins",
    "SemanticaError": "semantica.errors",
    "State": "semantica.domain",
    "ValidationFailed": "semantica.errors",
}

if TYPE_CHECKING:
    from semantica.client import AsyncClient, Client
    from semantica.domain import EnqueueRequest, Job, State
    from semantica.errors import (
        ConnectionLost,
        DaemonNotRunning,
        NotFound,
        SemanticaError,
        ValidationFailed,
    )
    from semantica.plugins import JobContext, Output, PermanentError, RetryableError

__all__ = [
    "AsyncClient",
    "Client",
    "ConnectionLost",
    "DaemonNotRunning",
    "EnqueueRequest",
    "Job",
    "JobContext",
    "NotFound",
    "Output",
    "PermanentError",
    "RetryableError",
    "SemanticaError",
    "State",
    "ValidationFailed",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'semantica' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
