"""The server through the official `openai` client (sync, async, streaming) and raw httpx."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from tests.e2e.conftest import API_KEY
from tokenmill import LLM, SamplingParams

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)


def test_completion_streamed_equals_unstreamed_equals_offline(server, client, tiny_model_dir):
    kw = dict(
        model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    full = client.completions.create(**kw)
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 12 and full.usage.prompt_tokens > 0
    chunks = list(
        client.completions.create(stream=True, stream_options={"include_usage": True}, **kw)
    )
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    offline = LLM(model=str(tiny_model_dir("llama")), dtype="float32", kv_cache_memory=4 << 20)
    want = offline.generate(
        [PROMPT], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False
    )
    assert want[0].outputs[0].text == full.choices[0].text


def test_chat_streamed_and_unstreamed(client):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello world"}]},
    ]
    full = client.chat.completions.create(
        model="tiny",
        messages=msgs,
        max_completion_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    choice = full.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.content) == full.usage.completion_tokens
    assert all(len(t.top_logprobs) <= 2 for t in choice.logprobs.content)
    stream = list(
        client.chat.completions.create(
            model="tiny", messages=msgs, max_tokens=10, temperature=0, stream=True
        )
    )
    assert stream[0].choices[0].delta.role == "assistant"
    assert stream[-1].choices[0].finish_reason == choice.finish_reason
    assert "".join(c.choices[0].delta.content or "" for c in stream) == choice.message.content


def test_list_prompts_n_and_echo(client):
    out = client.completions.create(
        model="tiny",
        prompt=["Hello", "Paged"],
        n=2,
        max_tokens=4,
        temperature=0,
        echo=True,
        logprobs=1,
        extra_body={"ignore_eos": True},
    )
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3]
    by_index = {c.index: c for c in out.choices}
    assert by_index[0].text.startswith("Hello") and by_index[2].text.startswith("Paged")
    assert by_index[0].text == by_index[1].text  # greedy, n=2
    # echo + logprobs: the prompt's tokens (the first without a logprob), then the 4 new ones
    lp = by_index[0].logprobs
    assert len(lp.tokens) > 4 and lp.token_logprobs[0] is None and lp.text_offset[0] == 0
    assert all(v is not None for v in lp.token_logprobs[1:])
    ids = client.completions.create(
        model="tiny", prompt=[1, 5, 6], max_tokens=3, extra_body={"ignore_eos": True}
    )
    assert ids.usage.prompt_tokens == 3


def test_async_client_concurrent_streams(server):
    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0)

        async def one(i):
            stream = await client.completions.create(
                model="tiny",
                prompt=f"Hello {i}",
                max_tokens=8,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            return "".join([c.choices[0].text async for c in stream])

        return await asyncio.gather(*[one(i) for i in range(8)])

    texts = asyncio.run(main())
    assert len(texts) == 8 and all(texts)


def test_models_health_version_metrics(server):
    models = httpx.get(f"{server.url}/v1/models", headers={"Authorization": f"Bearer {API_KEY}"})
    assert models.json()["data"][0]["id"] == "tiny"
    assert httpx.get(f"{server.url}/v1/health/live").status_code == 200
    assert httpx.get(f"{server.url}/v1/health/ready").status_code == 200
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "tokenmill:time_to_first_token_seconds_bucket",
        "tokenmill:generation_tokens_total",
        "tokenmill:kv_cache_usage_perc",
        "tokenmill:request_success_total",
        "tokenmill:inter_token_latency_seconds_count",
        "tokenmill:num_requests_running",
    ):
        assert name in text, name
    schema = httpx.get(f"{server.url}/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/completions" in schema["paths"]
