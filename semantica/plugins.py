"""The runner plugin contract, and the messages between the launcher and a runner.

A plugin is a callable registered under the entry point group `semantica.runners`;
the entry point's name is the job type (matched case-insensitively). It is called
with a `JobContext` inside a runner process — never inside the daemon — and returns
a JSON-able result summary.

    from semantica.plugins import JobContext, PermanentError

    def word_count(ctx: JobContext) -> dict:
        paths = ctx.payload.get("paths")
        if not isinstance(paths, list) or not paths:
            raise PermanentError("word_count: 'paths' must be a list")  # never retried
        counts = {}
        for done, path in enumerate(paths):
            if ctx.cancelled():  # SIGTERM arrived: stop early
                raise RuntimeError("cancelled")
            ctx.logger.info("counting %s", path)  # the logger writes to the job's log
            with open(path) as f:
                counts[path] = sum(len(line.split()) for line in f)
            ctx.progress((done + 1) / len(paths), path)
        return {"words": counts}

Raising `RetryableError(retry_after_ms=...)` asks for a retry after that delay; any
other exception fails the attempt and the job is retried with backoff. A plugin may
also return `Output(result_summary=..., artifacts=[...])` to report artifact paths
(relative ones are taken relative to `ctx.artifacts_dir`).

This module only reads entry point metadata: it never imports plugin code, so the
daemon may use it to list runners and check job types. It is also imported by every
runner process, so it stays cheap: msgspec and the standard library only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

if TYPE_CHECKING:
    import logging

ENTRY_POINT_GROUP = "semantica.runners"
RESULT_FD = 3  # the runner writes RunnerMessages here; stdout/stderr are the job's log
RESULT_FD_ENV = "SEMANTICA_RESULT_FD"  # when set, names the result fd instead of RESULT_FD
MAX_RESULT_SUMMARY_BYTES = 8 * 1024 * 1024  # encoded; a larger summary is a "bad_result"
MAX_PROGRESS_MESSAGE_CHARS = 1024  # longer progress messages are cut


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
    trace_id: str | None = None  # with tracing on: the attempt's trace, for its log lines


class WarmJob(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One line on a WARM worker's control channel: a job and where it runs."""

    spec: RunSpec
    env: dict[str, str]  # the job's own `env`, over the worker's allowlisted environment
    cwd: str
    log_path: str
    cpu_seconds: int  # CPU time this job may use, on top of what the worker has used


class Progress(msgspec.Struct, tag="progress", kw_only=True):
    fraction: float
    message: str | None = None


class Result(msgspec.Struct, tag="result", kw_only=True):
    """The attempt's outcome. `error_kind` None means success."""

    result_summary: Any = None
    artifacts: list[str] = msgspec.field(default_factory=list)
    # The exit status of what the plugin ran, when its exception told one (negative: a
    # signal), with error_kind "exit" or "signal"; None otherwise.
    exit_code: int | None = None
    # From the runner: "exception" | "exit" | "signal" | "retryable" (retried), or
    # "permanent" | "bad_result" |
    # "unknown_job_type" | "plugin_load" | "bad_spec" (with permanent=True).
    error_kind: str | None = None
    error_message: str | None = None
    permanent: bool = False
    retry_after_ms: int | None = None
    # A WARM worker that got SIGTERM during the job exits after sending this: the
    # daemon must not hand it another job (the signal may not have come from it).
    worker_exits: bool = False
    worker_exit_reason: str | None = None  # what the job left behind, if that is why
    # A WARM worker's own report after the job (Linux), so that the daemon need not
    # look: its resident memory, and whether the job left a process behind. The job
    # runs in that process and could misreport; it could as well tamper with the
    # worker itself, which is what WARM mode trusts a job not to do.
    worker_rss_bytes: int | None = None
    worker_children: bool | None = None


# The longest delay a RetryableError's retry_after_ms gets (a year): the runner and the
# daemon both hold it to this.
RETRY_AFTER_MAX_MS = 365 * 24 * 3600 * 1000


class Ready(msgspec.Struct, tag="ready", kw_only=True):
    """A WARM worker, once started and its plugins loaded: it takes a job at once."""


RunnerMessage = Progress | Result | Ready  # NDJSON lines on RESULT_FD, tagged by "type"


# --------------------------------------------------------------------------- plugin side


class Output(msgspec.Struct, kw_only=True):
    """What a plugin may return instead of a bare result summary, to report artifacts.

    `artifacts` are paths (str or os.PathLike); relative ones are taken relative to
    the job's `artifacts_dir`.
    """

    result_summary: Any = None
    artifacts: list[str] = msgspec.field(default_factory=list)


class JobContext:
    """What a plugin is called with: the job, a logger, artifacts, cancellation, progress.

    The runner builds it; a plugin's own tests may build one directly, e.g.
    `JobContext(job_id="t", payload={...}, artifacts_dir=tmp_path)`.
    """

    __slots__ = (
        "_artifacts_dir",
        "_artifacts_made",
        "_emit",
        "_is_cancelled",
        "attempt",
        "deadline_ms",
        "job_id",
        "job_type",
        "logger",
        "payload",
    )

    def __init__(
        self,
        *,
        job_id: str,
        payload: dict[str, Any],
        artifacts_dir: Path,
        attempt: int = 1,
        job_type: str = "",
        deadline_ms: int | None = None,
        logger: logging.Logger | None = None,
        emit: Callable[[Progress], None] | None = None,
        is_cancelled: Callable[[], bool] | None = None,
    ) -> None:
        if logger is None:
            import logging

            logger = logging.getLogger("semantica.job")
        self.job_id = job_id
        self.job_type = job_type
        self.payload = payload
        self.attempt = attempt
        self.deadline_ms = deadline_ms
        self._artifacts_dir = Path(artifacts_dir)
        self._artifacts_made = False
        self.logger = logger
        self._emit = emit
        self._is_cancelled = is_cancelled

    @property
    def artifacts_dir(self) -> Path:
        """The job's own directory for what it produces (made, 0700, when first asked
        for: most jobs write none, and a directory per job costs the disk)."""
        if not self._artifacts_made:
            self._artifacts_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._artifacts_made = True
        return self._artifacts_dir

    def cancelled(self) -> bool:
        """True once the job was asked to stop (SIGTERM): wind down, then return or raise."""
        return self._is_cancelled is not None and self._is_cancelled()

    def progress(self, fraction: float, message: str | None = None) -> None:
        """Report progress, 0.0 to 1.0, with an optional short message; sent at once."""
        if isinstance(fraction, bool) or not isinstance(fraction, int | float):
            raise TypeError(f"progress: fraction must be a number, got {fraction!r}")
        if not (math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
            raise ValueError(f"progress: fraction must be between 0 and 1, got {fraction!r}")
        if message is not None:
            if not isinstance(message, str):
                raise TypeError(f"progress: message must be a string, got {message!r}")
            message = message[:MAX_PROGRESS_MESSAGE_CHARS]
        if self._emit is not None:
            self._emit(Progress(fraction=float(fraction), message=message))

    def __repr__(self) -> str:
        return (
            f"JobContext(job_id={self.job_id!r}, job_type={self.job_type!r}, "
            f"attempt={self.attempt})"
        )


# --------------------------------------------------------------------------- discovery


class RunnerInfo(msgspec.Struct, kw_only=True):
    name: str
    target: str  # "package.module:callable"
    distribution: str | None
    version: str | None


def installed_runners() -> dict[str, RunnerInfo]:
    """Every installed runner plugin by lower-cased job type. Imports no plugin code."""
    import importlib.metadata  # here: a runner process that never asks does not pay for it

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
