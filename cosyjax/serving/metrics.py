"""Prometheus metrics of the HTTP server (``GET /metrics``, text exposition format).

Per app (its own registry, so several apps in one process do not collide):

=====================================  ========================================================
``cosyjax_requests_total``             counter by ``route`` (the route's path) and ``status``
``cosyjax_requests_in_flight``         gauge: requests being served now
``cosyjax_first_chunk_seconds``        histogram: request received -> first audio chunk ready
``cosyjax_rtf``                        histogram: wall seconds / audio seconds, per request
``cosyjax_audio_seconds_total``        counter: audio produced
``cosyjax_engine_queue_depth``         gauge: requests waiting for an LLM slot (``Engine.stats``)
``cosyjax_engine_active_slots``        gauge: busy LLM decode slots
``cosyjax_engine_slots``               gauge: LLM decode slots
``cosyjax_engine_tokens_total``        counter: speech tokens decoded (``rate()`` gives tokens/s)
``cosyjax_engine_requests_total``      counter by ``outcome``: completed, failed, cancelled, rejected
=====================================  ========================================================
"""

from __future__ import annotations

from typing import Any, Callable

INSTALL_HINT = 'the cosyjax server needs prometheus-client: pip install "cosyjax[server]"'

try:
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
except ImportError as e:  # part of the server extra
    raise ImportError(INSTALL_HINT) from e

FIRST_CHUNK_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0)


class _EngineCollector:
    """Reads ``Engine.stats()`` at scrape time."""

    def __init__(self, stats: Callable[[], dict[str, Any] | None]):
        self._stats = stats

    def collect(self):
        stats = self._stats()
        if not stats:
            return
        for name, key, doc in (("cosyjax_engine_queue_depth", "pending", "requests waiting for an LLM slot"),
                               ("cosyjax_engine_active_slots", "slots_busy", "busy LLM decode slots"),
                               ("cosyjax_engine_slots", "slots", "LLM decode slots")):
            yield GaugeMetricFamily(name, doc, value=stats[key])
        yield CounterMetricFamily("cosyjax_engine_tokens", "speech tokens decoded", value=stats["tokens"])
        outcomes = CounterMetricFamily("cosyjax_engine_requests", "engine requests by outcome", labels=["outcome"])
        for outcome in ("completed", "failed", "cancelled", "rejected"):
            outcomes.add_metric([outcome], stats[outcome])
        yield outcomes


class ServerMetrics:
    """The server's metrics; ``engine_stats`` is a callable returning ``Engine.stats()`` (or None)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine_stats: Callable[[], dict[str, Any] | None] = lambda: None):
        self.registry = CollectorRegistry()
        self.requests = Counter("cosyjax_requests", "HTTP requests by route and status", ["route", "status"],
                                registry=self.registry)
        self.in_flight = Gauge("cosyjax_requests_in_flight", "requests being served", registry=self.registry)
        self.first_chunk = Histogram("cosyjax_first_chunk_seconds", "request received -> first audio chunk",
                                     buckets=FIRST_CHUNK_BUCKETS, registry=self.registry)
        self.rtf = Histogram("cosyjax_rtf", "real-time factor (wall seconds / audio seconds) per request",
                             buckets=RTF_BUCKETS, registry=self.registry)
        self.audio_seconds = Counter("cosyjax_audio_seconds", "audio seconds produced", registry=self.registry)
        self.registry.register(_EngineCollector(engine_stats))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """ASGI middleware counting every HTTP response by route template and status."""

    def __init__(self, app: Any, metrics: ServerMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = {"code": 500}

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            route = scope.get("route")  # set by the router on this scope when a route matched
            path = getattr(route, "path", None) or "unmatched"
            self.metrics.requests.labels(path, str(status["code"])).inc()


__all__ = ["MetricsMiddleware", "ServerMetrics"]
