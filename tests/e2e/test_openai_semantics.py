"""OpenAI semantics evaluation harnesses depend on: echo + logprobs cover the prompt (first
token without a logprob, offsets from 0) and then the completion; max_tokens 0 with echo scores
the prompt only; the prompt's logprobs equal the offline engine's prompt_logprobs."""

from __future__ import annotations

import pytest

from tests.e2e.test_errors import assert_error, post
from tokenmill import LLM, SamplingParams

IDS = [5, 17, 33, 2, 90, 41, 7, 7, 120]


def reference_prompt_logprobs(tiny_model_dir, ids):
    llm = LLM(str(tiny_model_dir("llama")), dtype="float32", kv_cache_memory=8 << 20, block_size=4)
    out = llm.generate([{"prompt_token_ids": ids}], SamplingParams(max_tokens=1, prompt_logprobs=2))
    return out[0].prompt_logprobs


def test_echo_scoring_equals_the_offline_prompt_logprobs(server, tiny_model_dir):
    body = {"prompt": IDS, "echo": True, "max_tokens": 0, "logprobs": 2, "temperature": 0}
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    choice, usage = r.json()["choices"][0], r.json()["usage"]
    lp = choice["logprobs"]
    assert usage["completion_tokens"] == 0 and usage["prompt_tokens"] == len(IDS)
    assert len(lp["tokens"]) == len(IDS) and lp["token_logprobs"][0] is None
    assert lp["top_logprobs"][0] is None and lp["text_offset"][0] == 0
    ref = reference_prompt_logprobs(tiny_model_dir, IDS)
    for got, entry, t in zip(lp["token_logprobs"][1:], ref[1:], IDS[1:]):
        assert abs(got - entry[t]) < 1e-4
    for tops, entry in zip(lp["top_logprobs"][1:], ref[1:]):
        assert 1 <= len(tops) <= len(entry)  # keyed by text: two tokens may decode alike
    assert lp["text_offset"] == sorted(lp["text_offset"])


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_vllm_prompt_logprobs_with_ranks_match_transformers(server, tiny_model_dir, path):
    import torch
    import transformers

    k = 3
    if path == "/v1/completions":
        body = {"prompt": IDS, "max_tokens": 2, "prompt_logprobs": k, "logprobs": 1,
                "echo": True, "temperature": 0}  # fmt: skip
    else:
        body = {"messages": [{"role": "user", "content": "the quick brown fox"}],
                "max_tokens": 2, "prompt_logprobs": k}  # fmt: skip
    r = post(server, path, body)
    assert r.status_code == 200, r.text
    data = r.json()
    plp = data["choices"][0]["prompt_logprobs"] if "chat" not in path else data["prompt_logprobs"]
    ids = IDS if "chat" not in path else None
    if ids is None:  # the chat prompt's token ids, from the server's own /tokenize
        ids = post(server, "/tokenize", {"messages": body["messages"]}).json()["tokens"]
    assert plp[0] is None and len(plp) == len(ids)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir("llama")),
                                                              dtype=torch.float32)  # fmt: skip
    with torch.no_grad():
        lp = model(torch.tensor([ids])).logits[0].log_softmax(-1)
    for pos in range(1, len(ids)):
        row, dist = plp[pos], lp[pos - 1]
        mine = row[str(ids[pos])]
        assert abs(mine["logprob"] - dist[ids[pos]].item()) < 1e-4
        assert mine["rank"] == int((dist > dist[ids[pos]]).sum()) + 1
        top = dist.topk(k)
        for rank, (tid, value) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
            assert (
                row[str(tid)]["rank"] == rank + 1 and abs(row[str(tid)]["logprob"] - value) < 1e-4
            )
        assert len(row) in (k, k + 1) and all("decoded_token" in e for e in row.values())
    if "chat" not in path:  # the echo view keeps its own k (logprobs 1): token + top 1
        tops = data["choices"][0]["logprobs"]["top_logprobs"]
        assert all(len(t) <= 2 for t in tops[1:])
    stream = post(server, path, {**body, "stream": True})
    assert_error(stream, 400, "prompt_logprobs")


