"""Mamba-2 served by the engine (issue #22): a tiny random-weight Mamba2ForCausalLM made with
transformers gives its greedy tokens for batches of different prompt lengths, with the prompt
whole or in chunks mixed with decodes, through a preemption (the state recomputed in a fresh
slot) and with n > 1; prompt logprobs match transformers' logits; the state slots and blocks
all come back."""

from __future__ import annotations

import shutil

import pytest
import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.sampling_params import SamplingParams


def make_mamba2(folder, tokenizer_from):
    import transformers

    config = transformers.Mamba2Config(
        vocab_size=384, hidden_size=64, num_hidden_layers=2, state_size=16, expand=2,
        head_dim=16, num_heads=8, n_groups=2, conv_kernel=4, chunk_size=8,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return save_random(transformers.Mamba2ForCausalLM(config), folder, tokenizer_from, seed=0)


def save_random(model, folder, tokenizer_from, seed: int):
    """Random weights large enough that every term counts (the default init leaves dt tiny and
    D at one), saved with the tiny Llama's tokenizer."""
    torch.manual_seed(seed)
    model = model.float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name and "A_log" not in name:
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, folder / name)
    return folder


@pytest.fixture(scope="module")
def mamba(tiny_model_dir, tmp_path_factory):
    import transformers

    folder = make_mamba2(tmp_path_factory.mktemp("mamba2"), tiny_model_dir("llama"))
    return str(folder), transformers.Mamba2ForCausalLM.from_pretrained(folder).float().eval()


PROMPTS = [[(7 * i + 3 + k) % 380 + 3 for i in range(5 + 9 * k)] for k in range(4)]


def hf_greedy(hf, prompt, n):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


def engine(model, **options) -> LLMEngine:
    base = dict(dtype="float32", max_model_len=256, max_num_seqs=4)
    return LLMEngine(EngineConfig.from_kwargs(model=model, **{**base, **options}))


def drain(e: LLMEngine, preempt_at: int | None = None) -> dict:
    out, steps = {}, 0
    while e.has_unfinished():
        for o in e.step():
            if o.finished:
                out[o.request_id] = [c.token_ids for c in o.outputs]
        steps += 1
        if steps == preempt_at:  # push the newest running request out, as a full pool would
            victim = e.scheduler.running.pop()
            e.scheduler._preempt(victim)
    assert e.kv.pool.num_used_blocks == 0 and not e.kv.state_slots
    return out


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 7])
def test_greedy_batches_equal_transformers(mamba, max_num_batched_tokens):
    model, hf = mamba
    expected = [hf_greedy(hf, p, 10) for p in PROMPTS]
    e = engine(model, max_num_batched_tokens=max_num_batched_tokens)
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        e.add_request(f"r{i}", p, params)
    out = drain(e)
    assert [out[f"r{i}"][0] for i in range(len(PROMPTS))] == expected
    assert not e.core.info.enable_prefix_caching  # off for state-space models, said in the log


def test_a_preempted_request_recomputes_its_state(mamba):
    model, hf = mamba
    expected = [hf_greedy(hf, p, 12) for p in PROMPTS]
    e = engine(model, max_num_batched_tokens=16)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        e.add_request(f"r{i}", p, params)
    out = drain(e, preempt_at=6)
    assert e.scheduler.num_preemptions == 1  # it did happen, mid-prompt or mid-answer
    assert [out[f"r{i}"][0] for i in range(len(PROMPTS))] == expected


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 6])
def test_n_sequences_fork_with_a_copy_of_the_state(mamba, max_num_batched_tokens):
    """n > 1: the parent computes the prompt but its last token, the children fork there with
    a copy of its state, and each computes that token itself: the prompt is computed once."""
    model, hf = mamba
    e = engine(model, max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=5)
    computed = []
    execute = e.executor.execute
    e.executor.execute = lambda out: computed.append(out.num_tokens) or execute(out)
    e.add_request("greedy", PROMPTS[2], SamplingParams(n=2, max_tokens=8, temperature=0.0, ignore_eos=True))  # fmt: skip
    sampled = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=11, ignore_eos=True)
    e.add_request("sampled", PROMPTS[1], sampled)
    out = drain(e)
    assert out["greedy"] == [hf_greedy(hf, PROMPTS[2], 8)] * 2
    # each prompt once, one more token per extra child, then 8 tokens each (the first sampled
    # at the prompt's end)
    assert sum(computed) == len(PROMPTS[2]) + 1 + len(PROMPTS[1]) + 2 + 5 * 7
    # two state slots: one child finds none free and computes its prompt alone, the same way
    again = engine(model, max_num_seqs=2)
    again.add_request("sampled", PROMPTS[1], sampled)
    assert drain(again)["sampled"] == out["sampled"]  # seeded: the same three again
    assert len({tuple(t) for t in out["sampled"]}) > 1


