"""Semantica: a local, durable task queue for AI coding agents."""

__version__ = "0.1.0"

from semantica.client import AsyncClient, Client
from semantica.domain import EnqueueRequest, Job, State
from semantica.errors import (
    ConnectionLost,
    DaemonNotRunning,
    NotFound,
    SemanticaError,
    ValidationFailed,
)
from semantica.plugins import PermanentError, RetryableError

__all__ = [
    "AsyncClient",
    "Client",
    "ConnectionLost",
    "DaemonNotRunning",
    "EnqueueRequest",
    "Job",
    "NotFound",
    "PermanentError",
    "RetryableError",
    "SemanticaError",
    "State",
    "ValidationFailed",
    "__version__",
]
