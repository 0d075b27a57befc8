"""vLLM's extra endpoints in vLLM's shapes: /tokenize (prompt or chat), /detokenize,
/v1/models/{id}, /ping; checked against the model's own tokenizer (transformers)."""

from __future__ import annotations

import json

import httpx
import pytest
from transformers import AutoTokenizer

from tests.e2e.conftest import API_KEY
from tests.e2e.test_errors import assert_error

AUTH = {"Authorization": f"Bearer {API_KEY}"}
TEXTS = ["Hello, world!", "  spaces\tand\nlines ", "naïve café 東京 🙂", "a" * 300]


@pytest.fixture(scope="module")
def hf_tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(str(tiny_model_dir("llama")))


def post(server, path, body, headers=AUTH):
    """JSON with ASCII escapes, so a lone surrogate travels as a client could send it."""
    head = {**headers, "content-type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=json.dumps(body), headers=head, timeout=30)


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("special", [True, False])
def test_tokenize_a_prompt_as_the_models_tokenizer_does(server, hf_tok, text, special):
    r = post(server, "/tokenize", {"prompt": text, "add_special_tokens": special,
                                   "return_token_strs": True})  # fmt: skip
    assert r.status_code == 200, r.text
    body = r.json()
    expected = hf_tok(text, add_special_tokens=special)["input_ids"]
    assert body["tokens"] == expected and body["count"] == len(expected)
    assert body["token_strs"] == hf_tok.convert_ids_to_tokens(expected)
    assert body["max_model_len"] > 0
    back = post(server, "/detokenize", {"tokens": expected}).json()["prompt"]
    assert back == hf_tok.decode(expected)


def test_tokenize_chat_counts_what_a_chat_request_is_charged(server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    tokens = post(server, "/tokenize", {"messages": messages}).json()
    chat = post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1}).json()
    assert tokens["count"] == chat["usage"]["prompt_tokens"] == len(tokens["tokens"])
    assert tokens["token_strs"] is None


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/detokenize", {"tokens": [1, 10**9]}, "tokens"),
        ("/detokenize", {"tokens": [-1]}, "tokens"),
        ("/detokenize", {"tokens": "12"}, "tokens"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "\ud800"}, "prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {}, "prompt"),
    ],
)
def test_bad_tokenize_input_is_a_400_naming_the_field(server, path, body, param):
    assert_error(post(server, path, body), 400, param)


def test_tokenize_needs_a_key_and_a_served_model(server):
    assert_error(post(server, "/tokenize", {"prompt": "x"}, headers={}), 401)
    assert_error(post(server, "/detokenize", {"tokens": [1]}, headers={}), 401)
    r = post(server, "/tokenize", {"prompt": "x", "model": "other"})
    assert_error(r, 404, "model", "model_not_found")
    bad = httpx.post(f"{server.url}/tokenize", content=b"{nope", headers=AUTH)
    assert_error(bad, 400)


def test_model_by_id_and_ping(server):
    r = httpx.get(f"{server.url}/v1/models/tiny", headers=AUTH)
    assert r.status_code == 200 and r.json()["id"] == "tiny" and r.json()["object"] == "model"
    assert_error(httpx.get(f"{server.url}/v1/models/gpt-4", headers=AUTH), 404, "model",
                 "model_not_found")  # fmt: skip
    assert httpx.get(f"{server.url}/ping").status_code == 200
    assert httpx.post(f"{server.url}/ping").status_code == 200


def test_embeddings_with_the_openai_client(server):
    import base64

    import numpy as np
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY)
    texts = [
        "The quick brown fox",
        "Paged attention keeps the KV cache in blocks",
        "The quick brown fox",
    ]
    r = client.embeddings.create(model="tiny", input=texts)
    vectors = [np.array(d.embedding) for d in r.data]
    assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens > 0
    assert all(v.shape == (64,) and abs(np.linalg.norm(v) - 1) < 1e-5 for v in vectors)
    assert np.allclose(vectors[0], vectors[2], atol=1e-5) and not np.allclose(
        vectors[0], vectors[1]
    )
    single = np.array(client.embeddings.create(model="tiny", input=texts[1]).data[0].embedding)
    assert np.allclose(single, vectors[1], atol=1e-5)  # alone as in a batch
    raw = post(server, "/v1/embeddings", {"input": texts[:1], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.allclose(decoded, vectors[0], atol=1e-6)
    ids = post(server, "/v1/tokenize", {"prompt": texts[0]})  # not under /v1: a 404
    assert ids.status_code == 404
    tokens = post(server, "/tokenize", {"prompt": texts[0]}).json()["tokens"]
    by_ids = post(server, "/v1/embeddings", {"input": tokens}).json()["data"][0]["embedding"]
    assert np.allclose(by_ids, vectors[0], atol=1e-5)


@pytest.mark.parametrize(
    "body, param",
    [({"input": ""}, "input"), ({"input": []}, "input"), ({"input": ["a", ""]}, "input"),
     ({"input": "a", "dimensions": 8}, "dimensions"), ({"input": "a", "encoding_format": "hex"},
     "encoding_format"), ({"input": [10**9]}, "prompt")],
)  # fmt: skip
def test_bad_embedding_input_is_a_400_naming_it(server, body, param):
    assert_error(post(server, "/v1/embeddings", body), 400, param)
