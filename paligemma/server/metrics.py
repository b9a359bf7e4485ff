"""Prometheus metrics of a server, served at GET /metrics in the text exposition format.

Two sources, one registry per app (so several apps in one process never share counts):

- the HTTP layer records what only it sees: every chat request's HTTP status, why a request was
  refused, and each answer's time to first token, time per output token and whole latency;
- the engine's own counters and gauges (queue depth, running batch size, tokens in and out, image
  cache hits and misses, prefills, decode steps) are read from `BatchEngine.stats()` at scrape
  time by a collector, so the engine knows nothing of Prometheus.

Names follow Prometheus' conventions (`_total` counters, `_seconds` histograms); docs/server.md
lists them. prometheus-client is an optional dependency (`pip install "paligemma[serve]"`).
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

PREFIX = "paligemma"
# Seconds. Time to first token spans a cached image on a GPU (ms) to a queued 3B request on a CPU (a minute).
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# engine.stats() key -> (metric name, help); counters only ever grow, gauges are read as they are.
_ENGINE_COUNTERS = {
    "prompt_tokens": ("prompt_tokens", "Prompt tokens prefilled, image tokens included"),
    "generated_tokens": ("generation_tokens", "Tokens generated, by every row (cancelled rows included)"),
    "image_cache_hits": ("image_cache_hits", "Images whose features came from the feature cache"),
    "image_cache_misses": ("image_cache_misses", "Images encoded by the vision tower"),
    "prefills": ("prefills", "Rows prefilled (each joins the running batch)"),
    "decode_steps": ("decode_steps", "Decode steps of the running batch"),
    "rows_cancelled": ("rows_cancelled", "Requests dropped because their client went away"),
}
_ENGINE_GAUGES = {
    "queued": ("queue_depth", "Requests waiting for a place in the running batch"),
    "running": ("running_batch_size", "Rows in the running decode batch"),
    "image_cache_entries": ("image_cache_entries", "Images whose features are cached"),
}


class _EngineCollector(Collector):
    """Reads the engine's counters when scraped."""

    def __init__(self, engine):
        self.engine = engine

    def collect(self):
        stats = self.engine.stats()
        for key, (name, text) in _ENGINE_COUNTERS.items():
            yield CounterMetricFamily(f"{PREFIX}_{name}", text, value=stats.get(key, 0))
        for key, (name, text) in _ENGINE_GAUGES.items():
            yield GaugeMetricFamily(f"{PREFIX}_{name}", text, value=stats.get(key, 0))
        yield GaugeMetricFamily(f"{PREFIX}_max_batch_size", "Rows the running batch may hold (--max-batch-size)",
                                value=self.engine.max_batch_size)


class ServerMetrics:
    """The metrics of one app; `render()` is the body of GET /metrics."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.requests = Counter(f"{PREFIX}_requests", "Chat completion requests answered, by HTTP status",
                                ["status"], registry=self.registry)
        self.rejected = Counter(f"{PREFIX}_rejected_requests", "Requests refused, by reason (the error code)",
                                ["reason"], registry=self.registry)
        self.time_to_first_token = Histogram(
            f"{PREFIX}_time_to_first_token_seconds", "From a request's arrival to its first generated token",
            buckets=TTFT_BUCKETS, registry=self.registry)
        self.time_per_output_token = Histogram(
            f"{PREFIX}_time_per_output_token_seconds", "Mean time between an answer's tokens after the first",
            buckets=TPOT_BUCKETS, registry=self.registry)
        self.latency = Histogram(f"{PREFIX}_request_duration_seconds", "From a request's arrival to its last token",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.registry.register(_EngineCollector(engine))

    def answered(self, status: int) -> None:
        self.requests.labels(status=str(status)).inc()

    def refused(self, reason: str) -> None:
        self.rejected.labels(reason=reason).inc()

    def finished(self, arrived: float, first_token_at: float | None, finished_at: float | None,
                 tokens: int) -> None:
        """One answer's timings (time.monotonic() seconds): arrival, first token, last token."""
        if first_token_at is None or finished_at is None:
            return
        self.time_to_first_token.observe(max(0.0, first_token_at - arrived))
        self.latency.observe(max(0.0, finished_at - arrived))
        if tokens > 1:
            self.time_per_output_token.observe(max(0.0, finished_at - first_token_at) / (tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)
