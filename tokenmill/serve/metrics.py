"""Prometheus metrics of a serving engine, under tokenmill's names, vLLM's and NIM's at once.

Every series is kept once and exported under three families of names, so dashboards, KEDA
rules and routers built for vLLM or NIM read tokenmill unchanged:
- `tokenmill:NAME` (our own),
- `vllm:NAME` (vLLM's names and labels: `model_name` on every series; v0 names that stock
  Grafana boards still query, such as `gpu_cache_usage_perc` and `num_requests_swapped`, too),
- `NAME` (NIM for LLMs exports vLLM's names without a prefix, at /v1/metrics).

Histograms and counters are fed from the engine's client thread as outputs and steps arrive
(`observe`, `observe_step`); gauges and the core's cumulative counters (preemptions, prefix cache
queries and hits) are read from the engine's latest stats at scrape time. Each app has its own
registry (tests run several).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.messages import EngineCoreOutputs
from tokenmill.engine.outputs import RequestOutput

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                   5.0, 7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
TOKEN_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)
REQUEST_TIME_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0,
                        50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip

PREFIXES = ("tokenmill:", "vllm:", "")  # ours, vLLM's, NIM's
# Second names of a series, in every family: vLLM v0's (still on stock boards) and NIM's
ALIASES = {
    "kv_cache_usage_perc": ("gpu_cache_usage_perc",),
    "request_success": ("request_finish",),
}


def length_buckets(max_model_len: int) -> list[float]:
    """1, 2, 5, 10, 20, 50, ... up to the longest sequence (vLLM's buckets for token counts)."""
    out, scale = [], 1
    while True:
        for m in (1, 2, 5):
            if m * scale > max_model_len:
                return out
            out.append(float(m * scale))
        scale *= 10


class _Exported(Collector):
    """Yields each family of `source` under every prefix and alias."""

    def __init__(self, source: Collector) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        for family in self.source.collect():
            for base in (family.name, *ALIASES.get(family.name, ())):
                for prefix in PREFIXES:
                    yield _renamed(family, family.name, prefix + base)


def _renamed(family: Metric, old: str, new: str) -> Metric:
    out = Metric(new, family.documentation, family.type, family.unit)
    out.samples = [s._replace(name=new + s.name[len(old) :]) for s in family.samples]
    return out


class ServingMetrics:
    def __init__(self, get_engine: Callable[[], AsyncEngine | None], model_name: str) -> None:
        own = CollectorRegistry()
        self.registry = CollectorRegistry()
        self.registry.register(_Exported(own))
        self.model_name = model_name
        self._get_engine = get_engine
        labels = ["model_name"]

        def hist(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=own)

        m = model_name
        self.ttft = hist("time_to_first_token_seconds", "Time to first token.", LATENCY_BUCKETS)
        self.tpot = hist(
            "time_per_output_token_seconds",
            "Mean time per output token after the first, per request.",
            TOKEN_BUCKETS,
        )
        self.itl = hist(
            "inter_token_latency_seconds",
            "Time between successive token deliveries of a request.",
            TOKEN_BUCKETS,
        )
        self.e2e = hist("e2e_request_latency_seconds", "End-to-end request latency.",
                        REQUEST_TIME_BUCKETS)  # fmt: skip
        self.queue = hist(
            "request_queue_time_seconds", "Time from arrival to first scheduling.", LATENCY_BUCKETS
        )
        self.prefill_time = hist(
            "request_prefill_time_seconds",
            "Time from first scheduling to the first token (the prompt's computation).",
            REQUEST_TIME_BUCKETS,
        )
        self.decode_time = hist(
            "request_decode_time_seconds",
            "Time from the first token to the last.",
            REQUEST_TIME_BUCKETS,
        )
        self.inference_time = hist(
            "request_inference_time_seconds",
            "Time from first scheduling to the last token.",
            REQUEST_TIME_BUCKETS,
        )
        self._lengths: dict[str, Histogram] = {}
        self._length_docs = {
            "request_prompt_tokens": "Prompt tokens per request.",
            "request_generation_tokens": "Generated tokens per request (all its sequences).",
            "request_max_num_generation_tokens": "Most tokens generated by one of a request's "
            "sequences.",
        }
        self.iteration_tokens = hist(
            "iteration_tokens_total",
            "Tokens computed per engine step (prompt and generated).",
            [2.0**i for i in range(15)],
        )
        self.request_params_n = hist("request_params_n", "The n a request asked for.",
                                     (1, 2, 5, 10, 20))  # fmt: skip
        self.prompt_tokens = Counter("prompt_tokens", "Prompt tokens processed.", labels,
                                     registry=own)  # fmt: skip
        self.generation_tokens = Counter(
            "generation_tokens", "Tokens generated.", labels, registry=own
        )
        self.finished = Counter(
            "request_success",
            "Finished requests by finish reason.",
            labels + ["finished_reason"],
            registry=own,
        )
        own.register(_EngineState(self))
        self._registry = own
        self._itl = self.itl.labels(m)  # bound once: observed for every token
        self._last_token: dict[str, float] = {}

    def _length(self, name: str) -> Histogram:
        """Token-count histograms: their buckets follow the model's max_model_len, known once
        the model is loaded (made on first use)."""
        if name not in self._lengths:
            engine = self._get_engine()
            top = engine.max_model_len if engine is not None else 1 << 16
            buckets = length_buckets(max(top, 1))
            self._lengths[name] = Histogram(
                name, self._length_docs[name], ["model_name"], buckets=buckets,
                registry=self._registry,
            )  # fmt: skip
        return self._lengths[name]

    def observe_step(self, result: EngineCoreOutputs) -> None:
        """Called on the engine's client thread for every core step."""
        if result.num_tokens:
            self.iteration_tokens.labels(self.model_name).observe(result.num_tokens)

    def observe(self, out: RequestOutput) -> None:
        """Called on the engine's client thread for every output."""
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
        generated = [len(c.token_ids) for c in out.outputs]
        for i, (c, metrics) in enumerate(zip(out.outputs, out.child_metrics)):
            self._last_token.pop(f"{out.request_id}#{i}", None)
            self.finished.labels(m, c.finish_reason or "unknown").inc()
            first, last, scheduled = (
                metrics.first_token_time,
                metrics.last_token_time,
                metrics.first_scheduled_time,
            )
            for hist, value in (
                (self.ttft, metrics.ttft),
                (self.tpot, metrics.tpot),
                (self.e2e, metrics.e2e),
                (self.queue, metrics.time_in_queue),
                (self.prefill_time, _minus(first, scheduled)),
                (self.decode_time, _minus(last, first)),
                (self.inference_time, _minus(last, scheduled)),
            ):
                if value is not None:
                    hist.labels(m).observe(value)
        self.generation_tokens.labels(m).inc(sum(generated))
        self.prompt_tokens.labels(m).inc(len(out.prompt_token_ids))
        self._length("request_prompt_tokens").labels(m).observe(len(out.prompt_token_ids))
        self._length("request_generation_tokens").labels(m).observe(sum(generated))
        if generated:
            self._length("request_max_num_generation_tokens").labels(m).observe(max(generated))
        self.request_params_n.labels(m).observe(len(out.outputs))


def _minus(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else max(a - b, 0.0)


def _tier_families(model_name: str, tiers) -> Iterator[Metric]:
    """Per KV tier (label `tier`: host, disk): occupancy, hits and misses, blocks and bytes
    moved, and the load jobs' latency (a summary: count and sum of seconds)."""
    labels = ["model_name", "tier"]
    per_tier = (
        (GaugeMetricFamily, "kv_tier_blocks", "KV blocks held in the tier.", lambda t: t.num_used_blocks),
        (GaugeMetricFamily, "kv_tier_capacity_blocks", "KV blocks the tier can hold.", lambda t: t.num_blocks),
        (CounterMetricFamily, "kv_tier_hits", "Blocks found in the tier on a device miss.", lambda t: t.hits),
        (CounterMetricFamily, "kv_tier_misses", "Blocks asked of the tier and not found.", lambda t: t.misses),
        (CounterMetricFamily, "kv_tier_blocks_in", "Blocks written into the tier.", lambda t: t.blocks_in),
        (CounterMetricFamily, "kv_tier_blocks_out", "Blocks loaded from the tier into the device pool.", lambda t: t.blocks_out),
        (CounterMetricFamily, "kv_tier_bytes_in", "Bytes written into the tier.", lambda t: t.blocks_in * t.bytes_per_block),
        (CounterMetricFamily, "kv_tier_bytes_out", "Bytes loaded from the tier.", lambda t: t.blocks_out * t.bytes_per_block),
        (CounterMetricFamily, "kv_tier_evicted_blocks", "Blocks the tier moved down or dropped.", lambda t: t.blocks_evicted),
    )  # fmt: skip
    for kind, name, doc, value in per_tier:
        family = kind(name, doc, labels=labels)
        for t in tiers:
            family.add_metric([model_name, t.name], value(t))
        yield family
    latency = SummaryMetricFamily(
        "kv_tier_load_seconds", "KV tier load jobs, from issue to reported done.",
        labels=["model_name"],
    )  # fmt: skip
    latency.add_metric([model_name], tiers[0].load_count, tiers[0].load_seconds_sum)
    yield latency


class _EngineState(Collector):
    """Gauges of the engine's latest stats, and the core's cumulative counts as counters."""

    def __init__(self, metrics: ServingMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        engine = self.metrics._get_engine()
        m = [self.metrics.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            g = GaugeMetricFamily(name, doc, labels=["model_name"])
            g.add_metric(m, value)
            return g

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            c = CounterMetricFamily(name, doc, labels=["model_name"])
            c.add_metric(m, value)
            return c

        s = engine.stats() if engine is not None else None
        read = (lambda f: float(getattr(s, f))) if s is not None else (lambda f: 0.0)
        yield gauge("num_requests_running", "Requests running.", read("num_running"))
        yield gauge("num_requests_waiting", "Requests waiting.", read("num_waiting"))
        yield gauge("num_requests_swapped", "Requests swapped out to host memory: always 0 "
                    "(a preempted request is recomputed).", 0.0)  # fmt: skip
        yield gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (1 = all).",
                    read("kv_usage"))  # fmt: skip
        host = next((t for t in s.kv_tiers if t.name == "host"), None) if s else None
        yield gauge("cpu_cache_usage_perc", "Fraction of the host-memory KV tier in use "
                    "(0 when it is off).", host.num_used_blocks / host.num_blocks if host else 0.0)  # fmt: skip
        yield gauge("num_requests_loading", "Requests waiting for their prefix to come back "
                    "from a KV tier.", read("num_loading"))  # fmt: skip
        if s is not None and s.kv_tiers:
            yield from _tier_families(m[0], s.kv_tiers)
        yield gauge("kv_cache_used_blocks", "KV blocks in use.", read("num_used_blocks"))
        yield gauge("prefix_cache_hit_rate", "Prefix cache hits / lookups (blocks).",
                    read("prefix_cache_hit_rate"))  # fmt: skip
        yield counter("num_preemptions", "Preemptions since start.", read("num_preemptions"))
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                      read("prefix_cache_queries"))  # fmt: skip
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.",
                      read("prefix_cache_hits"))  # fmt: skip
        if engine is None:
            return
        info = engine.info
        yield gauge("num_request_max", "Most requests that run at once.", info.max_num_seqs)
        config = GaugeMetricFamily(
            "cache_config_info",
            "The KV cache's configuration (labels; value 1).",
            labels=["model_name", "block_size", "cache_dtype", "num_gpu_blocks",
                    "num_cpu_blocks", "enable_prefix_caching"],
        )  # fmt: skip
        config.add_metric(
            [self.metrics.model_name, str(info.block_size), info.kv_cache_dtype,
             str(info.num_blocks), str(host.num_blocks if host else 0),
             str(info.enable_prefix_caching)],
            1.0,
        )  # fmt: skip
        yield config
