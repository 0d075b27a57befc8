"""Hostile input, class by class (the issue "Nothing a client sends can hurt another client"):
every one is a 400 naming the field, the server keeps serving, and /metrics and /v1/usage stay
readable; the honest requests in flight next to hostile ones come out as they would alone."""

from __future__ import annotations

import concurrent.futures as cf
import time

import httpx
import pytest

from tests.e2e.conftest import Server
from tests.e2e.test_errors import AUTH, assert_error, post

SURROGATE = "\\ud800"  # a JSON escape that decodes to a lone surrogate in Python


def raw(server, path: str, body: str):
    headers = {**AUTH, "content-type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=body.encode(), headers=headers, timeout=30)


def still_serving(server) -> None:
    assert httpx.get(f"{server.url}/metrics").status_code == 200
    assert httpx.get(f"{server.url}/v1/usage", headers=AUTH).status_code in (200, 404)
    ok = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", '{"prompt": "a%sb"}', "prompt"),
        ("/v1/completions", '{"prompt": ["ok", "a%sb"]}', "prompt"),
        ("/v1/completions", '{"prompt": "hi", "stop": ["%s"]}', "stop"),
        ("/v1/completions", '{"prompt": "hi", "user": "x%s"}', "user"),
        ("/v1/completions", '{"prompt": "hi", "whatever": {"k": "%s"}}', None),
        ("/v1/chat/completions", '{"messages": [{"role": "user", "content": "%s"}]}', "messages"),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": [{"type": "text", "text": "%s"}]}]}',
            "messages",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "hi", "name": "%s"}]}',
            "messages",
        ),
        (
            "/v1/chat/completions",
            '{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": {"%s": 1}}',
            "chat_template_kwargs",
        ),
    ],
)
def test_invalid_unicode_anywhere_is_a_400_naming_the_field(server, path, body, param):
    assert_error(raw(server, path, body % SURROGATE), 400, param)
    still_serving(server)


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "seed": 2**64}, "seed"),
        ({"prompt": "hi", "seed": -(2**63) - 1}, "seed"),
        ({"prompt": "hi", "top_k": 10**20}, "top_k"),
        ({"prompt": "hi", "top_k": 10**6}, "top_k"),  # beyond the vocabulary
        ({"prompt": "hi", "max_tokens": 2**40}, "max_tokens"),
        ({"prompt": "hi", "stop_token_ids": [2**40]}, "stop_token_ids"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": "hi", "n": 2, "best_of": 1}, "best_of"),
    ],
)
def test_values_outside_what_the_engine_takes_are_refused(server, body, param):
    assert_error(post(server, "/v1/completions", body), 400, param)
    still_serving(server)


@pytest.mark.parametrize("literal", ["Infinity", "-Infinity", "NaN"])
def test_non_finite_numbers_are_refused(server, literal):
    for field in ("temperature", "top_p", "presence_penalty"):
        r = raw(server, "/v1/completions", f'{{"prompt": "hi", "{field}": {literal}}}')
        assert_error(r, 400, field)
    still_serving(server)


@pytest.mark.parametrize(
    "content",
    [
        [{"type": "text", "text": 5}],
        [{"type": "text", "text": None}],
        [{"type": "text"}],
        [{"type": "image_url", "image_url": {"url": "x"}}],
        [{"text": "no type"}],
    ],
)
def test_malformed_chat_content_parts_are_400(server, content):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 2}
    assert_error(post(server, "/v1/chat/completions", body), 400, "messages")
    still_serving(server)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"chat_template": "x"},
        {"add_generation_prompt": False},
        {"eos_token": "x"},
        {"messages": []},
        {"bos_token": None},
    ],  # fmt: skip
)
def test_template_kwargs_cannot_override_the_renderers_own(server, kwargs):
    body = {"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": kwargs}
    assert_error(post(server, "/v1/chat/completions", body), 400, "chat_template_kwargs")
    still_serving(server)


def test_best_of_equal_to_n_and_top_logprobs_count(server):
    r = post(server, "/v1/completions", {"prompt": "hi", "n": 2, "best_of": 2, "max_tokens": 2})
    assert r.status_code == 200 and len(r.json()["choices"]) == 2
    for k in (1, 3, 5):
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                "logprobs": True, "top_logprobs": k, "temperature": 0}  # fmt: skip
        content = post(server, "/v1/chat/completions", body).json()["choices"][0]["logprobs"]
        assert all(len(t["top_logprobs"]) == k for t in content["content"])
        for t in content["content"]:  # the k best, best first; the chosen one among them if it is
            lps = [x["logprob"] for x in t["top_logprobs"]]
            assert lps == sorted(lps, reverse=True) and t["logprob"] <= lps[0] + 1e-6


def test_unknown_fields_are_ignored_or_refused_with_strict_api(server, tiny_model_dir):
    ok = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2, "suffix_x": 1})
    assert ok.status_code == 200
    strict = Server(str(tiny_model_dir("llama")), "--strict-api")
    try:
        r = httpx.post(f"{strict.url}/v1/completions", json={"prompt": "hi", "frobnicate": 1})
        assert_error(r, 400, "frobnicate", "unsupported_field")
        r = httpx.post(f"{strict.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 200
    finally:
        assert strict.stop() == 0


def test_hostile_requests_next_to_honest_ones_leave_them_unchanged(server):
    honest = [{"prompt": f"Once upon a time {i}", "max_tokens": 12, "temperature": 0,
               "ignore_eos": True} for i in range(4)]  # fmt: skip
    alone = [post(server, "/v1/completions", b).json()["choices"][0]["text"] for b in honest]
    hostile = [{"prompt": "x", "seed": 2**64}, {"prompt": "x", "top_k": 10**20},
               {"prompt": []}, {"prompt": "x", "temperature": -1}]  # fmt: skip
    with cf.ThreadPoolExecutor(8) as pool:
        bad = [pool.submit(post, server, "/v1/completions", b) for b in hostile]
        good = [pool.submit(post, server, "/v1/completions", b) for b in honest]
        assert all(f.result().status_code == 400 for f in bad)
        texts = [f.result().json()["choices"][0]["text"] for f in good]
    assert texts == alone


def test_health_stays_fast_while_large_bodies_are_templated(server):
    """Templating and tokenizing run in worker threads: four ~1.8 MB chat bodies (refused
    afterwards as too long for the model) do not hold the event loop."""
    body = {"messages": [{"role": "user", "content": "lorem ipsum " * 150_000}], "max_tokens": 1}
    worst = 0.0
    with cf.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(post, server, "/v1/chat/completions", body) for _ in range(4)]
        while not all(f.done() for f in futures):
            t = time.monotonic()
            assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
            worst = max(worst, time.monotonic() - t)
            time.sleep(0.05)
        assert all(f.result().status_code == 400 for f in futures)  # context_length_exceeded
    assert worst < 1.0, worst
