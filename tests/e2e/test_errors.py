"""Every error is OpenAI-shaped JSON with the right status; none kills the server."""

from __future__ import annotations

import httpx
import pytest

from tests.e2e.conftest import API_KEY, Server

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def post(server, path, body=None, headers=AUTH, **kw):
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=30, **kw)


def assert_error(r, status, param=None, code=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize(
    "body, param",
    [
        ({"prompt": "hi", "temperature": -1}, "temperature"),
        ({"prompt": "hi", "top_p": 0}, "top_p"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ({"prompt": "hi", "n": 0}, "n"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": [1, 999999]}, "prompt"),
        ({"prompt": 5}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_invalid_values_are_400_naming_the_parameter(server, body, param):
    assert_error(post(server, "/v1/completions", {"model": "tiny", **body}), 400, param)


def test_context_length_exceeded(server):
    r = post(server, "/v1/completions", {"prompt": "hi " * 100, "max_tokens": 500})
    assert_error(r, 400, code="context_length_exceeded")
    r = post(
        server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 600}]}
    )
    assert_error(r, 400, code="context_length_exceeded")


def test_auth_model_body_json(server):
    assert_error(post(server, "/v1/completions", {"prompt": "hi"}, headers={}), 401)
    bad = {"Authorization": "Bearer nope"}
    assert_error(post(server, "/v1/chat/completions", {"messages": []}, headers=bad), 401)
    assert_error(
        post(server, "/v1/completions", {"model": "gpt-9", "prompt": "hi"}),
        404,
        "model",
        "model_not_found",
    )
    big = {"prompt": "x" * (5 << 20)}
    assert_error(post(server, "/v1/completions", big), 413)
    r = httpx.post(
        f"{server.url}/v1/completions",
        content=b"{not json",
        headers={**AUTH, "content-type": "application/json"},
    )
    assert_error(r, 400)
    assert_error(post(server, "/v1/chat/completions", {"messages": []}), 400, "messages")
    assert_error(
        post(
            server,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        ),
        400,
    )
    assert httpx.get(f"{server.url}/nope").json()["error"]["type"] == "not_found_error"
    # still serving
    ok = post(server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_queue_full_is_429_with_retry_after(tiny_model_dir):
    s = Server(str(tiny_model_dir("llama")), "--max-waiting", "0")
    try:
        r = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi"}, timeout=30)
        assert_error(r, 429)
        assert r.headers["retry-after"] == "1"
    finally:
        assert s.stop() == 0


def test_model_that_cannot_load_exits_with_the_reason(tmp_path):
    import subprocess
    import sys

    from tests.e2e.conftest import free_port

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "tokenmill.cli",
            "serve",
            "--model",
            str(tmp_path / "nope"),
            "--port",
            str(free_port()),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2
    assert "not a Hugging Face model folder" in run.stderr
