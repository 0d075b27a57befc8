"""Usage accounting on a real server: tenants from API key names or `user`, energy labelled
modeled, /v1/usage and /metrics, and nothing lost over a restart."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import openai

from tests.e2e.conftest import Server


def tenants(url: str, key: str) -> dict[str, dict]:
    body = httpx.get(f"{url}/v1/usage", headers={"Authorization": f"Bearer {key}"}).json()
    return {t["tenant"]: t for t in body["tenants"]}


def test_usage_by_tenant_survives_restart(tiny_model_dir, tmp_path):
    db = str(tmp_path / "usage.sqlite")
    args = (
        "--api-key",
        "alice=key-a",
        "--api-key",
        "key-b",
        "--admin-key",
        "ops=key-admin",
        "--usage-db",
        db,
        "--power-interval",
        "0.2",
    )
    model = str(tiny_model_dir("llama"))
    server = Server(model, *args)
    try:
        a = openai.OpenAI(base_url=f"{server.url}/v1", api_key="key-a", max_retries=0)
        b = openai.OpenAI(base_url=f"{server.url}/v1", api_key="key-b", max_retries=0)
        served = {"alice": 0, "carol": 0, "anonymous": 0}
        r = a.completions.create(
            model="tiny",
            prompt="The quick brown fox",
            max_tokens=5,
            user="ignored: the key has a name",
        )
        served["alice"] += r.usage.total_tokens
        r = b.chat.completions.create(
            model="tiny",
            max_tokens=4,
            user="carol",
            messages=[{"role": "user", "content": "Hello world"}],
        )
        served["carol"] += r.usage.total_tokens
        stream = b.completions.create(
            model="tiny",
            prompt="Paged attention",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        served["anonymous"] += [c for c in stream][-1].usage.total_tokens
        time.sleep(0.6)  # a few power samples
        seen = tenants(server.url, "key-admin")  # an admin key sees every tenant
        assert set(tenants(server.url, "key-a")) == {"alice"}  # a tenant sees only itself
        assert tenants(server.url, "key-b") == {}  # a key without a name has no tenant rows
        own = httpx.get(f"{server.url}/v1/usage", headers={"Authorization": "Bearer key-a"})
        assert own.json()["instances"] == [] and own.json()["total"]["tokens"] == served["alice"]
        for name, tokens in served.items():
            assert seen[name]["prompt_tokens"] + seen[name]["completion_tokens"] == tokens
            assert seen[name]["requests"] == 1
            assert seen[name]["energy_source"] == "modeled"
        assert sum(t["energy_joules"] for t in seen.values()) > 0
        metrics = httpx.get(f"{server.url}/metrics").text  # no tenant names unless opted in
        assert "tokenmill:energy_joules_total{" in metrics and 'tenant="all"' in metrics
        assert not any(f'tenant="{name}"' in metrics for name in served)
        assert (
            "tokenmill:cost_per_million_tokens{" in metrics and 'energy_source="modeled"' in metrics
        )
    finally:
        assert server.stop() == 0
    final = {
        k: (v["prompt_tokens"], v["completion_tokens"], v["requests"]) for k, v in seen.items()
    }

    again = Server(model, *args, "--metrics-tenants")
    try:
        assert 'tenant="alice"' in httpx.get(f"{again.url}/metrics").text
        after = tenants(again.url, "key-admin")
        for name in served:
            assert (
                after[name]["prompt_tokens"],
                after[name]["completion_tokens"],
                after[name]["requests"],
            ) == final[name]
            assert after[name]["energy_joules"] >= seen[name]["energy_joules"]
    finally:
        assert again.stop() == 0
    out = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "tco", "report", "--db", db, "--json"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    report = json.loads(out)
    assert {t["tenant"] for t in report["tenants"]} >= set(served)
    assert report["total"]["cost_usd"] > 0
