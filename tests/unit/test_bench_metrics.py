"""Serving metrics against hand-worked cases."""

import math

import pytest

from tokenmill.bench.metrics import RequestRecord, percentile, report, summarize


def test_percentile_interpolates_like_numpy():
    values = [1.0, 2.0, 3.0, 4.0]
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert math.isnan(percentile([], 50))


def test_request_timings():
    r = RequestRecord(sent=10.0, chunk_times=[10.5, 10.7, 11.0, 11.5], output_tokens=5, ok=True)
    assert r.ttft == pytest.approx(0.5)
    assert r.e2e == pytest.approx(1.5)
    assert r.tpot == pytest.approx(1.0 / 4)  # (11.5 - 10.5) / (5 - 1)
    assert r.itls == pytest.approx([0.2, 0.3, 0.5])


def test_report_throughput_goodput_and_failures():
    fast = RequestRecord(0.0, [0.1, 0.2, 0.3], prompt_tokens=10, output_tokens=3, ok=True)
    slow = RequestRecord(0.0, [1.0, 3.0], prompt_tokens=10, output_tokens=2, ok=True)
    failed = RequestRecord(0.0, [], ok=False, error="HTTP 500")
    out = report([fast, slow, failed], duration_s=2.0, slo_ttft_ms=500)
    assert out["completed"] == 2 and out["failed"] == 1
    assert out["output_throughput"] == pytest.approx(5 / 2.0)
    assert out["total_token_throughput"] == pytest.approx(25 / 2.0)
    assert out["goodput"] == pytest.approx(1 / 2.0)  # only `fast` meets TTFT <= 500 ms
    assert out["ttft_ms"]["median"] == pytest.approx(550.0)
    assert out["tpot_ms"]["mean"] == pytest.approx((100 + 2000) / 2)
    assert summarize([0.001, 0.003])["mean"] == pytest.approx(2.0)


def test_streams_without_usage_count_chunks_as_tokens():
    """llama.cpp's server streams no usage: each text chunk is one token."""
    import asyncio
    import json as _json

    import httpx

    from tokenmill.bench.metrics import RequestRecord
    from tokenmill.bench.serve import Sample, _one

    def handler(request: httpx.Request) -> httpx.Response:
        chunks = [{"choices": [{"text": t, "finish_reason": None}]} for t in ("a", "b", "c")]
        body = "".join(f"data: {_json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    async def go() -> RequestRecord:
        rec = RequestRecord(sent=0.0)
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            await _one(client, None, Sample("hi", 3), rec, {})
        return rec

    rec = asyncio.run(go())
    assert rec.ok and rec.output_tokens == 3 and len(rec.chunk_times) == 3


def test_random_dataset_length_distribution():
    from tokenmill.bench.serve import load_dataset

    fixed = load_dataset("random", 50, 100, 20, seed=1)
    assert {len(s.prompt) for s in fixed} == {100} and {s.output_len for s in fixed} == {20}
    spread = load_dataset("random", 400, 100, 20, seed=1, range_ratio=0.5)
    lengths = [len(s.prompt) for s in spread]
    assert min(lengths) >= 50 and max(lengths) <= 150 and max(lengths) - min(lengths) > 80
    assert all(10 <= s.output_len <= 30 for s in spread)
    with pytest.raises(ValueError, match="range_ratio"):
        load_dataset("random", 1, 10, 10, seed=0, range_ratio=1.5)
