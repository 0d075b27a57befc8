"""Structured outputs in the engine (tiny model, sampled): every output is in its language and
ends when the grammar does; the masks touch only their rows; seeds, n > 1, preemption and the
prefix cache keep working; bad constraints are refused naming the field."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch

from tests.models.test_engine_vs_hf import block_bytes
from tokenmill import LLM, SamplingParams
from tokenmill import StructuredOutputsParams as S
from tokenmill.layers.sampler import apply_bitmask

PROMPT = "Continuous batching admits new requests while others decode."

SCHEMAS = [
    {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "ok"],
        "additionalProperties": False,
    },
    {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
            "kind": {"enum": ["x", "y"]},
            "score": {"type": "number", "minimum": -1, "maximum": 1},
        },
        "required": ["tags", "kind"],
        "additionalProperties": False,
    },
    {
        "$defs": {
            "pt": {
                "type": "object",
                "properties": {"x": {"type": "integer", "maximum": 9, "minimum": 0}},
                "required": ["x"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "a": {"$ref": "#/$defs/pt"},
            "b": {"anyOf": [{"$ref": "#/$defs/pt"}, {"type": "null"}]},
        },
        "required": ["a", "b"],
        "additionalProperties": False,
    },  # fmt: skip
]
REGEX = r"[a-z]{2,6}@[a-z]{2,4}\.(com|org)"
CHOICES = ["red", "green", "blue", "dark red"]
GBNF = 'root ::= "(" num ("," num){0,3} ")"\nnum ::= [1-9] [0-9]?'
LARK = 'start: "v" DIGIT "." DIGIT\nDIGIT: /[0-9]/'


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    return LLM(
        model=str(tiny_model_dir("llama")),
        dtype="float32",
        kv_cache_memory=4 << 20,
        block_size=4,
        seed=0,
    )


def sampled(constraint: S, seed: int, **kw) -> SamplingParams:
    kw.setdefault("max_tokens", 160)
    return SamplingParams(temperature=1.0, seed=seed, structured_outputs=constraint, **kw)


def test_every_output_is_in_its_language(llm):
    params, checks = [], []
    for seed in range(6):
        for schema in SCHEMAS:
            params.append(sampled(S(json=schema), seed))
            checks.append(lambda t, s=schema: jsonschema.validate(json.loads(t), s))
        params.append(sampled(S(json_object=True), seed, max_tokens=400))
        checks.append(lambda t: isinstance(json.loads(t), dict))
        params.append(sampled(S(regex=REGEX), seed))
        checks.append(lambda t: re.fullmatch(REGEX, t) or pytest.fail(t))
        params.append(sampled(S(choice=CHOICES), seed))
        checks.append(lambda t: t in CHOICES or pytest.fail(t))
        params.append(sampled(S(grammar=GBNF), seed))
        checks.append(lambda t: re.fullmatch(r"\([1-9][0-9]?(,[1-9][0-9]?){0,3}\)", t) or pytest.fail(t))  # fmt: skip
        params.append(sampled(S(grammar=LARK), seed))
        checks.append(lambda t: re.fullmatch(r"v[0-9]\.[0-9]", t) or pytest.fail(t))
    outs = llm.generate([PROMPT] * len(params), params, use_tqdm=False)
    texts = set()
    for out, check, p in zip(outs, checks, params):
        c = out.outputs[0]
        if p.structured_outputs.json_object and c.finish_reason == "length":
            continue  # any object may be long; the others are bounded by their grammar
        assert c.finish_reason == "stop", (p.structured_outputs, c.text)
        check(c.text)
        texts.add(c.text)
    assert len(texts) > len(params) // 3  # sampled, not one fixed answer


def test_grammar_end_stops_even_with_ignore_eos(llm):
    out = llm.generate(
        [PROMPT], sampled(S(choice=["yes", "no"]), 1, ignore_eos=True), use_tqdm=False
    )[0]
    assert out.outputs[0].text in ("yes", "no") and out.outputs[0].finish_reason == "stop"


def test_seeds_repeat_and_n_children_each_follow_the_grammar(llm):
    schema = SCHEMAS[0]
    a, b = (llm.generate([PROMPT], sampled(S(json=schema), 7), use_tqdm=False)[0] for _ in "ab")
    assert a.outputs[0].text == b.outputs[0].text
    many = llm.generate([PROMPT], sampled(S(json=schema), 3, n=4), use_tqdm=False)[0]
    assert len(many.outputs) == 4
    for c in many.outputs:
        jsonschema.validate(json.loads(c.text), schema)
    assert len({c.text for c in many.outputs}) > 1


def test_masks_touch_only_their_rows(llm):
    plain = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = llm.generate([PROMPT], plain, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(
        [PROMPT, PROMPT, PROMPT],
        [sampled(S(regex=REGEX), 0), plain, sampled(S(json=SCHEMAS[1]), 0)],
        use_tqdm=False,
    )
    assert mixed[1].outputs[0].token_ids == alone
    assert re.fullmatch(REGEX, mixed[0].outputs[0].text)


def test_preemption_and_prefix_cache_keep_the_grammar_state(tiny_model_dir):
    folder = tiny_model_dir("llama")
    prompts = [PROMPT, PROMPT + " Again.", "The quick brown fox", "Paged attention"]
    params = [
        SamplingParams(max_tokens=60, temperature=0.0, structured_outputs=S(json=s))
        for s in (SCHEMAS * 2)[:4]
    ]
    roomy = LLM(model=str(folder), dtype="float32", block_size=4, kv_cache_memory=4 << 20)
    want = [o.outputs[0].text for o in roomy.generate(prompts, params, use_tqdm=False)]
    tight = LLM(
        model=str(folder),
        dtype="float32",
        block_size=4,
        max_model_len=112,
        kv_cache_memory=28 * block_bytes(folder, 4),
        max_num_batched_tokens=5,
    )
    got = [o.outputs[0].text for o in tight.generate(prompts, params, use_tqdm=False)]
    assert tight.engine.scheduler.num_preemptions > 0
    assert got == want
    again = roomy.generate(prompts[:1], params[:1], use_tqdm=False)[0]
    assert again.num_cached_tokens > 0 and again.outputs[0].text == want[0]
    assert roomy.engine.kv.pool.num_used_blocks == 0 and tight.engine.kv.pool.num_used_blocks == 0


def test_compiled_grammars_are_cached_by_spec(llm):
    schema = {"type": "object", "properties": {"k": {"enum": [1, 2]}}, "required": ["k"]}
    for seed in range(3):
        llm.generate([PROMPT], sampled(S(json=schema), seed), use_tqdm=False)
    keys = [k for k in llm.engine.core.structured._cache if k[1] == json.dumps(schema)]
    assert len(keys) == 1


@pytest.mark.parametrize(
    "constraint,message",
    [
        (S(json={"type": "object", "not": {"type": "string"}}, source="response_format"),
         r"response_format: invalid JSON schema: Unimplemented keys: \[\"not\"\]"),
        (S(json={"type": "array", "uniqueItems": True}), "uniqueItems"),
        (S(json="{not json"), "structured_outputs: the JSON schema is not valid JSON"),
        (S(regex="[a-", source="guided_regex"), "guided_regex: invalid regex"),
        (S(grammar="root ::= ::"), "structured_outputs: the grammar"),
    ],
)  # fmt: skip
def test_bad_constraints_are_refused_naming_the_field(llm, constraint, message):
    with pytest.raises(ValueError, match=message):
        llm.generate([PROMPT], sampled(constraint, 0), use_tqdm=False)
    assert not llm.engine.has_unfinished()


def test_params_take_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one of"):
        S(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="exactly one of"):
        S()
    with pytest.raises(ValueError, match="choice must be a list of non-empty strings"):
        S(choice=["a", ""])
    assert S(json={"b": 1, "a": 2}).json == '{"b": 1, "a": 2}'  # key order kept


def test_abort_while_the_grammar_compiles(llm):
    eng = llm.engine
    eng.add_request("c1", PROMPT, sampled(S(json={"type": "object", "properties": {
        "z": {"type": "string", "pattern": "^[a-f]{3}$"}}}), 0))  # fmt: skip
    eng.abort(["c1"])
    assert not eng.has_unfinished()
    assert llm.generate([PROMPT], sampled(S(choice=["a", "b"]), 0), use_tqdm=False)


@pytest.mark.parametrize("path", ["native", "torch"])
@pytest.mark.parametrize("vocab", [32, 70, 384, 1000])
def test_apply_bitmask_against_a_loop(vocab, path, monkeypatch):
    from tokenmill.layers import sampler

    if path == "torch":
        monkeypatch.setattr(sampler, "_NATIVE", [None])
    elif sampler._native_rows() is None:
        pytest.skip("no native kernels here (no C++ compiler)")
    gen = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=gen)
    words = (vocab + 31) // 32 - (1 if vocab == 70 else 0)  # 70: a mask narrower than the row
    mask = torch.randint(-(2**31), 2**31 - 1, (2, words), generator=gen, dtype=torch.int64)
    mask = mask.to(torch.int32)
    rows = torch.tensor([3, 1])
    want = logits.clone()
    for i, row in enumerate(rows.tolist()):
        for t in range(vocab):
            bit = t < 32 * words and (int(mask[i, t // 32]) >> (t % 32)) & 1
            if not bit:
                want[row, t] = float("-inf")
    got = apply_bitmask(logits.clone(), rows, mask)
    assert torch.equal(got, want)
