"""An async load generator for any OpenAI-compatible server (ours or a peer's).

Requests go to /v1/completions with streaming on, so every token's arrival is timed. Arrivals are
Poisson at --request-rate, or as fast as --max-concurrency allows. Every request is accounted
for: completed + failed = sent.

Datasets:
- random: uniform random token ids (like vLLM's `random`), exact input/output lengths;
- sharegpt-like: synthetic, seeded. Input and output lengths are log-normal with medians 128
  and 192 tokens and sigma 1.0 and 0.8 (an assumption shaped after ShareGPT conversations'
  long-tailed lengths, not a fit to the data set, which this machine cannot download), clipped
  to [4, 4 x median]; the prompt text is random words;
- a .jsonl file: one {"prompt": text or token ids, "output_len": n} per line (real traces).
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tokenmill.bench.metrics import RequestRecord
from tokenmill.bench.progress import LoadProgress

WORDS = (
    "time person year way day thing man world life hand part child eye woman place work week "
    "case point government company number group problem fact"
).split()


@dataclass(frozen=True)
class Sample:
    prompt: str | list[int]
    output_len: int


def load_dataset(
    name: str,
    num: int,
    input_len: int,
    output_len: int,
    seed: int,
    vocab_size: int = 32000,
    range_ratio: float = 0.0,
) -> list[Sample]:
    """`random`: lengths uniform in [len x (1 - range_ratio), len x (1 + range_ratio)], as
    vLLM's --random-range-ratio; `sharegpt-like`: log-normal around the lengths; or a .jsonl."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    if name == "random":

        def draw(n: int) -> int:
            return rng.randint(max(1, round(n * (1 - range_ratio))), round(n * (1 + range_ratio)))

        out = []
        for _ in range(num):
            n_in, n_out = draw(input_len), draw(output_len)
            out.append(Sample([rng.randrange(100, vocab_size) for _ in range(n_in)], n_out))
        return out
    if name == "sharegpt-like":
        out = []
        for _ in range(num):
            n_in = _lognormal(rng, input_len, 1.0)
            n_out = _lognormal(rng, output_len, 0.8)
            out.append(Sample(" ".join(rng.choice(WORDS) for _ in range(n_in)), n_out))
        return out
    path = Path(name)
    if path.suffix != ".jsonl" or not path.exists():
        raise ValueError(
            f"dataset must be random, sharegpt-like or an existing .jsonl file; got {name!r}"
        )
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Sample(r["prompt"], int(r.get("output_len", output_len))) for r in rows[:num]]


def wait_ready(base_url: str, timeout_s: float = 120.0, alive=lambda: True) -> None:
    """Poll /v1/health/ready until 200 (or, on servers without it, /v1/models); `alive()` False
    (e.g. the process exited) stops early."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError(f"the server at {base_url} exited while starting")
        try:
            status = httpx.get(f"{base_url}/v1/health/ready", timeout=1).status_code
            if status == 200:
                return
            if status == 404 and httpx.get(f"{base_url}/v1/models", timeout=1).status_code == 200:
                return  # a peer without NIM-style health routes (llama.cpp's server)
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"{base_url} did not become ready within {timeout_s:.0f} s")


def _lognormal(rng: random.Random, median: int, sigma: float) -> int:
    return int(min(max(round(rng.lognormvariate(math.log(median), sigma)), 4), 4 * median))


async def _one(
    client: httpx.AsyncClient,
    model: str | None,
    s: Sample,
    rec: RequestRecord,
    headers: dict[str, str],
) -> None:
    body: dict[str, Any] = {
        "prompt": s.prompt,
        "max_tokens": s.output_len,
        "stream": True,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream_options": {"include_usage": True},
    }
    if model:
        body["model"] = model
    try:
        async with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                rec.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.monotonic()
                chunk = json.loads(line[6:])
                choice = (chunk.get("choices") or [{}])[0]
                if choice.get("text") or (choice.get("finish_reason") and not rec.chunk_times):
                    rec.chunk_times.append(now)  # text arrived (or only the end, if all hidden)
                if chunk.get("usage"):
                    rec.prompt_tokens = chunk["usage"]["prompt_tokens"]
                    rec.output_tokens = chunk["usage"]["completion_tokens"]
        if not rec.output_tokens and rec.chunk_times:
            # A server that streams no usage (llama.cpp's): one chunk per token, as it streams.
            rec.output_tokens = len(rec.chunk_times)
        rec.ok = bool(rec.chunk_times) and rec.output_tokens > 0
        if not rec.ok:
            rec.error = f"no tokens received ({rec.output_tokens} counted)"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        rec.error = f"{type(e).__name__}: {e}"


async def run_load(
    base_url: str,
    samples: list[Sample],
    model: str | None = None,
    request_rate: float | None = None,
    max_concurrency: int | None = None,
    api_key: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[list[RequestRecord], float]:
    """Send every sample; returns (records in send order, duration in seconds)."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(max_concurrency or len(samples) or 1)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    records: list[RequestRecord] = []
    limits = httpx.Limits(max_connections=max_concurrency or 1000, max_keepalive_connections=None)
    client = httpx.AsyncClient(base_url=base_url, timeout=httpx.Timeout(600.0), limits=limits)
    with LoadProgress(len(samples), progress) as bar:
        async with client:

            async def go(s: Sample) -> None:
                async with sem:
                    rec = RequestRecord(sent=time.monotonic())
                    records.append(rec)
                    bar.sent()
                    await _one(client, model, s, rec, headers)
                    bar.finished(rec)

            start = time.monotonic()
            tasks = []
            for s in samples:
                tasks.append(asyncio.create_task(go(s)))
                if request_rate and math.isfinite(request_rate):
                    await asyncio.sleep(rng.expovariate(request_rate))
            await asyncio.gather(*tasks)
            duration = time.monotonic() - start
    return records, duration
