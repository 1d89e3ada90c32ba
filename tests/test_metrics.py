"""Metrics: admin.stats.v1's counters and latency histograms, and the same as
Prometheus text from GET /metrics (parsed with prometheus-client's own parser)."""

from __future__ import annotations

import http.client
import subprocess
import sys
from pathlib import Path

import pytest
from harness import http_post, remove_home, start_daemon
from prometheus_client.parser import text_string_to_metric_families

from semantica.metrics import Histogram

CLI = str(Path(sys.executable).with_name("semantica-cli"))


@pytest.fixture(scope="module")
def daemon():
    d = start_daemon(SEMANTICA_WORKERS="2")
    with d.client() as c:
        jobs = [c.enqueue(job_type="noop") for _ in range(3)]
        jobs.append(c.enqueue(job_type="fail", payload={"mode": "permanent"}))
        for job in jobs:
            c.wait(job.id, timeout_ms=20_000)
    yield d
    d.stop()
    remove_home(d.home)


def families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(family, suffix: str = "", **labels) -> float:
    for s in family.samples:
        if s.name == family.name + suffix and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    raise AssertionError(f"no sample {family.name}{suffix} {labels}")


def get_metrics(daemon, *, tcp: bool = False, token: str | None = None) -> tuple[int, str, str]:
    if tcp:
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
    else:
        import socket

        conn = http.client.HTTPConnection("localhost", timeout=10)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(daemon.socket_path))
        conn.sock = sock
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        conn.request("GET", "/metrics", headers=headers)
        r = conn.getresponse()
        return r.status, r.getheader("content-type"), r.read().decode()
    finally:
        conn.close()


def test_stats_carry_counters_and_latency_histograms(daemon):
    with daemon.client() as c:
        stats = c.stats()
    assert stats.counters.job_complete_total == 3 and stats.counters.job_failed_total == 1
    pop = stats.scheduler_pop_latency_ms
    assert pop.count >= 4 and pop.cumulative[-1] == pop.count and pop.buckets_ms[-1] is None
    start = stats.job_start_latency_ms
    assert start.count == 4 and start.sum_ms >= 0


def test_get_metrics_over_the_unix_socket_parses_as_prometheus_text(daemon):
    status, content_type, text = get_metrics(daemon)
    assert status == 200 and content_type.startswith("text/plain; version=0.0.4")
    f = families(text)
    assert sample(f["semantica_job_complete"], "_total") == 3
    assert sample(f["semantica_job_failed"], "_total") == 1
    assert sample(f["semantica_jobs"], state="DONE", queue="default") == 3
    pop = f["semantica_scheduler_pop_latency_seconds"]
    assert pop.type == "histogram" and sample(pop, "_count") >= 4
    assert sample(pop, "_bucket", le="+Inf") == sample(pop, "_count")
    assert sample(f["semantica_job_start_latency_seconds"], "_count") == 4


def test_metrics_over_tcp_need_the_token(daemon):
    assert get_metrics(daemon, tcp=True)[0] == 401
    status, _, text = get_metrics(daemon, tcp=True, token=daemon.token)
    assert status == 200 and "semantica_uptime_seconds" in text


def test_metrics_answers_only_get_and_the_root_only_post(daemon):
    status, body = http_post(daemon, b'{"jsonrpc":"2.0","method":"admin.stats.v1","id":1}')
    assert status == 200 and b'"scheduler_pop_latency_ms"' in body
    auth = {"Authorization": f"Bearer {daemon.token}"}
    for method, path in (("POST", "/metrics"), ("GET", "/")):
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=10)
        conn.request(method, path, body=b"{}" if method == "POST" else None, headers=auth)
        assert conn.getresponse().status == 405, (method, path)
        conn.close()


def test_cli_metrics_prints_the_exposition_and_json_stats(daemon):
    env = {"SEMANTICA_HOME": str(daemon.home), "PATH": "/usr/bin:/bin"}
    text = subprocess.run([CLI, "metrics"], capture_output=True, text=True, env=env, check=True)
    assert "semantica_scheduler_pop_latency_seconds_bucket" in text.stdout
    as_json = subprocess.run(
        [CLI, "metrics", "--json"], capture_output=True, text=True, env=env, check=True
    )
    assert '"job_start_latency_ms"' in as_json.stdout


def test_histogram_buckets_are_cumulative_and_bounded():
    h = Histogram(bounds=(1, 10))
    for value in (0.5, 1, 5, 50):
        h.observe(value)
    snap = h.snapshot()
    assert snap.cumulative == [2, 3, 4] and snap.buckets_ms == [1, 10, None]
    assert snap.count == 4 and snap.sum_ms == 56.5
