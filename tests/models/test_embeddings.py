"""Embeddings (pooled final hidden states) against transformers on the same weights: last-token
and mean pooling, chunked prompts, batch and single, identical inputs."""

from __future__ import annotations

import pytest
import torch
import transformers

from tokenmill import LLM

PROMPTS = [[5, 17, 33], list(range(40, 90)), [7] * 21, list(range(100, 300, 3))]


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def hf(model_dir):
    return transformers.AutoModel.from_pretrained(str(model_dir), torch_dtype=torch.float32).eval()


def reference(hf, ids: list[int], pooling: str) -> torch.Tensor:
    with torch.no_grad():
        states = hf(torch.tensor([ids])).last_hidden_state[0].double()
    vector = states[-1] if pooling == "last" else states.mean(0)
    return vector / vector.norm()


@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooled_hidden_states_equal_transformers(model_dir, hf, pooling):
    # a small step budget: the long prompts are computed in several chunks
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory=4 << 20, block_size=4,
              max_num_batched_tokens=16)  # fmt: skip
    batch = llm.embed([{"prompt_token_ids": p} for p in PROMPTS], pooling=pooling, use_tqdm=False)
    for ids, got in zip(PROMPTS, batch):
        got = torch.tensor(got, dtype=torch.float64)
        assert got.shape == (hf.config.hidden_size,)
        assert abs(got.norm().item() - 1.0) < 1e-6
        assert torch.allclose(got, reference(hf, ids, pooling), atol=2e-5), pooling
    for ids, in_batch in zip(PROMPTS, batch):  # alone as in a batch
        (alone,) = llm.embed([{"prompt_token_ids": ids}], pooling=pooling, use_tqdm=False)
        assert torch.allclose(torch.tensor(alone), torch.tensor(in_batch), atol=1e-5)
    # identical inputs, the second served from the prefix cache where pooling allows it
    twice = llm.embed([{"prompt_token_ids": PROMPTS[1]}] * 2, pooling=pooling, use_tqdm=False)
    assert torch.allclose(torch.tensor(twice[0]), torch.tensor(twice[1]), atol=1e-5)
    raw = llm.embed([{"prompt_token_ids": PROMPTS[0]}], pooling, normalize=False, use_tqdm=False)
    assert abs(torch.tensor(raw[0]).norm().item() - 1.0) > 1e-3  # normalization is a choice


def test_an_embedding_request_frees_its_blocks_and_generates_nothing(model_dir):
    llm = LLM(str(model_dir), dtype="float32", kv_cache_memory=4 << 20, block_size=4)
    from tokenmill import SamplingParams

    out = llm.generate([{"prompt_token_ids": PROMPTS[1]}],
                       SamplingParams(max_tokens=1, temperature=0.0, pooling="mean"),
                       use_tqdm=False)[0]  # fmt: skip
    assert out.embedding is not None and out.outputs[0].token_ids == []
    assert llm.engine.kv.pool.num_used_blocks == 0
    with pytest.raises(ValueError, match="pooling"):
        SamplingParams(max_tokens=1, pooling="max")
    with pytest.raises(ValueError, match="max_tokens 1"):
        SamplingParams(max_tokens=5, pooling="last")
