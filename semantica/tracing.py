"""OpenTelemetry tracing, an optional extra: `pip install 'semantica[otel]'`.

With `OTEL_EXPORTER_OTLP_ENDPOINT` set and the extra installed, every job attempt is
one span, from the moment the job was ready (its enqueue, or its schedule_at or
backoff when later) through its claim and run to its finish, with the job's
attributes and events `claimed` and `finished`. Its trace id goes into the job's own
log lines and the daemon's `job_state_changed` records. Without the variable or the
extra, nothing here is imported beyond this module and the daemon runs as before;
with both but no collector answering, it runs and logs one warning.
The spans' service name is `OTEL_SERVICE_NAME` when set, "semantica" otherwise.
"""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import unquote, urlsplit

from semantica import log
from semantica.domain import Job, State

SERVICE_NAME = "semantica"
PROBE_TIMEOUT_S = 0.5
FLUSH_AT_EXIT_S = 2.0  # how long a stopping daemon waits for its last spans to leave


class JobTracing:
    """One span per job attempt, kept from claim to finish."""

    def __init__(self, tracer: Any, *, provider: Any = None) -> None:
        from opentelemetry import trace

        self._trace = trace
        self.tracer = tracer
        self.provider = provider  # the TracerProvider made here, if any (to flush it)
        self._spans: dict[str, Any] = {}

    def begin(self, job: Job, now_ms: int) -> str:
        """The attempt was claimed: open its span (backdated to when the job was
        ready) and return its trace id (32 hex digits)."""
        ready_ms = max(job.created_at, job.run_after)
        span = self.tracer.start_span(
            f"job {job.job_type}",
            start_time=ready_ms * 1_000_000,
            attributes={
                "semantica.job.id": job.id,
                "semantica.job.type": job.job_type,
                "semantica.job.queue": job.queue,
                "semantica.job.attempt": job.attempt,
                "semantica.job.priority": job.priority,
                **({"semantica.job.subject_key": job.subject_key} if job.subject_key else {}),
            },
        )
        span.add_event("enqueued", timestamp=job.created_at * 1_000_000)
        span.add_event("claimed", timestamp=now_ms * 1_000_000)
        self._spans[job.id] = span
        return self.trace_id(job.id) or ""

    def close(self, timeout_s: float = FLUSH_AT_EXIT_S) -> bool:
        """Send the spans not yet exported, waiting at most `timeout_s`; False if they
        did not all leave. The SDK's own flush at exit waits out its exporter's retries
        (about 7 s against a collector that is down), which kept a stopped daemon's
        process alive: here it runs in a daemon thread that the exit does not wait for."""
        if self.provider is None:
            return True
        flushing = threading.Thread(
            target=self.provider.shutdown, name="semantica-tracing-flush", daemon=True
        )
        flushing.start()
        flushing.join(timeout_s)
        if flushing.is_alive():
            log.warning(
                "tracing_spans_dropped",
                reason=f"the collector did not take the last spans within {timeout_s:g} s",
                advice="check OTEL_EXPORTER_OTLP_ENDPOINT; jobs are not affected",
            )
            return False
        return True

    def trace_id(self, job_id: str) -> str | None:
        span = self._spans.get(job_id)
        if span is None:
            return None
        return format(span.get_span_context().trace_id, "032x")

    def end(self, job: Job, now_ms: int) -> None:
        """The attempt ended (the job as recorded after it)."""
        span = self._spans.pop(job.id, None)
        if span is None:
            return
        span.set_attribute("semantica.job.state", job.state.value)
        if job.error_kind:
            span.set_attribute("semantica.job.error_kind", job.error_kind)
        failed = job.state is State.FAILED or (job.state is State.QUEUED and job.error_kind)
        if failed:
            span.set_status(self._trace.Status(self._trace.StatusCode.ERROR, job.error_message))
        span.add_event("finished", timestamp=now_ms * 1_000_000)
        span.end(end_time=now_ms * 1_000_000)


def service_name(env: Mapping[str, str]) -> str:
    """The `service.name` of the spans, in OpenTelemetry's own order: `OTEL_SERVICE_NAME`,
    then `service.name` in `OTEL_RESOURCE_ATTRIBUTES`, then "semantica" (where the SDK
    would say "unknown_service")."""
    if name := env.get("OTEL_SERVICE_NAME", "").strip():
        return name
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, _, value = item.partition("=")
        if key.strip() == "service.name" and value.strip():
            return unquote(value.strip())
    return SERVICE_NAME


def from_environment(
    env: Mapping[str, str] | None = None, *, exporter: Any = None
) -> JobTracing | None:
    """Tracing as the environment asks: None unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set
    and the `otel` extra is installed (each case logged once). Spans go to `exporter`
    (an OTLP/HTTP exporter unless given: tests pass the SDK's in-memory one)."""
    env = dict(os.environ if env is None else env)
    endpoint = env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    if not endpoint:
        return None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        log.warning(
            "tracing_off",
            reason=f"OTEL_EXPORTER_OTLP_ENDPOINT is set but the otel extra is missing ({exc})",
            fix="pip install 'semantica[otel]'",
        )
        return None
    if not _reachable(endpoint):
        # One warning here; the exporter's own retries would log one per batch.
        import logging

        logging.getLogger("opentelemetry.exporter.otlp").setLevel(logging.CRITICAL)
        logging.getLogger("opentelemetry.sdk.trace.export").setLevel(logging.CRITICAL)
        log.warning(
            "tracing_collector_unreachable",
            endpoint=endpoint,
            advice="spans are exported if it comes up; jobs run either way",
        )
    name = service_name(env)
    # Attributes given here win over the SDK's environment detector, so the name is
    # resolved above; the other OTEL_RESOURCE_ATTRIBUTES still come from the detector.
    provider = TracerProvider(resource=Resource.create({"service.name": name}))
    provider.add_span_processor(BatchSpanProcessor(exporter or OTLPSpanExporter()))
    log.event("tracing_on", endpoint=endpoint, service_name=name)
    return JobTracing(provider.get_tracer("semantica"), provider=provider)


def _reachable(endpoint: str) -> bool:
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    port = parts.port or (443 if parts.scheme == "https" else 4318)
    try:
        with socket.create_connection((parts.hostname or "localhost", port), PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False
