"""The bundled SmolLM2-135M-Instruct (GGUF, Q4_1) against `transformers` on the same file."""

from __future__ import annotations

import pytest
import torch
import transformers

from tokenmill import LLM, SamplingParams
from tokenmill.models.gguf import DEFAULT_FILE, resolve_default_model
from tokenmill.quant.eval import default_text, perplexity

PATH = resolve_default_model()
PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=2048, kv_cache_memory=256 << 20)


@pytest.fixture(scope="module")
def ref():
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(PATH.parent), gguf_file=DEFAULT_FILE, dtype=torch.float32
    ).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(PATH.parent), gguf_file=DEFAULT_FILE)
    return model, tok


def test_logits_and_greedy_equal_transformers(llm, ref):
    model, tok = ref
    ids = tok("The capital of France is")["input_ids"]
    assert llm.get_tokenizer().encode("The capital of France is") == ids
    out = llm.generate(
        [{"prompt_token_ids": ids}],
        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=0),
        use_tqdm=False,
    )[0]
    full = ids + out.outputs[0].token_ids
    with torch.no_grad():
        lp = model(torch.tensor([full])).logits[0].log_softmax(-1)
    for pos in range(1, len(ids)):
        assert abs(out.prompt_logprobs[pos][ids[pos]] - lp[pos - 1, ids[pos]].item()) < 2e-4
    for i, (t, e) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        assert abs(e[t] - lp[len(ids) - 1 + i, t].item()) < 2e-4
    assert "Paris" in llm.get_tokenizer().decode(out.outputs[0].token_ids)
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        ours = llm.generate([{"prompt_token_ids": ids}], GREEDY, use_tqdm=False)[0]
        theirs = model.generate(
            torch.tensor([ids]),
            max_new_tokens=16,
            min_new_tokens=16,
            do_sample=False,
            pad_token_id=2,
        )[0, len(ids) :].tolist()
        assert ours.outputs[0].token_ids == theirs, prompt


def test_chat_template_and_greedy_chat(llm, ref):
    model, tok = ref
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert llm.get_tokenizer().apply_chat_template(msgs) == want
    out = llm.chat(msgs, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)[0]
    ids = tok(want, add_special_tokens=False)["input_ids"]
    theirs = model.generate(
        torch.tensor([ids]), max_new_tokens=12, do_sample=False, pad_token_id=2
    )[0, len(ids) :].tolist()
    assert out.outputs[0].token_ids == [t for t in theirs][: len(out.outputs[0].token_ids)]
    assert "Paris" in out.outputs[0].text


def test_tokenizer_roundtrip_multilingual(llm, ref):
    _, tok = ref
    ours = llm.get_tokenizer()
    text = (
        "Hello, world! Grüße aus Köln. Ça va? ¿Dónde está la biblioteca? Привет, мир. "
        "日本語のテキスト。 Ελληνικά. العربية <|im_start|>user\n  tabs\tand  spaces"
    )
    assert ours.encode(text) == tok(text)["input_ids"]
    assert ours.decode(ours.encode(text), skip_special_tokens=False) == text
    # smollm pre-tokenizer: digits one by one (as llama.cpp and the original tokenizer.json)
    digits = ours.encode("12345")
    assert len(digits) == 5 and ours.decode(digits) == "12345"


def test_perplexity_matches_transformers(llm, ref):
    model, _ = ref
    ids = llm.get_tokenizer().encode(default_text())[:1024]
    ours = perplexity(llm, ids, window=512)
    nll = 0.0
    with torch.no_grad():
        for start in range(0, 1024, 512):
            chunk = torch.tensor([ids[start : start + 512]])
            nll += model(chunk, labels=chunk).loss.item() * (chunk.shape[1] - 1)
    theirs = float(torch.exp(torch.tensor(nll / ours.num_tokens)))
    assert ours.num_tokens == 1022
    assert abs(ours.perplexity - theirs) / theirs < 1e-3
