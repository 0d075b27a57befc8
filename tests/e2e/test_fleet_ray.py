"""`tokenmill serve --config FLEET.toml --ray-address ADDR`: replicas as Ray actors on a local
Ray cluster (`ray start --head`), routed by the same router. Greedy answers equal the local
path's (the same core loop, in an actor); an actor's process SIGKILLed: its twin keeps
answering, the supervisor starts a new actor."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.e2e.conftest import Server, free_port

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    ray_bin = ray_bin if os.path.exists(ray_bin) else shutil.which("ray")
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    # Ray 2.5x turns token authentication on for a head started where ~/.ray/auth_token exists
    # (an earlier local ray.init writes one), and a client connecting by address then fails
    # unauthenticated: a loopback test cluster runs without it, the server inheriting the mode
    saved = os.environ.get("RAY_AUTH_MODE")
    os.environ["RAY_AUTH_MODE"] = "disabled"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([ray_bin, "start", "--head", f"--port={port}", "--num-cpus=2",
                    "--include-dashboard=false", f"--temp-dir={temp}", "--disable-usage-stats"],
                   check=True, capture_output=True, env=env, timeout=180)  # fmt: skip
    yield f"127.0.0.1:{port}"
    subprocess.run([ray_bin, "stop", "--force"], capture_output=True, env=env, timeout=120)
    if saved is None:
        del os.environ["RAY_AUTH_MODE"]
    else:
        os.environ["RAY_AUTH_MODE"] = saved


def test_replicas_on_ray_answer_as_local_ones_and_come_back(tiny_model_dir, tmp_path, ray_cluster):
    model = tiny_model_dir("llama")
    path = tmp_path / "FLEET.toml"
    path.write_text(f'[[instances]]\nname = "chat"\nmodel = "{model}"\nreplicas = 2\n'
                    'slice = ["cores=0", "cores=1"]\n')  # fmt: skip
    local = Server(str(model), "--no-enable-prefix-caching")
    body = {"prompt": [5, 6, 7, 8], "max_tokens": 12, "temperature": 0, "ignore_eos": True}
    try:
        want = httpx.post(f"{local.url}/v1/completions", json=body, timeout=60).json()
    finally:
        assert local.stop() == 0
    fleet = Server(None, "--config", str(path), "--ray-address", ray_cluster,
                   "--no-enable-prefix-caching")  # fmt: skip
    try:
        rows = {r["instance"]: r for r in httpx.get(f"{fleet.url}/v1/health/instances").json()["instances"]}  # fmt: skip
        assert set(rows) == {"chat#0", "chat#1"}
        assert all(r["slice"].startswith("a Ray actor (cpus=1") for r in rows.values())
        for _ in range(2):  # both replicas, in turn
            got = httpx.post(f"{fleet.url}/v1/completions", json={**body, "model": "chat"}, timeout=60).json()  # fmt: skip
            assert got["choices"][0]["text"] == want["choices"][0]["text"]
        text = httpx.get(f"{fleet.url}/metrics").text
        for name in ("chat#0", "chat#1"):
            assert (
                f'vllm:generation_tokens_total{{instance="{name}",model_name="chat"}} 12.0' in text
            )
        os.kill(rows["chat#0"]["pid"], signal.SIGKILL)  # the actor's process (a local node)
        for _ in range(4):  # the twin answers meanwhile
            r = httpx.post(
                f"{fleet.url}/v1/completions", json={**body, "model": "chat"}, timeout=60
            )
            assert r.status_code == 200
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            now = {r["instance"]: r for r in httpx.get(f"{fleet.url}/v1/health/instances").json()["instances"]}  # fmt: skip
            if now["chat#0"]["status"] == "up" and now["chat#0"]["restarts"] == 1:
                break
            time.sleep(0.2)
        else:
            raise AssertionError("chat#0 was not restarted on Ray")
        assert now["chat#0"]["pid"] != rows["chat#0"]["pid"]
    finally:
        assert fleet.stop() == 0
