"""The daemon's log lines (SPEC §9): what `log.event` writes, pretty and as JSON."""

from __future__ import annotations

import io
import json
import logging
import re
import time

import pytest

from semantica import log

TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z"


@pytest.fixture
def logged():
    """Set the daemon's logging up on a buffer; give back a reader of its lines."""
    buffer = io.StringIO()
    logger = logging.getLogger(log.LOGGER_NAME)
    saved = (logger.handlers[:], logger.level, logger.propagate)

    def lines(fmt: str = "json", level: str = "info"):
        log.setup(fmt, level, stream=buffer)
        return lambda: buffer.getvalue().splitlines()

    yield lines
    logger.handlers[:], logger.level, logger.propagate = saved


def test_json_event_carries_its_fields_in_order(logged):
    read = logged("json")
    log.event("job_state_changed", job_id="J1", state="DONE", attempt=1, duration_ms=3)
    [line] = read()
    doc = json.loads(line)
    assert list(doc) == ["ts", "level", "event", "job_id", "state", "attempt", "duration_ms"]
    assert doc["level"] == "info" and doc["event"] == "job_state_changed"
    assert doc["job_id"] == "J1" and doc["attempt"] == 1 and doc["duration_ms"] == 3
    assert re.fullmatch(TS, doc["ts"])


def test_timestamp_is_utc_with_milliseconds_and_follows_the_clock(logged, monkeypatch):
    read = logged("json")
    for now in (1_700_000_000.250, 1_700_000_000.999, 1_700_000_001.004):
        monkeypatch.setattr(time, "time", lambda now=now: now)
        log.event("tick")
    stamps = [json.loads(line)["ts"] for line in read()]
    assert stamps == [
        "2023-11-14T22:13:20.250Z",
        "2023-11-14T22:13:20.999Z",  # the same second, made once
        "2023-11-14T22:13:21.004Z",  # the next second: made anew
    ]


def test_pretty_line_quotes_values_with_spaces(logged):
    read = logged("pretty")
    log.warning("job_end_dropped", job_id="J2", reason="the job was deleted while it ran")
    [line] = read()
    assert re.fullmatch(
        TS + r" WARNING job_end_dropped job_id=J2 reason='the job was deleted while it ran'",
        line,
    )


def test_level_filters_and_exceptions_carry_their_traceback(logged):
    read = logged("json", level="warning")
    log.event("not_shown")
    log.debug("not_shown_either")
    try:
        raise ValueError("bad value")
    except ValueError:
        log.error("request_failed", exc_info=True, method="jobs.get.v1")
    [line] = read()
    doc = json.loads(line)
    assert doc["event"] == "request_failed" and doc["level"] == "error"
    assert doc["method"] == "jobs.get.v1"
    assert "ValueError: bad value" in doc["traceback"]


def test_records_from_the_logging_module_look_the_same(logged):
    read = logged("json")
    logging.getLogger(log.LOGGER_NAME).info("plain_record")
    log.event("plain_record")
    first, second = (json.loads(line) for line in read())
    assert first.keys() == second.keys() and first["event"] == second["event"]


def test_a_broken_stream_never_reaches_the_caller(logged, capsys):
    class Broken(io.StringIO):
        def write(self, text):
            raise OSError("disk full")

    log.setup("json", "info", stream=Broken())
    log.event("job_state_changed", job_id="J3")  # must not raise
    assert "disk full" in capsys.readouterr().err  # logging's own report of the failure
