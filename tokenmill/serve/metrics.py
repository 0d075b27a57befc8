"""Prometheus metrics of a serving engine, named `tokenmill:*` after vLLM's `vllm:*` conventions.

Histograms and counters are fed from the engine thread as outputs arrive (`observe`); gauges read
the engine's latest stats at scrape time. Each app has its own registry (tests run several).
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.messages import EngineStats
from tokenmill.engine.outputs import RequestOutput

LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


class ServingMetrics:
    def __init__(self, get_engine: Callable[[], AsyncEngine | None], model_name: str) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        r = self.registry
        self.ttft = Histogram(
            "tokenmill:time_to_first_token_seconds",
            "Time to first token.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "tokenmill:time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            labels,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tokenmill:inter_token_latency_seconds",
            "Time between successive token deliveries of a request.",
            labels,
            buckets=TOKEN_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tokenmill:e2e_request_latency_seconds",
            "End-to-end request latency.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "tokenmill:request_queue_time_seconds",
            "Time from arrival to first scheduling.",
            labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "tokenmill:prompt_tokens", "Prompt tokens processed.", labels, registry=r
        )
        self.generation_tokens = Counter(
            "tokenmill:generation_tokens", "Tokens generated.", labels, registry=r
        )
        self.finished = Counter(
            "tokenmill:request_success",
            "Finished requests by finish reason.",
            labels + ["finished_reason"],
            registry=r,
        )
        gauges = {
            "tokenmill:num_requests_running": ("Requests running.", lambda s: s.num_running),
            "tokenmill:num_requests_waiting": ("Requests waiting.", lambda s: s.num_waiting),
            "tokenmill:kv_cache_usage_perc": (
                "Fraction of KV blocks in use.",
                lambda s: s.kv_usage,
            ),
            "tokenmill:kv_cache_used_blocks": ("KV blocks in use.", lambda s: s.num_used_blocks),
            "tokenmill:prefix_cache_hit_rate": (
                "Prefix cache hits / lookups (blocks).",
                lambda s: s.prefix_cache_hit_rate,
            ),
            "tokenmill:num_preemptions": ("Preemptions since start.", lambda s: s.num_preemptions),
        }
        for name, (doc, read) in gauges.items():
            Gauge(name, doc, registry=r).set_function(lambda read=read: self._read(read))
        self.model_name = model_name
        self._get_engine = get_engine
        self._last_token: dict[str, float] = {}
        self._itl = self.itl.labels(model_name)  # bound once: observed for every token

    def _read(self, read: Callable[[EngineStats], float]) -> float:
        engine = self._get_engine()
        return 0.0 if engine is None else float(read(engine.stats()))

    def observe(self, out: RequestOutput) -> None:
        """Called on the engine thread for every output."""
        m = self.model_name
        for i, metrics in enumerate(out.child_metrics):
            key = f"{out.request_id}#{i}"
            last = metrics.last_token_time
            prev = self._last_token.get(key)
            if last is not None and prev is not None and last > prev:
                self._itl.observe(last - prev)
            if last is not None:
                self._last_token[key] = last
        if not out.finished:
            return
        for i, (c, metrics) in enumerate(zip(out.outputs, out.child_metrics)):
            self._last_token.pop(f"{out.request_id}#{i}", None)
            self.generation_tokens.labels(m).inc(len(c.token_ids))
            self.finished.labels(m, c.finish_reason or "unknown").inc()
            for hist, value in (
                (self.ttft, metrics.ttft),
                (self.tpot, metrics.tpot),
                (self.e2e, metrics.e2e),
                (self.queue, metrics.time_in_queue),
            ):
                if value is not None:
                    hist.labels(m).observe(value)
        self.prompt_tokens.labels(m).inc(len(out.prompt_token_ids))
