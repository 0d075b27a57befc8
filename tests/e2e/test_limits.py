"""Limits that cannot be walked around: the body limit on the bytes read (chunked or not),
ambiguous framing refused with the connection closed, stalled bodies timed out, tenant names
bounded in length and count, and prompts x n bounded per request."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest

from tests.e2e.conftest import Server
from tests.e2e.test_errors import assert_error

LIMIT = 64 << 10


@pytest.fixture(scope="module")
def limited(tiny_model_dir):
    s = Server(
        str(tiny_model_dir("llama")), "--max-body-bytes", str(LIMIT), "--body-timeout", "0.5", "--header-timeout", "1",
        "--metrics-tenants", "--max-request-sequences", "8",
    )  # fmt: skip
    yield s
    assert s.stop() == 0


def big_body(size: int) -> bytes:
    return json.dumps({"prompt": "x" * size, "max_tokens": 1}).encode()


def test_the_body_limit_counts_bytes_read_plain_or_chunked(limited):
    url = f"{limited.url}/v1/completions"
    head = {"content-type": "application/json"}
    for size in (LIMIT + 1, 4 * LIMIT, 16 * LIMIT):
        body = big_body(size)
        assert_error(httpx.post(url, content=body, headers=head, timeout=30), 413)

        def chunks(body=body):  # no Content-Length: Transfer-Encoding: chunked
            for i in range(0, len(body), 4096):
                yield body[i : i + 4096]

        r = httpx.post(url, content=chunks(), headers=head, timeout=30)
        assert_error(r, 413, code="request_too_large")
    small = json.dumps({"prompt": "hi", "max_tokens": 1, "user": "u" * (LIMIT // 2)}).encode()
    assert httpx.post(url, content=small, headers=head, timeout=30).status_code == 200


def raw_exchange(server: Server, request: bytes, wait_s: float = 5.0) -> tuple[bytes, bool]:
    """Send bytes, read the answer; (answer, whether the server then closed the connection)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=wait_s) as sock:
        sock.sendall(request)
        data, closed = b"", False
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            try:
                part = sock.recv(65536)
            except TimeoutError:
                break
            if not part:
                closed = True
                break
            data += part
        return data, closed


def test_ambiguous_framing_is_refused_and_the_connection_closed(limited):
    body = b'{"prompt": "hi", "max_tokens": 1}'
    for extra in (
        f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n",
        f"Content-Length: {len(body)}\r\nContent-Length: {len(body) + 5}\r\n",
    ):
        request = (
            (
                "POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                f"{extra}\r\n"
            ).encode()
            + body
            + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
        )  # a smuggled request
        answer, closed = raw_exchange(limited, request)
        assert answer.startswith(b"HTTP/1.1 400") or answer.startswith(b"HTTP/1.1 413"), answer
        assert answer.count(b"HTTP/1.1") == 1 and closed  # the smuggled one is never answered


def test_a_stalled_body_ends_with_408(limited):
    request = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"Content-Length: 500\r\n\r\n" + b'{"prompt": "'
    )
    started = time.monotonic()
    answer, _ = raw_exchange(limited, request, wait_s=8)
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert time.monotonic() - started < 6
    assert httpx.get(f"{limited.url}/health").status_code == 200


def test_slow_headers_get_408_and_the_connection_closed(limited):
    """Slowloris: headers that trickle in (or never come) past --header-timeout (1 s here),
    on a new connection or on a kept-alive one's next request."""
    started = time.monotonic()
    answer, closed = raw_exchange(limited, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n", 6)
    assert answer.startswith(b"HTTP/1.1 408") and closed, answer
    assert time.monotonic() - started < 4
    assert raw_exchange(limited, b"", 6) == (answer, True)  # a silent connection too
    body = b'{"prompt": "hi", "max_tokens": 1}'
    whole = (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )
    with socket.create_connection(("127.0.0.1", limited.port), timeout=6) as sock:
        sock.sendall(whole)  # served; the connection stays open for the next request
        first = b""
        while b"\r\n\r\n" not in first:
            first += sock.recv(65536)
        head, body_part = first.split(b"\r\n\r\n", 1)
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(next(x for x in head.split(b"\r\n") if x.lower().startswith(b"content-length"))
                     .split(b":")[1])  # fmt: skip
        while len(body_part) < length:
            body_part += sock.recv(65536)
        assert len(body_part) == length  # the whole first response, nothing more
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHo")  # the next one stalls
        rest = b""
        while chunk := sock.recv(65536):
            rest += chunk
        assert rest.startswith(b"HTTP/1.1 408"), rest
    assert httpx.get(f"{limited.url}/health").status_code == 200


def test_the_body_timeout_ends_with_the_body_not_with_the_response(limited):
    """Once the body is read, the server waits for a disconnect as long as the response runs:
    a stream that outlives the body timeout (0.5 s here) completes."""
    url = f"{limited.url}/v1/completions"
    body = {"prompt": "hi", "max_tokens": 480, "ignore_eos": True, "n": 8, "stream": True}
    started, events = time.monotonic(), []
    with httpx.stream("POST", url, json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                time.sleep(0.001 if len(events) % 50 else 0.3)  # a slow reader, too
    assert time.monotonic() - started > 1, "the stream must outlive the body timeout"
    assert events[-1] == "[DONE]"
    ends = [c for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
    assert len(ends) == 8 and all(c["finish_reason"] == "length" for c in ends)


def test_tenant_names_are_bounded_in_metrics_and_usage(limited):
    url = f"{limited.url}/v1/completions"
    before = len(httpx.get(f"{limited.url}/metrics").text)
    for i in range(10):
        body = {"prompt": "hi", "max_tokens": 1, "user": f"{i}" + "u" * 20_000}
        assert httpx.post(url, json=body, timeout=30).status_code == 200
    metrics = httpx.get(f"{limited.url}/metrics").text
    assert "u" * 100 not in metrics and 'tenant="other"' in metrics
    assert len(metrics) - before < 8_000  # one folded series, not ten 20 KB labels
    usage = httpx.get(f"{limited.url}/v1/usage").json()
    assert all(len(t["tenant"]) <= 64 for t in usage["tenants"])


def test_prompts_times_n_is_bounded_per_request(limited):
    url = f"{limited.url}/v1/completions"
    r = httpx.post(url, json={"prompt": ["a", "b", "c"], "n": 3, "max_tokens": 1}, timeout=30)
    assert_error(r, 400, "prompt")
    r = httpx.post(url, json={"prompt": ["a", "b"], "n": 4, "max_tokens": 1}, timeout=30)
    assert r.status_code == 200 and len(r.json()["choices"]) == 8
