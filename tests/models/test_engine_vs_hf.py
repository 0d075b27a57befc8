"""tokenmill against `transformers` on the same tiny random weights, for every architecture:
logits at prefill and decode, greedy continuations (batched, preempted, chunked), logprobs."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from tests.conftest import ALL_ARCHS
from tokenmill import LLM, SamplingParams
from tokenmill.layers import skinny
from tokenmill.layers.linear import Linear
from tokenmill.models.arch import arch_from_hf_config

PROMPTS = [
    "The quick brown fox",
    "Hello world! Bonjour le monde. Hallo Welt.",
    "Paged attention",
    "Continuous batching admits new requests while others decode. The quick brown fox jumps",
]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def hf_model(folder):
    return transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    out = model.generate(
        torch.tensor([ids]),
        max_new_tokens=n,
        do_sample=False,
        min_new_tokens=n,
        pad_token_id=0,
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
    )
    return out[0, len(ids) :].tolist()


def block_bytes(folder, block_size: int) -> int:
    cfg = json.loads((folder / "config.json").read_text())
    arch = arch_from_hf_config(cfg)
    return 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 4 * block_size


def record_logits(llm: LLM) -> list[torch.Tensor]:
    seen: list[torch.Tensor] = []
    model = llm.engine.runner.model
    original = model.compute_logits

    def wrapped(hidden):
        logits = original(hidden)
        seen.append(logits.float().cpu())
        return logits

    model.compute_logits = wrapped
    return seen


def assert_decode_uses_the_skinny_kernels(llm: LLM, dtype: torch.dtype) -> None:
    """Where this CPU has them, the plain linear layers whose outputs fill whole 64-column
    blocks (oneDNN pads the others) and a tied head decode through layers/skinny.py, so the
    comparisons with transformers cover that kernel as well as oneDNN's (prefill)."""
    if not skinny.available(dtype):
        return
    model = llm.engine.runner.model
    layers = [m for m in model.modules() if isinstance(m, Linear) and m.out_features % 64 == 0]
    assert layers and all(m.quant_method.block_cols > 0 for m in layers)
    assert model.lm_head is not None or model.tied_head_block_cols > 0
    # and their halves as one call each (layers/fused_decode.py): the output half always, the
    # input half where q/k/v is readable and there is no q/k norm
    units = model.compile_units()
    assert all(layer.fused_outputs is not None for layer in units)
    for layer in units:
        attn = layer.self_attn
        readable = attn.qkv_proj.quant_method.block_cols > 0 and attn.q_norm is None
        assert (layer.fused_inputs is not None) == readable


@pytest.mark.parametrize("kind", ALL_ARCHS)
def test_logits_and_greedy_match_transformers(tiny_model_dir, kind):
    folder = tiny_model_dir(kind)
    llm = LLM(model=str(folder), dtype="float32", kv_cache_memory=4 << 20, block_size=4)
    assert_decode_uses_the_skinny_kernels(llm, torch.float32)
    ref = hf_model(folder)
    tok = llm.get_tokenizer()
    prompt_ids = tok.encode(PROMPTS[0])
    seen = record_logits(llm)
    out = llm.generate([{"prompt_token_ids": prompt_ids}], GREEDY, use_tqdm=False)[0]
    ours = torch.cat(seen)  # [steps, vocab]: last prompt position, then each decode
    full = prompt_ids + out.outputs[0].token_ids
    with torch.no_grad():
        theirs = ref(torch.tensor([full])).logits[0, len(prompt_ids) - 1 : len(full) - 1]
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4
    # a batch of prompts of different lengths, each equal to transformers' generate
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    for prompt, o in zip(PROMPTS, outs):
        assert o.outputs[0].token_ids == hf_greedy(ref, tok.encode(prompt), 12), prompt
    assert llm.engine.kv.pool.num_used_blocks == 0


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_under_preemption_and_chunked_prefill(tiny_model_dir, kind):
    folder = tiny_model_dir(kind)
    ref = hf_model(folder)
    # 28 blocks of 4 tokens: 4 prompts of ~10-20 tokens + 24 new tokens cannot all fit at once,
    # and a 5-token budget forces every prompt across several steps.
    llm = LLM(
        model=str(folder),
        dtype="float32",
        block_size=4,
        max_model_len=112,
        kv_cache_memory=28 * block_bytes(folder, 4),
        max_num_batched_tokens=5,
        enable_prefix_caching=False,
    )
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    outs = llm.generate(PROMPTS, params, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    tok = llm.get_tokenizer()
    for prompt, o in zip(PROMPTS, outs):
        assert o.outputs[0].token_ids == hf_greedy(ref, tok.encode(prompt), 24), prompt
    assert llm.engine.kv.pool.num_used_blocks == 0


def test_logprobs_equal_log_softmax_of_reference(tiny_model_dir):
    folder = tiny_model_dir("qwen2")
    llm = LLM(model=str(folder), dtype="float32", kv_cache_memory=4 << 20)
    ref = hf_model(folder)
    ids = llm.get_tokenizer().encode(PROMPTS[1])
    params = SamplingParams(
        max_tokens=5, temperature=0.0, ignore_eos=True, logprobs=3, prompt_logprobs=2
    )
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    full = ids + out.outputs[0].token_ids
    with torch.no_grad():
        ref_lp = ref(torch.tensor([full])).logits[0].log_softmax(-1)
    for i, (tid, entry) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        row = ref_lp[len(ids) - 1 + i]
        assert abs(entry[tid] - row[tid].item()) < 1e-4
        top = row.topk(3).indices.tolist()
        assert set(top) <= set(entry) and len(entry) <= 4
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(ids)
    for pos in range(1, len(ids)):
        assert abs(out.prompt_logprobs[pos][ids[pos]] - ref_lp[pos - 1, ids[pos]].item()) < 1e-4
    cum = sum(e[t] for e, t in zip(out.outputs[0].logprobs, out.outputs[0].token_ids))
    assert out.outputs[0].cumulative_logprob == pytest.approx(cum)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_bfloat16_stays_close_to_the_fp32_reference(tiny_model_dir, kind):
    folder = tiny_model_dir(kind)
    llm = LLM(model=str(folder), dtype="bfloat16", kv_cache_memory=4 << 20, block_size=4)
    assert llm.engine.loaded.dtype == torch.bfloat16
    assert_decode_uses_the_skinny_kernels(llm, torch.bfloat16)
    ref = hf_model(folder)
    ids = llm.get_tokenizer().encode(PROMPTS[3])
    seen = record_logits(llm)
    out = llm.generate([{"prompt_token_ids": ids}], GREEDY, use_tqdm=False)[0]
    full = ids + out.outputs[0].token_ids
    with torch.no_grad():
        theirs = ref(torch.tensor([full])).logits[0, len(ids) - 1 : len(full) - 1]
    ours = torch.cat(seen).float()
    # bf16 keeps 8 bits of mantissa: logits of magnitude ~5 agree to a few hundredths
    assert (ours - theirs).abs().max().item() < 0.15
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item() >= 0.9
