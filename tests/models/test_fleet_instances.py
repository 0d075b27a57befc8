"""A fleet's instances (tokenmill/fleet/instances.py): FLEET.toml planned on this machine, each
replica an engine core in its own process bound to its cores, all serving at once; a layout
that does not fit is refused before anything starts."""

from __future__ import annotations

import asyncio
import os

import pytest

from tokenmill.fleet.config import parse_fleet
from tokenmill.fleet.instances import bind_fleet, start, stop
from tokenmill.partition.profiles import cpu_topology
from tokenmill.sampling_params import SamplingParams

SMALL = {"dtype": "float32", "kv_cache_memory": 1 << 20, "max_model_len": 64, "block_size": 4}


def test_two_instances_on_their_own_cores_serve_at_once(tiny_model_dir):
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        pytest.skip("needs two cores")
    model = str(tiny_model_dir("llama"))
    fleet = parse_fleet({"instances": [
        {"name": "a", "model": model, "slice": f"cores={cores[0]}", **SMALL},
        {"name": "b", "model": model, "slice": f"cores={cores[1]}", "num_threads": 1, **SMALL},
    ]})  # fmt: skip
    instances = bind_fleet(fleet, cpu_topology())
    assert [i.name for i in instances] == ["a", "b"]
    assert [i.config.device.num_threads for i in instances] == [1, 1]
    assert instances[0].binding.cores == (cores[0],)
    start(instances)
    try:
        for inst, core in zip(instances, cores):
            assert os.sched_getaffinity(inst.engine.client.process.pid) == {core}

        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)

        async def one(inst, rid):
            async for out in inst.engine.generate(rid, [3, 4, 5], params):
                last = out
            return last.outputs[0].token_ids

        async def both():
            return await asyncio.gather(*(one(i, f"r{k}") for k, i in enumerate(instances)))

        a, b = asyncio.run(both())
        assert len(a) == len(b) == 6 and a == b  # the same model and prompt, greedy
    finally:
        stop(instances)
    assert all(i.engine is None for i in instances)


def test_a_layout_that_does_not_fit_starts_nothing(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    core = min(os.sched_getaffinity(0))
    fleet = parse_fleet({"instances": [
        {"name": "a", "model": model, "slice": f"cores={core}", **SMALL},
        {"name": "b", "model": model, "slice": f"cores={core}", **SMALL},
    ]})  # fmt: skip
    with pytest.raises(ValueError, match="cannot be placed here: b: shares cores with a"):
        bind_fleet(fleet, cpu_topology())


def test_a_killed_instance_fails_its_requests_others_serve_and_it_comes_back(tiny_model_dir):
    """SIGKILL one instance's engine core mid-request: that request fails at once, the other
    instance keeps answering, the router reports the killed one's model unavailable with a
    Retry-After, and the supervisor restarts it, after which it serves again."""
    import signal
    import time

    from tokenmill.engine.core_client import EngineDeadError
    from tokenmill.fleet.router import Router, Unavailable
    from tokenmill.fleet.supervisor import Supervisor

    model = str(tiny_model_dir("llama"))
    roomy = {**SMALL, "max_model_len": 512}
    fleet = parse_fleet({"instances": [
        {"name": "a", "model": model, **roomy}, {"name": "b", "model": model, **roomy},
    ]})  # fmt: skip
    instances = start(bind_fleet(fleet, cpu_topology()))
    a, b = instances
    router = Router({"a": ["a"], "b": ["b"]})
    sup = Supervisor(instances, router, base_delay=0.1)
    long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)
    short = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)

    async def tokens(inst, rid, params):
        async for out in inst.engine.generate(rid, [3, 4, 5], params):
            last = out
        return last.outputs[0].token_ids

    async def kill_mid_request():
        seen = 0
        with pytest.raises(EngineDeadError):
            async for out in a.engine.generate("long", [3, 4, 5], long):
                seen = len(out.outputs[0].token_ids)
                if seen == 1:  # streaming: kill the core while the request is in flight
                    os.kill(a.engine.client.process.pid, signal.SIGKILL)
        assert 0 < seen < long.max_tokens
        return await tokens(b, "other", short)

    try:
        old_pid = a.engine.client.process.pid
        assert len(asyncio.run(kill_mid_request())) == 4  # b kept answering
        sup.check()
        with pytest.raises(Unavailable) as e:
            router.pick("a", [1])
        assert e.value.retry_after > 0
        assert router.pick("b", [1]) == "b"
        deadline = time.monotonic() + 60
        while sup.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
            sup.check()
        assert sup.restarts == 1 and router.pick("a", [1]) == "a"
        assert a.engine.client.process.pid != old_pid
        assert len(asyncio.run(tokens(a, "again", short))) == 4
    finally:
        stop(instances)


def test_a_hung_instance_is_killed_and_restarted(tiny_model_dir):
    """SIGSTOP an instance's core mid-stream (alive, silent): the supervisor kills it after
    hang_after, its request fails, and it is restarted and serves again."""
    import signal
    import time

    from tokenmill.engine.core_client import EngineDeadError
    from tokenmill.fleet.router import Router
    from tokenmill.fleet.supervisor import Supervisor

    model = str(tiny_model_dir("llama"))
    fleet = parse_fleet({"instances": [{"name": "a", "model": model, **SMALL, "max_model_len": 512}]})  # fmt: skip
    instances = start(bind_fleet(fleet, cpu_topology()))
    (a,) = instances
    sup = Supervisor(instances, Router({"a": ["a"]}), base_delay=0.1, hang_after=1.0)
    sup.run(interval=0.1)
    long = SamplingParams(max_tokens=500, temperature=0.0, ignore_eos=True)

    async def stop_mid_request():
        with pytest.raises(EngineDeadError):
            async for out in a.engine.generate("long", [3, 4, 5], long):
                if len(out.outputs[0].token_ids) == 1:
                    os.kill(a.engine.client.process.pid, signal.SIGSTOP)

    try:
        asyncio.run(stop_mid_request())
        deadline = time.monotonic() + 60
        while sup.restarts == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert sup.kills == 1 and sup.restarts == 1

        async def short():
            params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
            async for out in a.engine.generate("again", [3, 4, 5], params):
                last = out
            return last.outputs[0].token_ids

        assert len(asyncio.run(short())) == 4
    finally:
        sup.stop()
        stop(instances)
