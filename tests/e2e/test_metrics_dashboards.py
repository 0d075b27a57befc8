"""Dashboards built for vLLM and NIM read tokenmill unchanged: every series a stock vLLM Grafana
board queries is exported with `model_name`, counters are counters, NIM's unprefixed names are
served at /v1/metrics too, and the numbers agree with what the requests did."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import API_KEY, Server

# The series the stock board of vLLM (examples/online_serving/prometheus_grafana/grafana.json)
# queries, each with {model_name="$model_name"}
STOCK_VLLM_BOARD = [
    "vllm:e2e_request_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_sum",
    "vllm:e2e_request_latency_seconds_count",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
    "vllm:time_per_output_token_seconds_bucket",
    "vllm:time_per_output_token_seconds_sum",
    "vllm:time_per_output_token_seconds_count",
    "vllm:num_requests_running",
    "vllm:num_requests_swapped",
    "vllm:num_requests_waiting",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:time_to_first_token_seconds_sum",
    "vllm:time_to_first_token_seconds_count",
    "vllm:gpu_cache_usage_perc",
    "vllm:cpu_cache_usage_perc",
    "vllm:request_prompt_tokens_bucket",
    "vllm:request_generation_tokens_bucket",
    "vllm:request_success_total",
    "vllm:request_queue_time_seconds_sum",
    "vllm:request_prefill_time_seconds_sum",
    "vllm:request_decode_time_seconds_sum",
    "vllm:request_max_num_generation_tokens_sum",
]
# vLLM V1's names beyond the board (routers, KEDA rules, newer boards)
VLLM_V1 = [
    "vllm:kv_cache_usage_perc",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:iteration_tokens_total_bucket",
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
    "vllm:num_preemptions_total",
    "vllm:request_inference_time_seconds_bucket",
    "vllm:request_params_n_bucket",
    "vllm:cache_config_info",
]
# NIM for LLMs: vLLM's names without the prefix
NIM = [
    "gpu_cache_usage_perc",
    "num_requests_running",
    "num_requests_waiting",
    "num_request_max",
    "prompt_tokens_total",
    "generation_tokens_total",
    "time_to_first_token_seconds_bucket",
    "time_per_output_token_seconds_bucket",
    "e2e_request_latency_seconds_bucket",
    "request_prompt_tokens_bucket",
    "request_generation_tokens_bucket",
    "request_success_total",
    "request_finish_total",
]
COUNTERS = ["prompt_tokens", "generation_tokens", "request_success", "num_preemptions",
            "prefix_cache_queries", "prefix_cache_hits"]  # fmt: skip


@pytest.fixture(scope="module")
def served(tiny_model_dir):
    # a host KV tier on, so its series are there (2 KiB blocks: 512 of them)
    s = Server(str(tiny_model_dir("llama")), "--api-key", API_KEY, "--kv-host-memory", str(1 << 20))
    auth = {"Authorization": f"Bearer {API_KEY}"}
    shared = " ".join(f"word{i}" for i in range(40))  # several KV blocks, asked for twice
    requests = [
        {"prompt": shared, "max_tokens": 5, "ignore_eos": True},
        {"prompt": "five six seven", "max_tokens": 3, "ignore_eos": True, "n": 2},
        {"prompt": shared, "max_tokens": 4, "ignore_eos": True, "stream": True},
    ]
    usages = []
    for body in requests:
        if body.get("stream"):
            body = {**body, "stream_options": {"include_usage": True}}
            with httpx.stream(
                "POST", f"{s.url}/v1/completions", json=body, headers=auth, timeout=60
            ) as r:
                lines = [x for x in r.iter_lines() if x.startswith("data: {")]
            usages.append(httpx.Response(200, content=lines[-1][6:]).json()["usage"])
        else:
            r = httpx.post(f"{s.url}/v1/completions", json=body, headers=auth, timeout=60)
            usages.append(r.json()["usage"])
    yield s, usages
    assert s.stop() == 0


def samples(text: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, []).append(s)
    return out


def value(found: dict, name: str, **labels) -> float:
    return sum(s.value for s in found[name] if all(s.labels.get(k) == v for k, v in labels.items()))


def test_every_series_a_stock_vllm_board_queries_is_there_with_model_name(served):
    s, _ = served
    found = samples(httpx.get(f"{s.url}/metrics").text)
    for name in STOCK_VLLM_BOARD + VLLM_V1:
        assert name in found, name
        assert all(x.labels.get("model_name") == "tiny" for x in found[name]), name
        assert f"tokenmill:{name.removeprefix('vllm:')}" in found, name  # our own name too


def test_nim_names_at_v1_metrics_without_a_key(served):
    s, _ = served
    r = httpx.get(f"{s.url}/v1/metrics")  # scrapers send no API key, as for /metrics
    assert r.status_code == 200
    found = samples(r.text)
    for name in NIM:
        assert name in found, name


def test_counters_are_counters(served):
    s, _ = served
    types = {
        f.name: f.type for f in text_string_to_metric_families(httpx.get(f"{s.url}/metrics").text)
    }
    for base in COUNTERS:
        for prefix in ("tokenmill:", "vllm:", ""):
            assert types.get(prefix + base) == "counter", prefix + base
    assert types["vllm:num_requests_running"] == "gauge"
    assert types["vllm:time_to_first_token_seconds"] == "histogram"


def test_the_numbers_agree_with_the_requests(served):
    s, usages = served
    found = samples(httpx.get(f"{s.url}/metrics").text)
    prompt = sum(u["prompt_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages)
    for prefix in ("vllm:", "tokenmill:", ""):
        assert value(found, f"{prefix}generation_tokens_total") == generated == 5 + 2 * 3 + 4
        assert value(found, f"{prefix}prompt_tokens_total") == prompt
        assert value(found, f"{prefix}request_success_total", finished_reason="length") == 4
    assert value(found, "vllm:request_prompt_tokens_count") == 3  # one per request
    assert value(found, "vllm:request_generation_tokens_sum") == generated
    assert value(found, "vllm:request_max_num_generation_tokens_sum") == 5 + 3 + 4
    assert value(found, "vllm:request_params_n_sum") == 1 + 2 + 1
    assert value(found, "vllm:e2e_request_latency_seconds_count") == 4  # one per sequence
    # every token the steps computed: generated ones, prompts less what the prefix cache gave
    queries = value(found, "vllm:prefix_cache_queries_total")
    hits = value(found, "vllm:prefix_cache_hits_total")
    assert 16 <= hits <= queries  # the shared prompt's second time: whole blocks found
    steps = value(found, "vllm:iteration_tokens_total_sum")
    assert generated <= steps <= prompt + generated - hits
    assert value(found, "vllm:num_requests_running") == 0
    assert value(found, "vllm:num_preemptions_total") == 0
    (info,) = found["vllm:cache_config_info"]
    block = int(info.labels["block_size"])
    assert info.value == 1 and hits % block == 0  # whole blocks are cached
    assert int(info.labels["num_gpu_blocks"]) > 0 and info.labels["enable_prefix_caching"] == "True"


def test_the_kv_tier_series_are_there_per_tier(served):
    s, _ = served
    text = httpx.get(f"{s.url}/metrics").text
    found = samples(text)
    types = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert value(found, "tokenmill:kv_tier_capacity_blocks", tier="host") == 512
    for name in ("kv_tier_hits", "kv_tier_misses", "kv_tier_blocks_in", "kv_tier_blocks_out",
                 "kv_tier_bytes_in", "kv_tier_bytes_out", "kv_tier_evicted_blocks"):  # fmt: skip
        assert types[f"tokenmill:{name}"] == "counter", name
        assert [x.labels["tier"] for x in found[f"tokenmill:{name}_total"]] == ["host"]
    assert types["tokenmill:kv_tier_load_seconds"] == "summary"
    assert 0 <= value(found, "vllm:cpu_cache_usage_perc") <= 1
    (info,) = found["vllm:cache_config_info"]
    assert info.labels["num_cpu_blocks"] == "512"
