"""`tokenmill serve --config FLEET.toml`: three instances of two models behind one endpoint,
on this machine's CPU cores. Routing by name, `/v1/models`, streaming from each model with the
official client, per-instance health, metrics and usage; a replica SIGKILLed mid-stream: the
other replica of its model keeps answering it; the only instance of a model SIGKILLed: that
model answers 503 + Retry-After while the other serves, then it comes back."""

from __future__ import annotations

import os
import signal
import time

import httpx
import openai
import pytest

from tests.e2e.conftest import Server


@pytest.fixture(scope="module")
def fleet(tiny_model_dir, tmp_path_factory):
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    path = tmp_path_factory.mktemp("fleet") / "FLEET.toml"
    path.write_text(f"""
[[instances]]
name = "chat"
model = "{tiny_model_dir("llama")}"
replicas = 2
slice = ["cores={cores[0]}", "cores={cores[1]}"]

[[instances]]
name = "other"
model = "{tiny_model_dir("qwen3")}"
max_model_len = 256
""")
    s = Server(None, "--config", str(path), "--no-enable-prefix-caching")
    yield s
    assert s.stop() == 0


def health(fleet) -> dict[str, dict]:
    rows = httpx.get(f"{fleet.url}/v1/health/instances").json()["instances"]
    return {r["instance"]: r for r in rows}


def stream(client, model: str, max_tokens: int = 8) -> tuple[str, int]:
    chunks = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hello"}], max_tokens=max_tokens,
        stream=True, stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )  # fmt: skip
    text, usage, models = "", None, set()
    for c in chunks:
        models.add(c.model)
        if c.choices:
            text += c.choices[0].delta.content or ""
        if c.usage is not None:
            usage = c.usage.completion_tokens
    assert models == {model}
    return text, usage


def test_every_model_is_listed_routed_by_name_and_streams(fleet):
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="none", max_retries=0)
    listed = {m.id: m for m in client.models.list().data}
    assert set(listed) == {"chat", "other"}
    assert client.models.retrieve("other").max_model_len == 256  # each its own engine
    for model in ("chat", "other"):
        _, tokens = stream(client, model)
        assert tokens == 8
    # the two models are different networks: the same greedy prompt, different tokens
    a = client.completions.create(model="chat", prompt=[5, 6, 7], max_tokens=6, temperature=0)
    b = client.completions.create(model="other", prompt=[5, 6, 7], max_tokens=6, temperature=0)
    assert a.model == "chat" and b.model == "other" and a.choices[0].text != b.choices[0].text
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="x", max_tokens=1)
    assert e.value.body["code"] == "model_not_found" and "'chat', 'other'" in e.value.body["message"]  # fmt: skip
    r = httpx.post(f"{fleet.url}/v1/completions", json={"prompt": "x", "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_instances_are_bound_and_their_series_labelled(fleet):
    rows = health(fleet)
    assert set(rows) == {"chat#0", "chat#1", "other"}
    cores = sorted(os.sched_getaffinity(0))
    for name, core in (("chat#0", cores[0]), ("chat#1", cores[1])):
        assert rows[name]["status"] == "up" and rows[name]["cores"] == [core]
        assert os.sched_getaffinity(rows[name]["pid"]) == {core}  # the core process, pinned
    assert rows["other"]["cores"] == [] and rows["other"]["slice"] == "shared"
    for name, row in rows.items():  # each core process under its own memory cap
        assert row["memory_cap_bytes"] >= 1 << 30  # the default: weights + KV + 1 GiB
        if row["memory_used_bytes"] is not None:  # a cgroup holds it (else RLIMIT_DATA)
            assert 0 < row["memory_used_bytes"] < row["memory_cap_bytes"]
            groups = open(f"/proc/{row['pid']}/cgroup").read()
            assert f"/tokenmill/{name.replace('#', '_')}" in groups
    # the slices' cost shares add up to the machine
    assert sum(r["device_share"] for r in rows.values()) == pytest.approx(1.0)
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="none", max_retries=0)
    for _ in range(4):  # idle replicas take turns: both of chat's serve
        client.completions.create(model="chat", prompt="a b c", max_tokens=2)
    text = httpx.get(f"{fleet.url}/metrics").text
    for name in ("chat#0", "chat#1"):
        assert f'vllm:generation_tokens_total{{instance="{name}",model_name="chat"}}' in text
    assert 'tokenmill:instance_up{instance="other",model_name="other"} 1.0' in text
    assert text.count("# TYPE vllm:generation_tokens_total counter") == 1  # one family, merged
    usage = httpx.get(f"{fleet.url}/v1/usage").json()
    by = {i["instance"]: i for i in usage["instances"]}
    assert by["chat#0"]["device_share"] == pytest.approx(rows["chat#0"]["device_share"])
    assert by["chat#0"]["completion_tokens"] + by["chat#1"]["completion_tokens"] >= 8


def wait_for(predicate, timeout: float = 90.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_killed_replica_its_twin_serves_a_killed_model_503s_then_returns(fleet):
    client = openai.OpenAI(base_url=f"{fleet.url}/v1", api_key="none", max_retries=0)
    rows = health(fleet)
    # 1. chat#0 killed in the middle of a stream: that stream ends with an error, chat goes on
    #    (chat#1), other is untouched
    long = client.completions.create(model="chat", prompt="x y", max_tokens=400, stream=True,
                                     extra_body={"ignore_eos": True})  # fmt: skip
    first = next(iter(long))
    now = health(fleet)
    victim = next(n for n in ("chat#0", "chat#1") if now[n]["requests_in_flight"])
    os.kill(now[victim]["pid"], signal.SIGKILL)
    with pytest.raises(Exception):  # noqa: B017,PT011 - the stream ends with an error event
        for _ in long:
            pass
    assert first.choices
    for _ in range(3):
        assert stream(client, "chat")[1] == 8
    assert stream(client, "other")[1] == 8
    # 2. other's only instance killed: other answers 503 + Retry-After, chat keeps serving
    os.kill(rows["other"]["pid"], signal.SIGKILL)
    refused = []

    def refused_now() -> bool:
        r = httpx.post(f"{fleet.url}/v1/completions",
                       json={"model": "other", "prompt": "x", "max_tokens": 2})  # fmt: skip
        if r.status_code == 503:
            refused.append(r)
        return bool(refused) or r.status_code != 200

    wait_for(refused_now, 30, "other to answer 503")
    r = refused[0]
    assert r.json()["error"]["type"] == "service_unavailable"
    assert int(r.headers["retry-after"]) >= 1
    assert stream(client, "chat")[1] == 8
    assert httpx.get(f"{fleet.url}/v1/health/ready").status_code == 200  # the endpoint serves

    # 3. the supervisor brings both back; other serves again
    def back() -> bool:
        now = health(fleet)
        return all(now[n]["status"] == "up" and now[n]["restarts"] == 1 for n in (victim, "other"))

    wait_for(back, 90, f"{victim} and other to be restarted")
    assert stream(client, "other")[1] == 8
    after = health(fleet)
    assert after["other"]["pid"] != rows["other"]["pid"] and after["other"]["restarts"] == 1
    text = httpx.get(f"{fleet.url}/metrics").text
    assert 'tokenmill:instance_restarts{instance="other",model_name="other"} 1.0' in text
