"""One request cannot end another's: values that would overflow the kernels are refused where
they enter (ValueError naming the field), and when a model step still fails, the engine core
finds the request(s) that break it and ends only those; the others continue token-equal to a run
without them (greedy and seeded alike)."""

from __future__ import annotations

import math

import pytest

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.sampling_params import SamplingParams

KW = dict(dtype="float32", kv_cache_memory=1 << 22, block_size=4, max_num_batched_tokens=64)
POISON = 77  # a prompt token that makes the (patched) model step raise


@pytest.mark.parametrize(
    "field,value",
    [
        ("seed", 2**64),
        ("seed", -(2**63) - 1),
        ("seed", 1.5),
        ("top_k", 10**20),
        ("temperature", math.inf),
        ("temperature", math.nan),
        ("top_p", math.nan),
        ("presence_penalty", math.inf),
        ("repetition_penalty", math.nan),
        ("min_p", math.inf),
        ("max_tokens", 2**70),
        ("n", 10**9),
        ("stop_token_ids", [2**70]),
        ("logprobs", True),
    ],
)
def test_values_that_overflow_the_kernels_are_refused_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_top_k_beyond_the_vocabulary_is_refused_by_the_front(tiny_model_dir):
    engine = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_model_dir("llama")), **KW))
    vocab = engine.core.info.vocab_size
    with pytest.raises(ValueError, match="top_k"):
        engine.add_request("a", [1, 2, 3], SamplingParams(top_k=vocab + 1))
    done = run(engine, [("b", [1, 2, 3], SamplingParams(top_k=vocab, max_tokens=2, seed=1))])
    assert [len(ids) for ids, _ in done["b"]] == [2]  # the whole vocabulary is a valid top_k


def poison_model(engine: LLMEngine) -> None:
    """The model raises whenever a poisoned token is in the step's input (a stand-in for any
    per-request failure inside a step: a kernel limit, a bad value that slipped through)."""
    model = engine.runner.model
    forward = model.forward

    def failing(input_ids, *args, **kwargs):
        if bool((input_ids == POISON).any()):
            raise RuntimeError("poisoned input")
        return forward(input_ids, *args, **kwargs)

    model.forward = failing


HONEST = [
    SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True),
    SamplingParams(max_tokens=12, temperature=1.0, seed=5, ignore_eos=True),
    SamplingParams(max_tokens=10, temperature=0.7, top_k=20, seed=9, ignore_eos=True, n=2),
]


def run(engine: LLMEngine, requests: list[tuple[str, list[int], SamplingParams]]) -> dict:
    for rid, ids, params in requests:
        engine.add_request(rid, ids, params)
    done = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [(c.token_ids, c.finish_reason) for c in out.outputs]
    return done


@pytest.mark.parametrize("where", ["prompt", "late"])
def test_a_failing_request_ends_alone_and_the_others_are_untouched(tiny_model_dir, where):
    config = EngineConfig.from_kwargs(model=str(tiny_model_dir("llama")), **KW)
    honest = [(f"h{i}", [3 + i, 9, 14, 2 * i + 1, 30], p) for i, p in enumerate(HONEST)]
    alone = run(LLMEngine(config), honest)
    engine = LLMEngine(config)
    poison_model(engine)
    # the poison arrives in the first prefill, or joins later, mid-decode of the others
    hostile = ("bad", [5, POISON, 6], SamplingParams(max_tokens=8, ignore_eos=True))
    first = [hostile, *honest] if where == "prompt" else honest
    for rid, ids, params in first:
        engine.add_request(rid, ids, params)
    done: dict = {}
    steps = 0
    while engine.has_unfinished():
        steps += 1
        if where == "late" and steps == 3:
            engine.add_request(*hostile)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = [(c.token_ids, c.finish_reason) for c in out.outputs]
    assert done.pop("bad") == [([], "error")]
    assert done == alone
    assert engine.kv.pool.num_used_blocks == 0


def test_a_step_that_fails_for_everyone_ends_everyone(tiny_model_dir):
    engine = LLMEngine(EngineConfig.from_kwargs(model=str(tiny_model_dir("llama")), **KW))
    model = engine.runner.model

    def broken(*args, **kwargs):
        raise RuntimeError("the device is gone")

    model.forward = broken
    done = run(engine, [(f"r{i}", [1, 2, 3 + i], HONEST[0]) for i in range(3)])
    assert all(v == [([], "error")] for v in done.values()) and len(done) == 3
    assert engine.kv.pool.num_used_blocks == 0
