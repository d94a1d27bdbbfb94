"""Prometheus metrics for /metrics, in a registry of their own.

A dedicated `CollectorRegistry` keeps two servers in one process (tests) from colliding, and keeps
the default registry's process metrics out of our page. Request metrics are observed on the front
end when a request ends, so latencies are what a client sees (queueing included); engine gauges
are read from the latest counts the engine core sent (it sends them with every step) when
/metrics is scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

# Bucket edges in seconds: first tokens from milliseconds to a long queue, per-token times around
# one decode step, whole requests up to several minutes.
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
TPOT_BUCKETS = (0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 300.0)


@dataclass(frozen=True)
class EngineStats:
    """The engine core's counts after a step; replaced whole, so a reader never sees half an update."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_steps: int = 0
    num_added: int = 0  # requests the engine has taken in, so far
    # Speculative decoding, so far: verification steps, proposed tokens, accepted ones.
    num_spec_steps: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


class ServerMetrics:
    def __init__(self, engine_stats: Callable[[], EngineStats]) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(engine_stats))
        r = self.registry
        self.requests = Counter("martlet_requests", "Requests ended, by finish reason (stop, length, abort).",
                                ["finished_reason"], registry=r)
        self.prompt_tokens = Counter("martlet_prompt_tokens", "Prompt tokens of ended requests.", registry=r)
        self.generation_tokens = Counter("martlet_generation_tokens", "Output tokens of ended requests.",
                                         registry=r)
        self.ttft = Histogram("martlet_time_to_first_token_seconds", "Time from arrival to the first token.",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("martlet_time_per_output_token_seconds",
                              "Mean time between a request's output tokens after the first.",
                              buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram("martlet_e2e_request_latency_seconds", "Time from arrival to the last token.",
                             buckets=E2E_BUCKETS, registry=r)

    def observe_request(
        self, finished_reason: str, num_prompt_tokens: int, num_output_tokens: int, arrival: float,
        first_token: float | None, end: float,
    ) -> None:
        self.requests.labels(finished_reason).inc()
        self.prompt_tokens.inc(num_prompt_tokens)
        self.generation_tokens.inc(num_output_tokens)
        self.e2e.observe(end - arrival)
        if first_token is not None:
            self.ttft.observe(first_token - arrival)
            if num_output_tokens > 1:
                self.tpot.observe((end - first_token) / (num_output_tokens - 1))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    def __init__(self, engine_stats: Callable[[], EngineStats]) -> None:
        self.engine_stats = engine_stats

    def collect(self) -> Iterator[Metric]:
        stats = self.engine_stats()
        yield GaugeMetricFamily("martlet_num_requests_running", "Requests in the running batch.",
                                value=stats.num_running)
        yield GaugeMetricFamily("martlet_num_requests_waiting", "Requests queued for the running batch.",
                                value=stats.num_waiting)
        yield GaugeMetricFamily("martlet_kv_cache_usage", "Fraction of KV cache blocks in use (0 to 1).",
                                value=stats.kv_cache_usage)
        yield CounterMetricFamily("martlet_engine_steps", "Engine steps run.", value=stats.num_steps)
        # The acceptance rate is accepted / draft tokens; the mean accepted length 1 + accepted / steps.
        yield CounterMetricFamily("martlet_spec_decode_num_verification_steps",
                                  "Speculative decoding: sequence steps that verified proposed tokens.",
                                  value=stats.num_spec_steps)
        yield CounterMetricFamily("martlet_spec_decode_num_draft_tokens", "Speculative decoding: tokens proposed.",
                                  value=stats.num_draft_tokens)
        yield CounterMetricFamily("martlet_spec_decode_num_accepted_tokens",
                                  "Speculative decoding: proposed tokens accepted.", value=stats.num_accepted_tokens)
