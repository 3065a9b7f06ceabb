"""Metrics over real HTTP: start the endpoint, move values, scrape, parse."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from vnpd.config import parse_listen
from vnpd.daemon.metrics import BusyTracker, Metrics


def scrape(host: str, port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics and return {(sample name, sorted labels): value}."""
    url_host = f"[{host}]" if ":" in host else host
    with urllib.request.urlopen(f"http://{url_host}:{port}/metrics", timeout=5) as resp:
        assert resp.status == 200
        text = resp.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def test_scrape_shows_updates() -> None:
    metrics = Metrics()
    bound = metrics.start_server(parse_listen("127.0.0.1:0"))
    assert bound is not None
    host, port = bound
    assert host == "127.0.0.1" and port > 0
    try:
        before = scrape(host, port)
        assert before[("vnpd_jobs_total", (("outcome", "published"),))] == 0
        assert before[("vnpd_tokens_total", ())] == 0

        metrics.jobs_total.labels(outcome="published").inc()
        metrics.jobs_total.labels(outcome="failed").inc(2)
        metrics.queue_depth.set(4)
        metrics.queued_sequences.set(1234)
        metrics.sequences_total.inc(10)
        metrics.tokens_total.inc(4096)
        metrics.batch_latency_seconds.labels(device="cuda:0").observe(0.3)
        metrics.batch_latency_seconds.labels(device="cuda:0").observe(700)
        metrics.worker_restarts_total.labels(device="cuda:1", reason="oom").inc()
        metrics.quarantined_sequences_total.inc()
        metrics.last_publish_timestamp_seconds.set(1_700_000_000)
        metrics.workers_ready.set(2)
        metrics.batches_inflight.labels(device="cuda:0").set(3)
        metrics.busy_interval("cuda:0", 100.0, 130.0)
        metrics.update_busy(now=160.0)

        after = scrape(host, port)
        assert after[("vnpd_jobs_total", (("outcome", "published"),))] == 1
        assert after[("vnpd_jobs_total", (("outcome", "failed"),))] == 2
        assert after[("vnpd_jobs_total", (("outcome", "duplicate"),))] == 0
        assert after[("vnpd_queue_depth", ())] == 4
        assert after[("vnpd_queued_sequences", ())] == 1234
        assert after[("vnpd_sequences_total", ())] == 10
        assert after[("vnpd_tokens_total", ())] == 4096
        dev0 = (("device", "cuda:0"),)
        assert after[("vnpd_batch_latency_seconds_count", dev0)] == 2
        assert after[("vnpd_batch_latency_seconds_sum", dev0)] == pytest.approx(700.3)
        bucket = "vnpd_batch_latency_seconds_bucket"
        assert after[(bucket, (("device", "cuda:0"), ("le", "0.5")))] == 1
        assert after[(bucket, (("device", "cuda:0"), ("le", "600.0")))] == 1
        assert after[(bucket, (("device", "cuda:0"), ("le", "+Inf")))] == 2
        assert after[("vnpd_worker_restarts_total",
                      (("device", "cuda:1"), ("reason", "oom")))] == 1
        assert after[("vnpd_quarantined_sequences_total", ())] == 1
        assert after[("vnpd_last_publish_timestamp_seconds", ())] == 1_700_000_000
        assert after[("vnpd_workers_ready", ())] == 2
        assert after[("vnpd_batches_inflight", dev0)] == 3
        assert after[("vnpd_device_busy_fraction", dev0)] == pytest.approx(0.5)
    finally:
        metrics.stop_server()


def test_registries_are_independent() -> None:
    a, b = Metrics(), Metrics(CollectorRegistry())
    a.tokens_total.inc(5)
    assert a.registry.get_sample_value("vnpd_tokens_total") == 5
    assert b.registry.get_sample_value("vnpd_tokens_total") == 0


def test_stop_server_releases_the_port() -> None:
    metrics = Metrics()
    bound = metrics.start_server(parse_listen("127.0.0.1:0"))
    assert bound is not None
    host, port = bound
    scrape(host, port)
    metrics.stop_server()
    metrics.stop_server()  # idempotent
    with pytest.raises(urllib.error.URLError):
        scrape(host, port)
    again = Metrics()  # the same port can be bound again at once
    assert again.start_server(("127.0.0.1", port)) == ("127.0.0.1", port)
    again.stop_server()


def test_disabled_and_double_start() -> None:
    metrics = Metrics()
    assert metrics.start_server(parse_listen("")) is None
    metrics.stop_server()
    assert metrics.start_server(parse_listen("127.0.0.1:0")) is not None
    try:
        with pytest.raises(RuntimeError):
            metrics.start_server(parse_listen("127.0.0.1:0"))
    finally:
        metrics.stop_server()


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback here")
def test_ipv6_listen() -> None:
    metrics = Metrics()
    bound = metrics.start_server(parse_listen("[::1]:0"))
    assert bound is not None and bound[0] == "::1"
    try:
        metrics.tokens_total.inc(7)
        assert scrape(*bound)[("vnpd_tokens_total", ())] == 7
    finally:
        metrics.stop_server()


def test_busy_tracker_window_math() -> None:
    t = BusyTracker(window_s=10.0)
    assert t.fraction(now=100.0) == 0.0
    t.add_interval(91.0, 93.0)  # 2 s
    t.add_interval(95.0, 96.0)  # 1 s
    assert t.fraction(now=100.0) == pytest.approx(0.3)
    # Overlap with an in-flight pipeline counts once: union of [95,96] and [95.5,97.5].
    t.add_interval(95.5, 97.5)
    assert t.fraction(now=100.0) == pytest.approx(0.45)
    # An interval straddling the window's left edge counts only inside the window.
    assert t.fraction(now=102.0) == pytest.approx((1.0 + 2.5) / 10)
    # Everything slides out.
    assert t.fraction(now=200.0) == 0.0


def test_busy_tracker_clips_and_saturates() -> None:
    t = BusyTracker(window_s=60.0)
    t.add_interval(0.0, 1000.0)
    assert t.fraction(now=500.0) == 1.0  # an interval reaching past `now` is clipped
    t.add_interval(400.0, 450.0)  # nested inside: still 1.0, never above
    assert t.fraction(now=500.0) == 1.0
    t.add_interval(5.0, 5.0)  # empty interval is fine
    with pytest.raises(ValueError):
        t.add_interval(10.0, 9.0)
    with pytest.raises(ValueError):
        BusyTracker(window_s=0)


def test_busy_tracker_memory_stays_bounded() -> None:
    t = BusyTracker(window_s=1.0)
    for i in range(10_000):
        t.add_interval(i * 0.1, i * 0.1 + 0.05)
        t.fraction(now=i * 0.1 + 0.05)
    assert len(t._intervals) <= 12
    assert t.fraction(now=10_000 * 0.1) == pytest.approx(0.5, abs=0.06)
