"""The engine core behind value contracts: a worker in another process, fed the pickled
SchedulerOutputs of a real engine, gives the same tokens and logprobs as the in-process one;
what users get are copies, and streamed outputs are self-consistent."""

from __future__ import annotations

import asyncio
import pickle

import pytest

from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.core_client import InprocCoreClient, ProcessCoreClient
from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.engine import LLMEngine
from tokenmill.executor.multiproc import MultiprocExecutor
from tokenmill.models.loader import load_tokenizer
from tokenmill.sampling_params import SamplingParams

# Small pool and budget: chunked prefill, prefix hits, n > 1 forks and preemption all happen.
OPTIONS = dict(
    dtype="float32",
    kv_cache_memory=40
    * 4
    * 2
    * 2
    * 32
    * 4,  # ~40 blocks of 4 tokens (2 layers, 2 KV heads, dim 32)
    block_size=4,
    max_num_batched_tokens=24,
    max_num_seqs=6,
    max_model_len=160,
)

PARAMS = [
    SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=2),
    SamplingParams(max_tokens=20, temperature=1.0, seed=7, ignore_eos=True, n=3),
    SamplingParams(
        max_tokens=16,
        temperature=0.8,
        top_k=20,
        seed=3,
        ignore_eos=True,
        prompt_logprobs=1,
        presence_penalty=0.5,
    ),
    SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, min_tokens=5),
]


def prompts(vocab: int) -> list[list[int]]:
    shared = [(7 * i + 3) % vocab for i in range(40)]
    return [shared + [(11 * i + k) % vocab for i in range(3 + 5 * k)] for k in range(8)]


def run(engine: LLMEngine) -> dict:
    for i, ids in enumerate(prompts(engine.core.info.vocab_size)):
        engine.add_request(f"r{i}", ids, PARAMS[i % len(PARAMS)])
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [
                    (c.token_ids, c.logprobs, c.finish_reason) for c in out.outputs
                ] + [out.prompt_logprobs]
    return done


def test_a_worker_in_another_process_gives_the_same_tokens(tiny_model_dir):
    model = str(tiny_model_dir("llama"))
    config = EngineConfig.from_kwargs(model=model, **OPTIONS)
    local = LLMEngine(config)
    expected = run(local)
    assert local.scheduler.num_preemptions > 0  # the path with resumed requests is covered
    executor = MultiprocExecutor(config)
    try:
        remote = LLMEngine(config, executor=executor, tokenizer=load_tokenizer(model))
        assert run(remote) == expected
        assert remote.kv.pool.num_used_blocks == 0
    finally:
        executor.shutdown()


def test_outputs_are_values_and_copies(tiny_model_dir):
    engine = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_model_dir("llama")), **OPTIONS))
    engine.add_request(
        "a", [5, 6, 7, 8], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    )
    seen = []
    while engine.has_unfinished():
        result = engine.core.step()
        assert pickle.loads(pickle.dumps(result)) == result  # plain data all the way down
        for out in engine.outputs.process(result.outputs)[0]:
            seen.append(out)
            out.outputs[0].token_ids.append(-1)  # a user scribbling on an output
    lists = [o.outputs[0].token_ids for o in seen]
    assert len({id(x) for x in lists}) == len(lists)  # a fresh list in every output
    assert all(x.count(-1) == 1 and x[-1] == -1 for x in lists)  # only its own scribble
    assert len(lists[-1]) == 6 + 1


def consistent(tokenizer, prompt_ids, params, out) -> None:
    """Shown text is exactly the text of the shown tokens; one logprob entry per token."""
    for c in out.outputs:
        if c.logprobs is not None:
            assert len(c.logprobs) == len(c.token_ids)
        if c.finish_reason is not None:
            continue  # a stop string cut the text inside the last token
        detok = IncrementalDetokenizer(tokenizer, prompt_ids, [], params.skip_special_tokens)
        for t in c.token_ids:
            detok.add(t)
        assert c.text == detok.text


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_streamed_outputs_are_self_consistent_under_load(tiny_model_dir, mode):
    model = str(tiny_model_dir("llama"))
    config = EngineConfig.from_kwargs(model=model, **OPTIONS)
    reference = LLMEngine(config)
    vocab = reference.core.info.vocab_size
    tok = reference.tokenizer
    # stop strings taken from the middle of real outputs, so they do occur, split over tokens
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    texts = [o.outputs[0].text for o in run_text(reference, prompts(vocab)[:4], greedy)]
    stops = [t[len(t) // 2 : len(t) // 2 + 3] for t in texts if len(t) > 8]
    assert stops
    params = [
        SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=stops, logprobs=1),
        SamplingParams(
            max_tokens=40, temperature=1.0, seed=1, ignore_eos=True, n=2, stop=stops[:1]
        ),
    ]
    if mode == "thread":
        engine = AsyncEngine(InprocCoreClient(reference.core), tok)
    else:
        engine = AsyncEngine(ProcessCoreClient(config), load_tokenizer(model))
    engine.start()

    async def one(i: int, ids: list[int]):
        p = params[i % 2]
        finals = None
        async for out in engine.generate(f"s{i}", ids, p):
            consistent(tok, ids, p, out)
            finals = out
        return finals

    async def all_of():
        return await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts(vocab))))

    try:
        results = asyncio.run(all_of())
    finally:
        engine.shutdown()
    stopped = [c for r in results for c in r.outputs if c.finish_reason == "stop"]
    assert stopped and all(c.stop_reason in stops for c in stopped)
    assert all(not any(s in c.text for s in stops) for c in stopped)  # never emitted


def run_text(engine: LLMEngine, batch, params):
    for i, ids in enumerate(batch):
        engine.add_request(f"t{i}", ids, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    return [done[f"t{i}"] for i in range(len(batch))]


def test_a_core_process_bound_to_its_cores(tiny_model_dir):
    """An instance's engine core runs pinned to its slice's cores with its thread count (the
    partition binder's Binding, applied in the child before torch starts) and serves."""
    import os

    from tokenmill.partition.binder import bind
    from tokenmill.partition.planner import Want, plan
    from tokenmill.partition.profiles import cpu_topology
    from tokenmill.partition.slices import Cores

    model = str(tiny_model_dir("llama"))
    core = max(os.sched_getaffinity(0))
    (placement,) = plan([Want("small", Cores((core,)))], cpu_topology()).placements
    (binding,) = bind([placement], [])
    config = EngineConfig.from_kwargs(model=model, **OPTIONS, **binding.engine)
    assert config.device.num_threads == 1
    engine = AsyncEngine(ProcessCoreClient(config, binding), load_tokenizer(model))
    engine.start()
    try:
        assert os.sched_getaffinity(engine.client.process.pid) == {core}

        async def one():
            async for out in engine.generate("b0", [5, 6, 7], PARAMS[0]):
                last = out
            return last

        out = asyncio.run(one())
        assert len(out.outputs[0].token_ids) == PARAMS[0].max_tokens
    finally:
        engine.shutdown()
