"""Structured logging: one event name plus fields, rendered pretty or as JSON lines.

`log.event("job_state_changed", job_id=..., state="DONE")` is the only call the rest
of the code needs. Payloads and secrets are never passed here (SPEC §9).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import msgspec

LOGGER_NAME = "semantica"
_encode = msgspec.json.Encoder().encode

_LEVEL_COLOURS = {"DEBUG": "\x1b[2m", "INFO": "", "WARNING": "\x1b[33m", "ERROR": "\x1b[31m"}


_second: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def _timestamp(created: float) -> str:
    """`created` (time.time()) as UTC ISO 8601 with milliseconds; the text of each
    second is made once (strftime is most of a log line's cost)."""
    global _second
    second = int(created)
    cached = _second  # one read: another thread may replace it meanwhile
    if cached[0] != second:
        cached = _second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
    return f"{cached[1]}.{int(created * 1000) % 1000:03d}Z"


class _EventFormatter(logging.Formatter):
    """A record from the logging module, as the line `line` makes of an event's parts
    (the daemon's handler calls `line` directly, see EventHandler)."""

    def format(self, record: logging.LogRecord) -> str:
        traceback = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(
            record.created,
            record.levelname,
            record.getMessage(),
            getattr(record, "fields", {}),
            traceback,
        )

    def line(
        self,
        created: float,
        level: str,
        name: str,
        fields: dict[str, Any],
        traceback: str | None = None,
    ) -> str:
        raise NotImplementedError


class JsonFormatter(_EventFormatter):
    def line(
        self,
        created: float,
        level: str,
        name: str,
        fields: dict[str, Any],
        traceback: str | None = None,
    ) -> str:
        doc: dict[str, Any] = {"ts": _timestamp(created), "level": level.lower(), "event": name}
        doc.update(fields)
        if traceback:
            doc["traceback"] = traceback
        return _encode(doc).decode()


class PrettyFormatter(_EventFormatter):
    def __init__(self, colour: bool) -> None:
        super().__init__()
        self.colour = colour

    def line(
        self,
        created: float,
        level: str,
        name: str,
        fields: dict[str, Any],
        traceback: str | None = None,
    ) -> str:
        line = f"{_timestamp(created)} {level:<7} {name}"
        if fields:
            line += " " + " ".join(f"{k}={_pretty_value(v)}" for k, v in fields.items())
        if self.colour and (start := _LEVEL_COLOURS.get(level)):
            line = f"{start}{line}\x1b[0m"
        if traceback:
            line += "\n" + traceback
        return line


class EventHandler(logging.StreamHandler):
    """The daemon's handler. `event()` hands it an event's parts directly (`emit_event`),
    without building a LogRecord: a job's state changes are logged several times per
    job, and the logging module's record, caller lookup and formatting were a tenth of
    the daemon's time per WARM job. Records from elsewhere come in as usual (`emit`)."""

    def __init__(self, stream: Any, formatter: _EventFormatter) -> None:
        super().__init__(stream)
        self.setFormatter(formatter)
        self.line = formatter.line

    def emit_event(self, level: int, name: str, fields: dict[str, Any]) -> None:
        try:
            text = self.line(time.time(), logging.getLevelName(level), name, fields)
            with self.lock:  # type: ignore[union-attr]  # a worker thread may log too
                self.stream.write(text + "\n")
                self.stream.flush()
        except Exception:  # as logging does: a log line's trouble never reaches the caller
            self.handleError(logging.LogRecord(LOGGER_NAME, level, "", 0, name, None, None))


def _pretty_value(value: Any) -> str:
    text = value if isinstance(value, str) else _encode(value).decode()
    return repr(text) if (" " in text or not text) else text


def setup(fmt: str = "pretty", level: str = "info", stream=None) -> None:
    """Send the daemon's events to `stream` (stderr) in `fmt` at `level`."""
    stream = stream or sys.stderr
    colour = fmt == "pretty" and hasattr(stream, "isatty") and stream.isatty()
    handler = EventHandler(stream, JsonFormatter() if fmt == "json" else PrettyFormatter(colour))
    logger = logging.getLogger(LOGGER_NAME)
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False


_logger = logging.getLogger(LOGGER_NAME)


def event(name: str, *, level: int = logging.INFO, exc_info: bool = False, **fields: Any) -> None:
    """Log one structured event."""
    if not _logger.isEnabledFor(level):
        return
    handlers = _logger.handlers
    if not exc_info and len(handlers) == 1 and type(handlers[0]) is EventHandler:
        handlers[0].emit_event(level, name, fields)  # the daemon's own handler: direct
    else:
        _logger.log(level, name, extra={"fields": fields}, exc_info=exc_info)


def enabled(level: int) -> bool:
    """Whether events at `level` are written: a loop can ask once, not per event."""
    return _logger.isEnabledFor(level)


def warning(name: str, **fields: Any) -> None:
    event(name, level=logging.WARNING, **fields)


def error(name: str, *, exc_info: bool = False, **fields: Any) -> None:
    event(name, level=logging.ERROR, exc_info=exc_info, **fields)


def debug(name: str, **fields: Any) -> None:
    event(name, level=logging.DEBUG, **fields)
