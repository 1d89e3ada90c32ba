"""Tracing (the `otel` extra): one span per job attempt, captured with the SDK's
in-memory exporter around a real dispatcher, store and runner processes; and a real
daemon whose collector is unreachable runs its jobs and warns once."""

from __future__ import annotations

import json
import random
import sys
import time

import pytest
import trio
from conftest import ALL_MET
from harness import free_port, remove_home, start_daemon
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from semantica import tracing
from semantica.domain import EnqueueRequest, State
from semantica.launcher import Launcher
from semantica.scheduler import Dispatcher
from semantica.store import Store


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


async def run_jobs(tmp_path, requests):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    store = Store.open(tmp_path / "meta.db")
    ended = {}
    dispatcher = Dispatcher(
        store,
        Launcher(home=tmp_path, env_allowlist=frozenset({"PATH"})),
        workers=2,
        clock=wall_ms,
        conditions=lambda: ALL_MET,
        on_job_changed=lambda job: ended.__setitem__(job.id, job) if job.is_terminal else None,
        rng=random.Random(0),
        tracing=tracing.JobTracing(provider.get_tracer("test")),
    )
    ids = [store.enqueue(r, now=wall_ms()).job.id for r in requests]
    async with trio.open_nursery() as nursery:
        await nursery.start(dispatcher.run)
        with trio.fail_after(30):
            while len(ended) < len(ids):
                await trio.sleep(0.02)
        nursery.cancel_scope.cancel()
    store.close()
    return ids, ended, exporter.get_finished_spans()


async def test_each_attempt_is_a_span_from_ready_to_finish(tmp_path):
    requests = [
        EnqueueRequest(job_type="noop", subject_key="a.py", queue="q"),
        EnqueueRequest(
            job_type="fail", payload={"mode": "exception"}, max_attempts=2, backoff_base_ms=10
        ),
    ]
    (ok_id, failing_id), ended, spans = await run_jobs(tmp_path, requests)
    assert ended[ok_id].state is State.DONE and ended[failing_id].state is State.FAILED
    by_job = {}
    for span in spans:
        by_job.setdefault(span.attributes["semantica.job.id"], []).append(span)
    (ok,) = by_job[ok_id]
    assert ok.name == "job noop"
    assert ok.attributes["semantica.job.queue"] == "q"
    assert ok.attributes["semantica.job.subject_key"] == "a.py"
    assert ok.attributes["semantica.job.state"] == "DONE"
    assert [e.name for e in ok.events] == ["enqueued", "claimed", "finished"]
    assert ok.start_time <= ok.events[1].timestamp <= ok.end_time
    assert ok.status.status_code is StatusCode.UNSET
    attempts = sorted(by_job[failing_id], key=lambda s: s.attributes["semantica.job.attempt"])
    assert [s.attributes["semantica.job.attempt"] for s in attempts] == [1, 2]
    assert attempts[0].attributes["semantica.job.state"] == "QUEUED"  # retried
    assert all(s.status.status_code is StatusCode.ERROR for s in attempts)
    assert attempts[1].attributes["semantica.job.error_kind"] == "exception"
    # The job's own log lines carry the attempt's trace id.
    trace_id = format(ok.context.trace_id, "032x")
    log_text = (tmp_path / "logs" / f"{ok_id}.log").read_text()
    assert f"semantica.job trace_id={trace_id}: job {ok_id} attempt 1" in log_text


def traced_service_name(tmp_path, env: dict[str, str]) -> str:
    """The service.name on a span made by the tracing `from_environment` sets up, caught
    by the SDK's in-memory exporter in place of the OTLP one."""
    exporter = InMemorySpanExporter()
    traced = tracing.from_environment(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}", **env},
        exporter=exporter,
    )
    assert traced is not None and traced.provider is not None
    store = Store.open(tmp_path / f"meta-{len(list(tmp_path.iterdir()))}.db")
    try:
        job = store.enqueue(EnqueueRequest(job_type="noop"), now=wall_ms()).job
    finally:
        store.close()
    traced.begin(job, wall_ms())
    traced.end(job, wall_ms())
    assert traced.provider.force_flush(5_000)
    (span,) = exporter.get_finished_spans()
    assert span.attributes["semantica.job.id"] == job.id
    traced.provider.shutdown()
    return span.resource.attributes["service.name"]


def test_the_service_name_is_otel_service_name_when_set_else_semantica(tmp_path):
    assert traced_service_name(tmp_path, {}) == "semantica"
    assert traced_service_name(tmp_path, {"OTEL_SERVICE_NAME": "indexer-7"}) == "indexer-7"
    assert traced_service_name(tmp_path, {"OTEL_SERVICE_NAME": ""}) == "semantica"
    # OpenTelemetry's order: OTEL_SERVICE_NAME, then service.name in the resource attributes.
    attrs = {"OTEL_RESOURCE_ATTRIBUTES": "deployment.environment=prod,service.name=idx%20b"}
    assert traced_service_name(tmp_path, attrs) == "idx b"
    both = {**attrs, "OTEL_SERVICE_NAME": "wins"}
    assert traced_service_name(tmp_path, both) == "wins"


def test_off_without_the_variable():
    assert tracing.from_environment({}) is None


def test_off_with_a_warning_without_the_extra(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # as if not installed
    with caplog.at_level("WARNING"):
        assert tracing.from_environment({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:1"}) is None
    (record,) = [r for r in caplog.records if r.getMessage() == "tracing_off"]
    assert "semantica[otel]" in record.fields["fix"]


@pytest.fixture
def unreachable_collector_daemon():
    # The exporter's own timeout stays at its default (10 s: 1 + 2 + 4 s of backoff
    # against a closed port), so the stop below shows the daemon does not wait it out.
    d = start_daemon(OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{free_port()}")
    yield d
    d.stop()
    remove_home(d.home)


def test_an_unreachable_collector_warns_once_and_jobs_run(unreachable_collector_daemon):
    d = unreachable_collector_daemon
    with d.client() as c:
        jobs = [c.enqueue(job_type="noop") for _ in range(3)]
        assert all(c.wait(j.id, timeout_ms=20_000).state is State.DONE for j in jobs)
    d.stop()
    records = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    warnings = [r for r in records if r.get("event") == "tracing_collector_unreachable"]
    assert len(warnings) == 1
    changes = [r for r in records if r.get("event") == "job_state_changed"]
    attempts = [r for r in changes if r["state"] != "QUEUED"]  # RUNNING, then DONE
    assert len(attempts) == 6 and all(len(r.get("trace_id", "")) == 32 for r in attempts)
    assert "Traceback" not in d.log()


def test_a_stopping_daemon_waits_for_a_collector_that_is_down_two_seconds_at_most(
    unreachable_collector_daemon,
):
    d = unreachable_collector_daemon
    with d.client() as c:
        job = c.enqueue(job_type="noop")
        assert c.wait(job.id, timeout_ms=20_000).state is State.DONE
    began = time.monotonic()
    assert d.stop() == 0
    took = time.monotonic() - began
    # The SDK's own flush at exit took 7 s here: its exporter's retries.
    assert took < tracing.FLUSH_AT_EXIT_S + 2.5, f"the daemon took {took:.1f} s to exit"
    records = [json.loads(line) for line in d.log().splitlines() if line.startswith("{")]
    (dropped,) = [r for r in records if r.get("event") == "tracing_spans_dropped"]
    assert "OTEL_EXPORTER_OTLP_ENDPOINT" in dropped["advice"]
    assert records[-1]["event"] == "daemon_stopped"
