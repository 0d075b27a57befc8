"""The engine core in its own process: killing it mid-stream turns readiness to 503 at once,
answers every request in flight with an error (never a hang), and the server exits 1 for its
orchestrator (README). Disconnects abort streaming and non-streaming requests in both modes."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import Server
from tests.e2e.test_lifecycle import wait_until

LONG = {"prompt": "Hello world", "max_tokens": 400, "ignore_eos": True, "temperature": 0}


def core_pid(server_pid: int) -> int:
    """The engine core: the server's spawned child that is not multiprocessing's tracker."""
    for task in Path(f"/proc/{server_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
                return int(pid)
    raise AssertionError("no engine core process found")


def aborted(s: Server) -> float:
    for line in httpx.get(f"{s.url}/metrics").text.splitlines():
        if line.startswith("tokenmill:request_success_total{") and '"abort"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def ready_status(url: str) -> int | None:
    try:
        return httpx.get(f"{url}/v1/health/ready", timeout=2).status_code
    except httpx.HTTPError:
        return None  # the server is already gone: not ready either


def test_sigkill_of_the_core_fails_requests_fast_and_exits_1(tiny_model_dir):
    s = Server(str(tiny_model_dir("llama")))
    outcome: dict[str, object] = {}

    def plain() -> None:
        try:
            r = httpx.post(f"{s.url}/v1/completions", json=LONG, timeout=60)
            outcome["plain"] = (r.status_code, r.json()["error"]["type"])
        except httpx.HTTPError as e:
            outcome["plain"] = type(e).__name__

    try:
        waiter = threading.Thread(target=plain)
        with httpx.stream(
            "POST", f"{s.url}/v1/completions", json={**LONG, "stream": True}, timeout=60
        ) as r:
            lines = r.iter_lines()
            first = [next(lines) for _ in range(3)]
            assert all(x.startswith("data: {") or not x for x in first)
            waiter.start()
            time.sleep(0.3)
            killed_at = time.monotonic()
            os.kill(core_pid(s.proc.pid), signal.SIGKILL)
            rest = list(lines)  # ends: an error event and [DONE], or a closed connection
            stream_s = time.monotonic() - killed_at
        assert stream_s < 5, stream_s
        assert any('"error"' in x for x in rest) and rest[-2:] == ["data: [DONE]", ""]
        assert wait_until(lambda: ready_status(s.url) != 200, timeout=5)
        waiter.join(10)
        assert not waiter.is_alive()
        assert outcome["plain"] in ((503, "service_unavailable"), "RemoteProtocolError")
        assert s.proc.wait(30) == 1  # the orchestrator restarts it
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
        s.log.close()


@pytest.mark.parametrize("mode", [(), ("--no-engine-process",)])
def test_disconnects_abort_streaming_and_non_streaming_requests(tiny_model_dir, mode):
    s = Server(str(tiny_model_dir("llama")), *mode)
    try:
        # 4 x 500 tokens: about 0.5 s of the tiny model's decode even offline (4 x 400 took
        # 0.38-0.46 s on the 2-core Xeon), against a client that hangs up after 0.2 s
        body = {**LONG, "n": 4, "max_tokens": 500}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{s.url}/v1/completions", json=body, timeout=0.2)  # then hangs up
        assert wait_until(lambda: aborted(s) == 4, timeout=3)  # all 4 sequences, cut short
        assert s.metric("tokenmill:generation_tokens_total") < 4 * body["max_tokens"]
        assert wait_until(lambda: s.metric("tokenmill:kv_cache_used_blocks") == 0, timeout=3)
        with httpx.stream(
            "POST", f"{s.url}/v1/completions", json={**body, "stream": True}, timeout=30
        ) as r:
            for i, _ in enumerate(r.iter_lines()):
                if i > 3:
                    break  # leaves the stream: the connection closes
        assert wait_until(lambda: aborted(s) == 8, timeout=3)
        assert wait_until(lambda: s.metric("tokenmill:kv_cache_used_blocks") == 0, timeout=3)
        assert s.metric("tokenmill:num_requests_running") == 0
        ok = httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert ok.status_code == 200
    finally:
        assert s.stop() == 0
