"""Prometheus metrics, on the parent only: workers report over the pipe, so there is no
multiprocess mode. Each :class:`Metrics` has its own registry (tests make several).

Example::

    metrics = Metrics()
    metrics.start_server("127.0.0.1:9464")
    metrics.tokens_total.inc(4096)
"""

from __future__ import annotations

import threading
from collections import deque
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


class BusyTracker:
    """Fraction of a sliding window during which a device had a batch running."""

    def __init__(self, window_s: float = 60.0) -> None:
        self.window_s = window_s
        self.intervals: deque[tuple[float, float]] = deque()

    def add_interval(self, start: float, end: float) -> None:
        self.intervals.append((start, end))

    def fraction(self, now: float) -> float:
        lo = now - self.window_s
        while self.intervals and self.intervals[0][1] < lo:
            self.intervals.popleft()
        busy, cursor = 0.0, lo
        for start, end in sorted(self.intervals):
            start, end = max(start, cursor), min(end, now)
            if end > start:
                busy += end - start
                cursor = end
        return min(1.0, busy / self.window_s)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry or CollectorRegistry()
        self.jobs_total = Counter("vnpd_jobs_total", "Jobs finished, by outcome", ["outcome"],
                                  registry=r)
        self.queue_depth = Gauge("vnpd_queue_depth", "Jobs indexing or running", registry=r)
        self.queued_sequences = Gauge("vnpd_queued_sequences",
                                      "Sequences of active jobs not yet embedded", registry=r)
        self.sequences_total = Counter("vnpd_sequences_total", "Sequences embedded", registry=r)
        self.tokens_total = Counter("vnpd_tokens_total", "Tokens embedded (BOS/EOS included)",
                                    registry=r)
        self.batch_latency_seconds = Histogram("vnpd_batch_latency_seconds",
                                               "Device time per batch", ["device"],
                                               buckets=LATENCY_BUCKETS, registry=r)
        self.worker_restarts_total = Counter("vnpd_worker_restarts_total",
                                             "Worker restarts, by reason", ["device", "reason"],
                                             registry=r)
        self.quarantined_sequences_total = Counter("vnpd_quarantined_sequences_total",
                                                   "Sequences quarantined as poison", registry=r)
        self.device_busy_fraction = Gauge("vnpd_device_busy_fraction",
                                          "Share of the last minute a device was computing",
                                          ["device"], registry=r)
        self.last_publish_timestamp_seconds = Gauge(
            "vnpd_last_publish_timestamp_seconds", "Unix time of the last published output",
            registry=r)
        self.workers_ready = Gauge("vnpd_workers_ready", "Workers with a loaded model",
                                   registry=r)
        self.batches_inflight = Gauge("vnpd_batches_inflight", "Batches held by a worker",
                                      ["device"], registry=r)
        self._busy: dict[str, BusyTracker] = {}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def busy_interval(self, device: str, start: float, end: float) -> None:
        self._busy.setdefault(device, BusyTracker()).add_interval(start, end)

    def update_busy(self, now: float) -> None:
        for device, tracker in self._busy.items():
            self.device_busy_fraction.labels(device=device).set(tracker.fraction(now))

    def start_server(self, listen: str) -> tuple[str, int] | None:
        """Serve /metrics on ``HOST:PORT`` (``[::1]:9464`` for IPv6, port 0 = any free);
        ``""`` disables. Returns the bound (host, port)."""
        if not listen:
            return None
        host, _, port = listen.rpartition(":")
        host = host.strip("[]") or "127.0.0.1"
        self._server, self._thread = start_http_server(int(port), addr=host,
                                                       registry=self.registry)
        return host, int(self._server.server_port)

    def stop_server(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
