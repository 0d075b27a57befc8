"""A served request's tokens and logprobs are bit-equal alone and amid other clients' traffic,
with `tokenmill serve --batch-invariant` (bf16, chunked prefill), greedy and seeded."""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.e2e.conftest import Server
from tests.tiny_models import make_tiny_model

TARGET = list(range(10, 70))


@pytest.fixture(scope="module")
def invariant_server(tmp_path_factory):
    model = make_tiny_model(tmp_path_factory.mktemp("wide"), "llama", seed=3, hidden_size=256,
                            intermediate_size=768, vocab_size=2048)  # fmt: skip
    s = Server(str(model), "--batch-invariant", "--dtype", "bfloat16",
               "--max-num-batched-tokens", "48", "--no-enable-prefix-caching")  # fmt: skip
    yield s
    assert s.stop() == 0


def target(server: Server, extra: dict) -> dict:
    body = {"prompt": TARGET, "max_tokens": 16, "ignore_eos": True, "logprobs": 2, **extra}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return {"text": choice["text"], "logprobs": choice["logprobs"]}


def other(server: Server, seed: int) -> None:
    rng = random.Random(seed)
    body = {"prompt": [rng.randrange(10, 2000) for _ in range(rng.randrange(3, 120))],
            "max_tokens": rng.randrange(4, 40), "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
        for _ in r.iter_lines():
            pass


@pytest.mark.parametrize(
    "extra", [{"temperature": 0}, {"temperature": 0.9, "top_p": 0.9, "seed": 7}]
)
def test_same_output_alone_and_amid_other_clients(invariant_server, extra):
    alone = target(invariant_server, extra)
    with ThreadPoolExecutor(12) as pool:
        noise = [pool.submit(other, invariant_server, i) for i in range(10)]
        amid = [pool.submit(target, invariant_server, extra) for _ in range(2)]
        for f in noise:
            f.result()
        results = [f.result() for f in amid]
    for got in results:
        assert got == alone  # text, tokens, logprobs and offsets, bit for bit
