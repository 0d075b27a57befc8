"""`compile=True`: the decoder layers run as torch.compile graphs (inductor's C++ kernels on
CPU) and still match `transformers` on the same weights; a quantized model gives what it gives
eagerly; a method with per-call Python state is left eager, and says so."""

from __future__ import annotations

import pytest
import torch

from tests.models.test_engine_vs_hf import (
    GREEDY,
    PROMPTS,
    hf_greedy,
    hf_model,
    record_logits,
)
from tokenmill import LLM, SamplingParams

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def compiled_halves(llm: LLM) -> int:
    """How many decoder-layer halves are torch.compile wrappers."""
    layers = llm.engine.runner.model.model.layers
    return sum(
        hasattr(getattr(layer, half), "_torchdynamo_orig_callable")
        for layer in layers
        for half in ("attention_inputs", "attention_outputs")
    )


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_compiled_layers_match_transformers(tiny_model_dir, kind):
    folder = tiny_model_dir(kind)
    # chunked prefill (8 tokens a step) puts prefill and decode rows in one step
    llm = LLM(
        model=str(folder),
        dtype="float32",
        kv_cache_memory=4 << 20,
        block_size=4,
        max_num_batched_tokens=8,
        compile=True,
    )
    assert compiled_halves(llm) == 2 * len(llm.engine.runner.model.model.layers)
    ref = hf_model(folder)
    tok = llm.get_tokenizer()
    ids = tok.encode(PROMPTS[3])
    seen = record_logits(llm)
    out = llm.generate([{"prompt_token_ids": ids}], GREEDY, use_tqdm=False)[0]
    full = ids + out.outputs[0].token_ids
    with torch.no_grad():
        theirs = ref(torch.tensor([full])).logits[0, len(ids) - 1 : len(full) - 1]
    ours = torch.cat(seen)
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)  # a batch of different lengths
    for prompt, o in zip(PROMPTS, outs):
        assert o.outputs[0].token_ids == hf_greedy(ref, tok.encode(prompt), 12), prompt
    assert llm.engine.kv.pool.num_used_blocks == 0


def test_compiled_w8a8_equals_eager_w8a8(tiny_model_dir):
    folder = tiny_model_dir("llama")
    score = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True, logprobs=3)
    runs = []
    for compile in (False, True):
        llm = LLM(folder, dtype="float32", quantization="w8a8", kv_cache_memory=4 << 20)
        if compile:  # the same quantized weights, compiled after loading
            llm.engine.runner.compile_model()
            assert compiled_halves(llm) > 0
        runs.append(llm.generate(PROMPTS, score, use_tqdm=False))
    for eager, compiled in zip(*runs):
        assert compiled.outputs[0].token_ids == eager.outputs[0].token_ids
        for a, b in zip(eager.outputs[0].logprobs, compiled.outputs[0].logprobs):
            assert a.keys() == b.keys()
            for t in a:
                assert abs(a[t] - b[t]) < 1e-4


def test_per_call_python_state_stays_eager(tiny_model_dir, caplog):
    folder = tiny_model_dir("llama")
    llm = LLM(
        folder,
        dtype="float32",
        quantization="fp8",
        activation_scaling="delayed",
        kv_cache_memory=4 << 20,
        compile=True,
    )
    assert compiled_halves(llm) == 0
    assert "compile skipped" in caplog.text
    out = llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 12 for o in out)


def test_compile_without_a_cpp_compiler_says_what_to_do(tiny_model_dir, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        LLM(
            tiny_model_dir("llama"),
            dtype="float32",
            kv_cache_memory=4 << 20,
            device="cpu",  # the C++ compiler is a CPU requirement (CUDA builds Triton kernels)
            compile=True,
        )
