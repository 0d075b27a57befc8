"""The KV tiers through the server: a restarted `tokenmill serve --kv-disk-dir` answers a
returning conversation from the disk its predecessor wrote at shutdown, and a second server on
a directory in use is refused at start, naming the directory."""

from __future__ import annotations

import subprocess
import sys

import httpx

from tests.e2e.conftest import Server

PROMPT = " ".join(f"word{i}" for i in range(60))  # many 4-token blocks


def complete(s: Server) -> dict:
    body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def test_a_restarted_server_finds_its_prefixes_on_disk(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("llama"))
    tiers = ("--kv-host-memory", str(1 << 20), "--kv-disk-dir", str(tmp_path),
             "--kv-disk-memory", str(64 << 20))  # fmt: skip
    first = Server(model, *tiers)
    try:
        before = complete(first)
        # a second server on the same directory: refused at start, naming it
        other = subprocess.run(
            [sys.executable, "-m", "tokenmill.cli", "serve", "--model", model, "--port", "0",
             "--dtype", "float32", "--kv-cache-memory", str(8 << 20), "--no-usage", *tiers],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert other.returncode != 0
        assert "in use by another tokenmill server" in other.stdout + other.stderr
    finally:
        assert first.stop() == 0
    assert list(tmp_path.glob("*/*.kvb"))  # written down at shutdown
    second = Server(model, *tiers)
    try:
        after = complete(second)
        assert after["choices"][0]["text"] == before["choices"][0]["text"]
        blocks = (
            after["usage"]["prompt_tokens"] - 1
        ) // 4  # the prompt's full blocks but one token
        moved = second.metric('tokenmill:kv_tier_blocks_out_total{model_name="tiny",tier="disk"}')
        assert moved == blocks
    finally:
        assert second.stop() == 0
