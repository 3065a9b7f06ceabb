"""Prometheus metrics, kept by the parent process only.

Workers report batch timings over the pipe, so prometheus_client's multiprocess
mode is not needed. Each :class:`Metrics` owns a ``CollectorRegistry`` of its own
(never the global one), so tests and several daemons in one process do not clash.
The full metric list, with example alert rules, is in docs/OPERATIONS.md.

Example::

    metrics = Metrics()
    metrics.start_server(("127.0.0.1", 9464))  # -> ("127.0.0.1", 9464)
    metrics.tokens_total.inc(4096)
    metrics.busy_interval("cuda:0", start=t0, end=t1)
    metrics.update_busy(now=time.time())
    metrics.stop_server()
"""

from __future__ import annotations

import threading
from collections import deque
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Batch device time: from a handful of short sequences on a big GPU (~10 ms) to a
# full token budget of long sequences on a CPU worker (minutes).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0,
                   300.0, 600.0)

JOB_OUTCOMES = ("published", "failed", "duplicate")


class BusyTracker:
    """Fraction of a sliding window during which a device was computing.

    Intervals are the (start, end) wall-clock times of batches as a worker reports
    them. Overlapping intervals (a worker keeps several batches in flight) count
    once: the busy time is the length of their union inside the window.

    >>> t = BusyTracker(window_s=10.0)
    >>> t.add_interval(0.0, 4.0); t.add_interval(2.0, 5.0)
    >>> t.fraction(now=10.0)
    0.5
    """

    def __init__(self, window_s: float = 60.0) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, got {window_s}")
        self.window_s = window_s
        self._intervals: deque[tuple[float, float]] = deque()

    def add_interval(self, start: float, end: float) -> None:
        """Record that the device was busy from ``start`` to ``end`` (seconds, same clock).

        Raises ``ValueError`` if ``end < start``.
        """
        if end < start:
            raise ValueError(f"interval ends before it starts: {start} > {end}")
        self._intervals.append((start, end))

    def fraction(self, now: float) -> float:
        """Busy share of ``[now - window_s, now]``, in 0..1; forgets older intervals."""
        low = now - self.window_s
        # Intervals arrive roughly in end order, so trimming the left end keeps the
        # deque to about one window's worth of batches.
        while self._intervals and self._intervals[0][1] <= low:
            self._intervals.popleft()
        busy, cursor = 0.0, low
        for start, end in sorted(self._intervals):
            start, end = max(start, cursor), min(end, now)
            if end > start:
                busy += end - start
                cursor = end
        return min(1.0, busy / self.window_s)


class Metrics:
    """Every vnpd metric (prefix ``vnpd_``), in one registry, plus the HTTP endpoint."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry if registry is not None else CollectorRegistry()
        self.jobs_total = Counter(
            "vnpd_jobs_total", "Input files finished, by outcome (published|failed|duplicate)",
            ["outcome"], registry=r)
        self.queue_depth = Gauge(
            "vnpd_queue_depth", "Jobs waiting or active (claimed, indexing or embedding)",
            registry=r)
        self.queued_sequences = Gauge(
            "vnpd_queued_sequences", "Sequences of active jobs not yet embedded", registry=r)
        self.sequences_total = Counter(
            "vnpd_sequences_total", "Sequences embedded", registry=r)
        self.tokens_total = Counter(
            "vnpd_tokens_total", "Tokens embedded, BOS/EOS included", registry=r)
        self.batch_latency_seconds = Histogram(
            "vnpd_batch_latency_seconds", "Device time per batch, as the worker measured it",
            ["device"], buckets=LATENCY_BUCKETS, registry=r)
        self.worker_restarts_total = Counter(
            "vnpd_worker_restarts_total",
            "Worker restarts, by reason (crash|hang|heartbeat|oom|sticky_error|poison|node_lost)",
            ["device", "reason"], registry=r)
        self.quarantined_sequences_total = Counter(
            "vnpd_quarantined_sequences_total", "Sequences quarantined as poison", registry=r)
        self.device_busy_fraction = Gauge(
            "vnpd_device_busy_fraction", "Share of the last minute a device spent computing",
            ["device"], registry=r)
        self.last_publish_timestamp_seconds = Gauge(
            "vnpd_last_publish_timestamp_seconds", "Unix time of the last output published",
            registry=r)
        self.workers_ready = Gauge(
            "vnpd_workers_ready", "Workers with a loaded model, ready for batches", registry=r)
        self.batches_inflight = Gauge(
            "vnpd_batches_inflight", "Batches sent to a worker and not yet answered",
            ["device"], registry=r)
        self.cache_hits_total = Counter(
            "vnpd_cache_hits_total", "Sequences served from the embedding cache", registry=r)
        self.cache_misses_total = Counter(
            "vnpd_cache_misses_total", "Sequences looked up in the embedding cache and not found",
            registry=r)
        self.cache_evictions_total = Counter(
            "vnpd_cache_evictions_total", "Entries evicted from the embedding cache (LRU)",
            registry=r)
        self.cache_bytes = Gauge(
            "vnpd_cache_bytes", "Size of the embedding cache's files on disk", registry=r)
        self.duplicate_records_total = Counter(
            "vnpd_duplicate_records_total",
            "Records that repeat an earlier record of their file, copied instead of computed",
            registry=r)
        self._cache_seen = (0, 0, 0)
        for outcome in JOB_OUTCOMES:  # export zeros, so rate() and alerts see the series
            self.jobs_total.labels(outcome=outcome)
        self._busy: dict[str, BusyTracker] = {}
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def update_cache(self, hits: int, misses: int, evictions: int, size_bytes: int) -> None:
        """Bring the cache counters up to the store's running totals."""
        seen = self._cache_seen
        for counter, total, before in zip(
                (self.cache_hits_total, self.cache_misses_total, self.cache_evictions_total),
                (hits, misses, evictions), seen):
            if total > before:
                counter.inc(total - before)
        self._cache_seen = (max(hits, seen[0]), max(misses, seen[1]), max(evictions, seen[2]))
        self.cache_bytes.set(size_bytes)

    def busy_interval(self, device: str, start: float, end: float) -> None:
        """Record one batch's device time (wall clock) for ``device``'s busy fraction."""
        self._busy.setdefault(device, BusyTracker()).add_interval(start, end)

    def update_busy(self, now: float) -> None:
        """Refresh ``vnpd_device_busy_fraction`` for every device seen so far."""
        for device, tracker in self._busy.items():
            self.device_busy_fraction.labels(device=device).set(tracker.fraction(now))

    def start_server(self, address: tuple[str, int] | None) -> tuple[str, int] | None:
        """Serve ``/metrics`` over HTTP on ``address``; return the bound ``(host, port)``.

        ``address`` is ``metrics.listen`` as parsed by ``vnpd.config.parse_listen``;
        None disables the endpoint and returns None. Port 0 binds a free port, which is
        returned. The server runs on a daemon thread; call :meth:`stop_server` to close
        it. Raises ``OSError`` if it cannot bind, ``RuntimeError`` if already started.
        """
        if address is None:
            return None
        if self._server is not None:
            raise RuntimeError("metrics server already started")
        host, port = address
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        return host, int(self._server.server_address[1])

    def stop_server(self) -> None:
        """Stop the endpoint and release its port; a no-op if it is not running."""
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = self._thread = None
