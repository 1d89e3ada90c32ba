"""Latency histograms the daemon keeps, and the Prometheus text exposition of its
stats (`GET /metrics`, `semantica-cli metrics`).

The histograms are plain counters updated on the event loop (no locks, no threads).
At scrape time a collector turns the daemon's current stats into metric families,
and prometheus-client writes the exposition format.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from semantica import protocol as p

# Upper bounds in milliseconds; the last bucket (+Inf) takes the rest.
LATENCY_BUCKETS_MS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Histogram:
    """Counts of observations per bucket (not cumulative), their sum and count."""

    def __init__(self, bounds: tuple[float, ...] = LATENCY_BUCKETS_MS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def snapshot(self) -> p.LatencyHistogram:
        cumulative, running = [], 0
        for count in self.counts:
            running += count
            cumulative.append(running)
        return p.LatencyHistogram(
            count=self.count,
            sum_ms=round(self.sum, 3),
            buckets_ms=[*self.bounds, None],
            cumulative=cumulative,
        )


def _histogram(name: str, doc: str, h: p.LatencyHistogram) -> HistogramMetricFamily:
    """Milliseconds in, seconds out: Prometheus' base unit."""
    buckets = [
        ("+Inf" if bound is None else repr(bound / 1000), float(count))
        for bound, count in zip(h.buckets_ms, h.cumulative, strict=True)
    ]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=h.sum_ms / 1000)


class StatsCollector(Collector):
    def __init__(self, stats: Callable[[], p.StatsResult]) -> None:
        self.stats = stats

    def collect(self) -> Iterator[Metric]:
        s = self.stats()
        jobs = GaugeMetricFamily(
            "semantica_jobs", "Jobs in the database by queue and state.", labels=["queue", "state"]
        )
        for queue, counts in sorted(s.jobs_by_queue.items()):
            for state, n in sorted(counts.items()):
                jobs.add_metric([queue, state], n)
        yield jobs
        yield GaugeMetricFamily("semantica_jobs_running", "Jobs running now.", value=s.running)
        yield GaugeMetricFamily(
            "semantica_db_size_bytes", "Size of the database file.", value=s.db_size_bytes
        )
        yield GaugeMetricFamily(
            "semantica_uptime_seconds", "Seconds since the daemon started.", value=s.uptime_s
        )
        c = s.counters
        for name, value, doc in (
            ("semantica_job_enqueue", c.job_enqueue_total, "Jobs enqueued."),
            ("semantica_job_complete", c.job_complete_total, "Jobs that ended DONE."),
            ("semantica_job_failed", c.job_failed_total, "Jobs that ended FAILED."),
            ("semantica_job_retry", c.job_retry_total, "Attempts that failed and were retried."),
            ("semantica_wal_fsyncs", s.wal_fsyncs_total, "Group fsyncs of the WAL."),
            ("semantica_wal_checkpoints", s.wal_checkpoints_total, "WAL checkpoints."),
            ("semantica_maintenance_runs", s.maintenance_runs_total, "Maintenance runs."),
            ("semantica_dispatcher_wakeups", s.dispatcher_wakeups_total, "Dispatcher wake-ups."),
        ):
            yield CounterMetricFamily(name, doc + " Since the daemon started.", value=value)
        yield _histogram(
            "semantica_scheduler_pop_latency_seconds",
            "Time to claim the next job (the claim transaction).",
            s.scheduler_pop_latency_ms,
        )
        yield _histogram(
            "semantica_job_start_latency_seconds",
            "From a job's enqueue (or its schedule_at or backoff, when later) to its start.",
            s.job_start_latency_ms,
        )


def exposition(stats: Callable[[], p.StatsResult]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats))
    return generate_latest(registry)