def test_echo_with_a_completion_covers_prompt_then_completion(server):
    body = {"prompt": IDS, "echo": True, "max_tokens": 4, "logprobs": 1, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    choice = post(server, "/v1/completions", body).json()["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(IDS) + 4
    assert all(v is not None for v in lp["token_logprobs"][1:])
    plain = post(server, "/v1/completions", {**body, "echo": False}).json()["choices"][0]
    assert choice["text"].endswith(plain["text"])
    got, want = lp["token_logprobs"][len(IDS) :], plain["logprobs"]["token_logprobs"]
    assert max(abs(a - b) for a, b in zip(got, want)) < 1e-4  # the prefix recomputed, not cached
    assert lp["text_offset"][len(IDS)] == len(choice["text"]) - len(plain["text"])


def test_scoring_needs_echo_and_no_stream(server):
    assert_error(
        post(server, "/v1/completions", {"prompt": IDS, "max_tokens": 0}), 400, "max_tokens"
    )
    body = {"prompt": IDS, "echo": True, "max_tokens": 0, "stream": True}
    assert_error(post(server, "/v1/completions", body), 400, "max_tokens")


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
MSG = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    "path, extra, param",
    [
        ("/v1/chat/completions", {"functions": [TOOL["function"]]}, "functions"),
        ("/v1/chat/completions", {"function_call": {"name": "f"}}, "function_call"),
        ("/v1/chat/completions", {"guided_whitespace_pattern": " *"}, "guided_whitespace_pattern"),
        ("/v1/completions", {"suffix": " end"}, "suffix"),
    ],
)  # fmt: skip
def test_what_would_be_silently_ignored_is_refused_naming_it(server, path, extra, param):
    base = {"messages": MSG} if "chat" in path else {"prompt": "hi"}
    r = post(server, path, {**base, "max_tokens": 2, **extra})
    err = assert_error(r, 400, param)
    assert "not supported" in err["message"]


@pytest.mark.parametrize(
    "extra",
    [{"tools": []}, {"tool_choice": "none"}, {"response_format": {"type": "text"}},
     {"logit_bias": {}}, {"suffix": ""}, {"stream_options": {"include_usage": True}}],
)  # fmt: skip
def test_the_same_fields_asking_for_nothing_are_served(server, extra):
    r = post(server, "/v1/chat/completions", {"messages": MSG, "max_tokens": 2, **extra})
    assert r.status_code == 200, r.text


def test_the_openai_client_gets_a_bad_request_for_auto_tools_without_a_parser(server):
    import openai

    from tests.e2e.conftest import API_KEY

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
    with pytest.raises(openai.BadRequestError, match="--enable-auto-tool-choice"):
        client.chat.completions.create(model="tiny", messages=MSG, tools=[TOOL], max_tokens=2)
    assert client.models.retrieve("tiny").id == "tiny"


def test_logit_bias_over_http(server):
    body = {"prompt": "hi", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
            "logit_bias": {"77": 100}, "logprobs": 0}  # fmt: skip
    r = post(server, "/v1/completions", body)
    assert r.status_code == 200, r.text
    chosen = r.json()["choices"][0]["logprobs"]["tokens"]
    assert len(chosen) == 4 and len(set(chosen)) == 1
    for bad in ({"x": 1}, {"5": 1000}, {"-3": 1}):
        assert_error(post(server, "/v1/completions", {**body, "logit_bias": bad}), 400,
                     "logit_bias")  # fmt: skip


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_continuous_usage_stats_in_every_chunk(server, path):
    import json

    import httpx

    from tests.e2e.conftest import API_KEY

    base = {"messages": MSG} if "chat" in path else {"prompt": "hi"}
    body = {**base, "max_tokens": 5, "ignore_eos": True, "stream": True, "n": 2,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}  # fmt: skip
    with httpx.stream("POST", f"{server.url}{path}", json=body, timeout=60,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as r:  # fmt: skip
        chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
    last = chunks[-1]
    assert last["choices"] == [] and last["usage"]["completion_tokens"] == 10
    prompt = last["usage"]["prompt_tokens"]
    seen: dict[int, int] = {}
    for c in chunks[:-1]:
        u = c["usage"]
        assert u is not None and u["prompt_tokens"] == prompt
        assert u["total_tokens"] == prompt + u["completion_tokens"]
        (choice,) = c["choices"]
        assert u["completion_tokens"] >= seen.get(choice["index"], 0)  # grows per choice
        seen[choice["index"]] = u["completion_tokens"]
    assert seen == {0: 5, 1: 5}
