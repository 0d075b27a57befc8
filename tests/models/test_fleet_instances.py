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
