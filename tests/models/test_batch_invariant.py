"""--batch-invariant: a request's tokens and logprobs are bit-equal alone and amid load (other
requests of other lengths in the same steps, its prompt cut into other chunks), in float32 and
bfloat16, greedy and seeded; and without the option the same scenario does differ (the test
measures something)."""

from __future__ import annotations

import random

import pytest

from tests.tiny_models import make_tiny_model
from tokenmill import LLM, SamplingParams

TARGET = list(range(10, 70))  # 60 prompt tokens: cut into chunks under load
PARAMS = {
    "greedy": SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=3),
    "seeded": SamplingParams(
        max_tokens=24, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True, logprobs=3
    ),  # fmt: skip
}


@pytest.fixture(scope="module")
def wide_model(tmp_path_factory):
    """Wide enough that GEMMs block and split their sums as real models' do."""
    return make_tiny_model(tmp_path_factory.mktemp("wide"), "llama", seed=3, hidden_size=256,
                           intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
                           vocab_size=2048)  # fmt: skip


def engine(model, dtype: str, invariant: bool) -> LLM:
    return LLM(model=str(model), dtype=dtype, batch_invariant=invariant, cpu_kernels="native",
               max_num_batched_tokens=40, enable_prefix_caching=False, kv_cache_memory=8 << 20,
               block_size=16)  # fmt: skip


def load(seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"prompt_token_ids": [rng.randrange(10, 2000) for _ in range(rng.randrange(3, 90))]}
        for _ in range(7)
    ]


def run(llm: LLM, params: SamplingParams, others: list[dict], at: int):
    prompts = others[:at] + [{"prompt_token_ids": TARGET}] + others[at:]
    out = llm.generate(prompts, params, use_tqdm=False)[at].outputs[0]
    return out.token_ids, [dict(sorted(e.items())) for e in out.logprobs]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tokens_and_logprobs_equal_alone_and_amid_load(wide_model, dtype):
    llm = engine(wide_model, dtype, invariant=True)
    for name, params in PARAMS.items():
        alone = run(llm, params, [], 0)
        for seed, at in ((1, 0), (2, 3), (3, 7)):
            amid = run(llm, params, load(seed), at)
            assert amid[0] == alone[0], (name, seed)
            assert amid[1] == alone[1], (name, seed)  # bit-equal, not close


def test_without_it_the_same_scenario_differs(wide_model):
    """The control: the default kernels give logprobs that move with the batch, so the test
    above checks something real."""
    llm = engine(wide_model, "float32", invariant=False)
    alone = run(llm, PARAMS["greedy"], [], 0)
    amid = [run(llm, PARAMS["greedy"], load(seed), at) for seed, at in ((1, 0), (2, 3), (3, 7))]
    assert any(a[1] != alone[1] for a in amid)


def test_batch_invariant_refuses_what_it_cannot_make_invariant(wide_model):
    with pytest.raises(ValueError, match="native CPU kernels"):
        LLM(model=str(wide_model), dtype="float32", batch_invariant=True, cpu_kernels="torch",
            kv_cache_memory=8 << 20)  # fmt: skip
    with pytest.raises(ValueError, match="compile"):
        LLM(model=str(wide_model), batch_invariant=True, compile=True)
