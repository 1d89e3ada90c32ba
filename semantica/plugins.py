"""The runner plugin contract, and the messages between the launcher and a runner.

A plugin is a callable registered under the entry point group `semantica.runners`;
the entry point's name is the job type (matched case-insensitively). It is called
with a `JobContext` inside a runner process — never inside the daemon — and returns
a JSON-able result summary.

This module only reads entry point metadata: it never imports plugin code, so the
daemon may use it to list runners and check job types.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import msgspec

ENTRY_POINT_GROUP = "semantica.runners"
RESULT_FD = 3  # the runner writes RunnerMessages here; stdout/stderr are the job's log


class PermanentError(Exception):
    """Raise from a plugin to fail the job at once, without retrying (bad payload...)."""


class RetryableError(Exception):
    """Raise from a plugin to fail this attempt and retry after `retry_after_ms`."""

    def __init__(self, message: str = "", *, retry_after_ms: int | None = None) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms


# --------------------------------------------------------------------------- wire


class RunSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """What the launcher hands a runner on its stdin: one JSON document."""

    job_id: str
    job_type: str
    payload: dict[str, Any]
    attempt: int
    artifacts_dir: str
    deadline_ms: int


class Progress(msgspec.Struct, tag="progress", kw_only=True):
    fraction: float
    message: str | None = None


class Result(msgspec.Struct, tag="result", kw_only=True):
    """The attempt's outcome. `error_kind` None means success."""

    result_summary: Any = None
    artifacts: list[str] = msgspec.field(default_factory=list)
    error_kind: str | None = None  # "exception" | "permanent" | "retryable" | "bad_result"
    error_message: str | None = None
    permanent: bool = False
    retry_after_ms: int | None = None


RunnerMessage = Progress | Result  # NDJSON lines on RESULT_FD, tagged by "type"


# --------------------------------------------------------------------------- discovery


class RunnerInfo(msgspec.Struct, kw_only=True):
    name: str
    target: str  # "package.module:callable"
    distribution: str | None
    version: str | None


def installed_runners() -> dict[str, RunnerInfo]:
    """Every installed runner plugin by lower-cased job type. Imports no plugin code."""
    found: dict[str, RunnerInfo] = {}
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        found.setdefault(
            ep.name.lower(),
            RunnerInfo(
                name=ep.name.lower(),
                target=ep.value,
                distribution=dist.metadata["Name"] if dist is not None else None,
                version=dist.version if dist is not None else None,
            ),
        )
    return found
