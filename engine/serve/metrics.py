"""Prometheus metrics of one app: requests by endpoint and status, latency, and the engine's
queue, rows and adapter-cache counters read from the backend at scrape time.

Each app has its own CollectorRegistry, so several apps in one process (tests) never collide.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds; a tiny-model request takes ~0.1 s on a CPU, an SD 1.5 one tens of seconds.
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)


class _EngineCollector:
    """Reads `backend.stats()` when scraped, so the numbers are the engine's own, not copies."""

    def __init__(self, backend):
        self.backend = backend

    def collect(self):
        s = self.backend.stats()
        yield GaugeMetricFamily("impasto_queue_depth", "requests waiting for admission", value=s["queued"])
        yield GaugeMetricFamily("impasto_running_requests", "requests being denoised", value=s["running"])
        yield GaugeMetricFamily("impasto_active_rows", "UNet rows of the last denoising step",
                                value=s["rows_last_forward"])
        yield CounterMetricFamily("impasto_unet_forwards", "UNet forwards (denoising steps of all requests)",
                                  value=s["forwards"])
        yield GaugeMetricFamily("impasto_worker_alive", "1 while the engine's worker thread runs",
                                value=1.0 if s["alive"] else 0.0)
        cache = s.get("adapter_cache") or {}
        for key, doc in (("hits", "adapter host-cache hits"), ("misses", "adapter host-cache misses"),
                         ("loads", "adapter files read and validated"),
                         ("load_seconds", "seconds spent reading adapter files")):
            if key in cache:
                yield CounterMetricFamily(f"impasto_adapter_cache_{key}", doc, value=cache[key])
        yield from s.get("metric_families", ())  # a backend's own (Ray: per replica, routing)


class Metrics:
    """Semantics:
      observe(endpoint, status, seconds)  counts one response and its latency
      render() -> bytes                   the text exposition format, engine gauges read now
    """

    def __init__(self, backend):
        self.registry = CollectorRegistry()
        self.requests = Counter("impasto_http_requests", "HTTP requests by endpoint and status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("impasto_http_request_seconds", "HTTP request latency by endpoint",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(backend))

    def observe(self, endpoint: str, status: int, seconds: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