def test_prompt_logprobs_match_transformers_logits(mamba):
    model, hf = mamba
    prompt = PROMPTS[3]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    e = engine(model, max_num_batched_tokens=9)  # the prompt in chunks
    e.add_request("p", prompt, SamplingParams(max_tokens=1, prompt_logprobs=0))
    while e.has_unfinished():
        for o in e.step():
            if o.finished:
                entries = o.prompt_logprobs
    assert entries[0] is None
    for pos in range(1, len(prompt)):
        (lp,) = entries[pos].values()
        assert abs(lp - logits[pos - 1, prompt[pos]].item()) < 1e-4, pos


def test_state_slots_bound_the_requests_in_flight(mamba):
    model, _ = mamba
    # two requests' states fit: the third waits for a slot instead of failing
    spec = 2 * ((64 * 2 + 2 * 2 * 16) * 3 * 4 + 8 * 16 * 16 * 4)  # 2 layers x (conv + ssm)
    e = engine(model, kv_cache_memory=2 * spec + spec // 2)
    assert e.kv.num_state_slots == 2
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(PROMPTS[:3]):
        e.add_request(f"r{i}", p, params)
    e.step()
    assert e.scheduler.num_running == 2 and e.scheduler.num_waiting == 1
    assert len(drain(e)) == 3


# ---- a hybrid: Bamba (attention layers among Mamba-2 mixers) ---------------------------------
def make_bamba(folder, tokenizer_from):
    import transformers

    config = transformers.BambaConfig(
        vocab_size=384, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, attn_layer_indices=[1, 3],
        mamba_n_heads=8, mamba_d_head=16, mamba_n_groups=2, mamba_d_state=16, mamba_d_conv=4,
        mamba_chunk_size=8, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
        pad_token_id=0,
    )  # fmt: skip
    return save_random(transformers.BambaForCausalLM(config), folder, tokenizer_from, seed=1)


@pytest.fixture(scope="module")
def bamba(tiny_model_dir, tmp_path_factory):
    import transformers

    folder = make_bamba(tmp_path_factory.mktemp("bamba"), tiny_model_dir("llama"))
    return str(folder), transformers.BambaForCausalLM.from_pretrained(folder).float().eval()


@pytest.mark.parametrize("max_num_batched_tokens", [2048, 7])
def test_a_hybrid_gives_the_greedy_tokens_of_transformers(bamba, max_num_batched_tokens):
    model, hf = bamba
    expected = [hf_greedy(hf, p, 10) for p in PROMPTS]
    e = engine(model, max_num_batched_tokens=max_num_batched_tokens, block_size=4)
    assert e.kv.num_state_slots == 4 and e.kv.pool.num_blocks > 0  # states and K/V blocks
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    for i, p in enumerate(PROMPTS):
        e.add_request(f"r{i}", p, params)
    out = drain(e, preempt_at=5 if max_num_batched_tokens == 7 else None)
    assert [out[f"r{i}"][0] for i in range(len(PROMPTS))] == expected


def test_a_hybrid_s_prompt_logprobs_match_transformers(bamba):
    model, hf = bamba
    prompt = PROMPTS[3]
    with torch.no_grad():
        logits = hf(torch.tensor([prompt])).logits[0].float().log_softmax(-1)
    e = engine(model, max_num_batched_tokens=9, block_size=4)
    e.add_request("p", prompt, SamplingParams(max_tokens=1, prompt_logprobs=0))
    while e.has_unfinished():
        for o in e.step():
            if o.finished:
                entries = o.prompt_logprobs
    for pos in range(1, len(prompt)):
        (lp,) = entries[pos].values()
        assert abs(lp - logits[pos - 1, prompt[pos]].item()) < 1e-4, pos


@pytest.mark.parametrize("which", ["mamba", "bamba"])
def test_scoring_for_perplexity_matches_transformers(request, which):
    """`tokenmill eval perplexity` scores through runner.score: its own scratch state."""
    model, hf = request.getfixturevalue(which)
    prompt = PROMPTS[3]
    with torch.no_grad():
        expected = hf(torch.tensor([prompt])).logits[0].float()
    e = engine(model, block_size=4)
    got = e.executor.worker.runner.score(prompt)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_structured_outputs_and_penalties_on_a_state_space_model(mamba):
    """The sampler and the grammar engine are the model's neighbours, not its parts: a choice
    constraint, seeded sampling with penalties and stop tokens work as on a transformer."""
    from tokenmill.sampling_params import StructuredOutputsParams

    model, _ = mamba
    e = engine(model)
    choice = SamplingParams(temperature=1.0, seed=3, max_tokens=20,
                            structured_outputs=StructuredOutputsParams(choice=["yes", "no"]))  # fmt: skip
    e.add_request("c", PROMPTS[1], choice)
    penalized = SamplingParams(temperature=0.8, seed=5, max_tokens=12, ignore_eos=True,
                               presence_penalty=1.0, repetition_penalty=1.3, top_k=20)  # fmt: skip
    e.add_request("p", PROMPTS[2], penalized)
    texts = {}
    while e.has_unfinished():
        for o in e.step():
            if o.finished:
                texts[o.request_id] = (
                    o.outputs[0].text,
                    o.outputs[0].finish_reason,
                    o.outputs[0].token_ids,
                )
    assert texts["c"][0] in ("yes", "no") and texts["c"][1] == "stop"
    assert len(texts["p"][2]) == 12
