"""Nothing lost, nothing leaked: disconnects, a bounded load test, and a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx

from tests.e2e.conftest import Server


def wait_until(fn, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if fn():
            return True
        time.sleep(0.05)
    return False


def test_disconnect_mid_stream_frees_blocks_and_load_test(tiny_model_dir):
    s = Server(str(tiny_model_dir("llama")), "--max-num-seqs", "16")
    try:
        body = {
            "prompt": "Hello world",
            "max_tokens": 200,
            "stream": True,
            "ignore_eos": True,
            "temperature": 0,
        }
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 3:
                    break  # leaves the stream: the connection closes
        assert wait_until(lambda: s.metric("tokenmill:kv_cache_used_blocks") == 0)
        assert wait_until(lambda: s.metric("tokenmill:num_requests_running") == 0)
        asyncio.run(load(s.url, total=400, concurrency=32, cancel_every=10))
        assert wait_until(lambda: s.metric("tokenmill:kv_cache_used_blocks") == 0)
        assert s.metric("tokenmill:num_requests_waiting") == 0
    finally:
        assert s.stop() == 0


async def load(url: str, total: int, concurrency: int, cancel_every: int) -> None:
    """Every completed request is correct and answered once; no 5xx; cancelled ones vanish."""
    sem = asyncio.Semaphore(concurrency)
    expected: dict[int, str] = {}
    results: dict[int, str] = {}
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        for n in (3, 5):  # reference greedy outputs, one per prompt shape
            r = await client.post(
                "/v1/completions",
                json={
                    "prompt": f"Hello {n}",
                    "max_tokens": n,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
            expected[n] = r.json()["choices"][0]["text"]

        async def one(i: int) -> None:
            n = 3 if i % 2 else 5
            body = {
                "prompt": f"Hello {n}",
                "max_tokens": n,
                "temperature": 0,
                "ignore_eos": True,
                "stream": i % 3 == 0,
            }
            async with sem:
                if i % cancel_every == 0:
                    body.update(stream=True, max_tokens=50)
                    async with client.stream("POST", "/v1/completions", json=body) as r:
                        assert r.status_code == 200
                        async for _ in r.aiter_lines():
                            break
                    return
                if body["stream"]:
                    text, done = "", 0
                    async with client.stream("POST", "/v1/completions", json=body) as r:
                        assert r.status_code == 200
                        async for line in r.aiter_lines():
                            if line == "data: [DONE]":
                                done += 1
                            elif line.startswith("data: "):
                                text += json.loads(line[6:])["choices"][0]["text"]
                    assert done == 1
                else:
                    r = await client.post("/v1/completions", json=body)
                    assert r.status_code == 200, r.text
                    text = r.json()["choices"][0]["text"]
                assert i not in results
                results[i] = text
                assert text == expected[n]

        await asyncio.gather(*[one(i) for i in range(total)])
    assert len(results) == total - len(range(0, total, cancel_every))


def test_sigterm_drains_in_flight_then_exits_zero(tiny_model_dir):
    s = Server(str(tiny_model_dir("llama")))
    result = {}

    def long_request():
        r = httpx.post(
            f"{s.url}/v1/completions",
            timeout=60,
            json={"prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "temperature": 0},
        )
        result["status"] = r.status_code
        result["tokens"] = r.json()["usage"]["completion_tokens"]

    t = threading.Thread(target=long_request)
    t.start()
    assert wait_until(lambda: s.metric("tokenmill:num_requests_running") == 1)
    s.proc.send_signal(signal.SIGTERM)
    assert wait_until(lambda: httpx.get(f"{s.url}/v1/health/ready").status_code == 503, 5)
    r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    t.join(60)
    assert result == {"status": 200, "tokens": 400}
    assert s.proc.wait(30) == 0
    s.stop()


def test_a_tensor_parallel_server_answers_as_a_single_rank_one(tiny_model_dir):
    """serve --tensor-parallel-size 2: the core process starts two rank processes (Gloo);
    greedy completions equal the single-rank server's; SIGTERM ends them all."""
    model = str(tiny_model_dir("llama"))
    body = {"model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 10, "temperature": 0, "ignore_eos": True}  # fmt: skip
    one = Server(model, "--no-enable-prefix-caching")
    try:
        want = httpx.post(f"{one.url}/v1/completions", json=body, timeout=60).json()
    finally:
        assert one.stop() == 0
    two = Server(model, "--no-enable-prefix-caching", "--tensor-parallel-size", "2")
    try:
        got = httpx.post(f"{two.url}/v1/completions", json=body, timeout=60).json()
        assert got["choices"][0]["text"] == want["choices"][0]["text"]
    finally:
        assert two.stop() == 0
