"""llguidance against xgrammar on the bundled model's vocabulary: compile time, mask time per
token (walking a valid document token by token), and JSON-schema coverage (which keywords each
refuses, and whether one it accepts is really enforced). How tokenmill chose its grammar engine.

    pip install xgrammar --no-deps && pip install apache-tvm-ffi   # xgrammar is optional
    python benchmarks/grammar_engines.py
"""

from __future__ import annotations

import json
import statistics
import time

SCHEMAS = {
    "person": (
        {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer",
         "minimum": 0}, "email": {"type": "string", "format": "email"}},
         "required": ["name", "age"], "additionalProperties": False},
        {"name": "Ada Lovelace", "age": 36},
    ),
    "nested": (
        {"type": "object", "properties": {"items": {"type": "array", "items": {"type": "object",
         "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {
         "type": "string", "enum": ["a", "b", "c"]}, "minItems": 1}}, "required": ["id",
         "tags"]}}}, "required": ["items"]},
        {"items": [{"id": 1, "tags": ["a", "b"]}, {"id": 22, "tags": ["c"]}]},
    ),
    "refs": (
        {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "number"}, "y": {
         "type": "number"}}, "required": ["x", "y"]}}, "type": "object", "properties": {
         "a": {"$ref": "#/$defs/pt"}, "b": {"anyOf": [{"$ref": "#/$defs/pt"}, {"type": "null"}]}},
         "required": ["a", "b"]},
        {"a": {"x": 1.5, "y": -2}, "b": None},
    ),
    "pattern": (
        {"type": "object", "properties": {"code": {"type": "string", "pattern":
         "^[A-Z]{3}-[0-9]{4}$"}, "n": {"type": "string", "minLength": 2, "maxLength": 5}},
         "required": ["code", "n"]},
        {"code": "ABC-1234", "n": "xyz"},
    ),
}  # fmt: skip
# keyword -> (schema, a document that breaks it)
KEYWORDS = {
    "not": ({"not": {"type": "string"}}, '"x"'),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, "[1, 1]"),
    "if/then": ({"if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}},
                '{"a": 1}'),
    "contains": ({"type": "array", "contains": {"type": "integer"}}, '["a"]'),
    "minProperties": ({"type": "object", "minProperties": 2}, '{"a": 1}'),
    "dependentRequired": ({"type": "object", "dependentRequired": {"a": ["b"]}}, '{"a": 1}'),
    "patternProperties": ({"type": "object", "patternProperties": {"^x_": {"type": "integer"}},
                           "additionalProperties": False}, '{"y": 1}'),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, "7"),
    "prefixItems": ({"type": "array", "prefixItems": [{"type": "integer"}], "items": False},
                    '["a"]'),
}  # fmt: skip


def walk(fill, accept, ids, eos):
    times = []
    for i in [*ids, eos]:
        t = time.perf_counter()
        mask = fill()
        times.append(time.perf_counter() - t)
        assert (int(mask[i // 32]) >> (i % 32)) & 1, f"token {i} refused"
        assert accept(i) is not False
    return times


def llguidance_engine(tok, vocab, eos):
    import llguidance
    import llguidance.torch as lt

    t = time.perf_counter()
    lltok = llguidance.LLTokenizer(tok.backend.to_str(), n_vocab=vocab, eos_token=eos)
    setup = time.perf_counter() - t

    def compile_(schema):
        g = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema))
        m = llguidance.LLMatcher(lltok, g)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def run(m, ids):
        bm = lt.allocate_token_bitmask(1, vocab)

        def fill():
            lt.fill_next_token_bitmask(m, bm, 0)
            return bm[0]

        return walk(fill, m.consume_token, ids, eos)

    def accepts(m, ids):
        return all(m.consume_token(i) for i in ids) and m.consume_token(eos)

    return setup, compile_, run, accepts


def xgrammar_engine(tok, vocab, eos):
    import xgrammar
    from transformers import PreTrainedTokenizerFast

    t = time.perf_counter()
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok.backend, eos_token=tok.special_tokens["eos_token"]
    )
    info = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab)
    compiler = xgrammar.GrammarCompiler(info, max_threads=2)
    setup = time.perf_counter() - t

    def compile_(schema):
        return xgrammar.GrammarMatcher(
            compiler.compile_json_schema(json.dumps(schema), strict_mode=True)
        )

    def run(m, ids):
        bm = xgrammar.allocate_token_bitmask(1, vocab)

        def fill():
            m.fill_next_token_bitmask(bm, 0)
            return bm[0]

        return walk(fill, m.accept_token, ids, eos)

    def accepts(m, ids):
        return all(m.accept_token(i) for i in ids) and m.accept_token(eos)

    return setup, compile_, run, accepts


def main() -> None:
    from tokenmill.bench.ab import emit
    from tokenmill.bench.offline import commit, machine
    from tokenmill.models.loader import load_tokenizer

    tok = load_tokenizer("default")
    vocab, eos = tok.vocab_size, tok.token_id("eos_token")
    report = {"machine": machine(), "commit": commit(), "date": time.strftime("%Y-%m-%d"),
              "vocab": vocab, "engines": {}}  # fmt: skip
    for name, make in (("llguidance", llguidance_engine), ("xgrammar", xgrammar_engine)):
        try:
            setup, compile_, run, accepts = make(tok, vocab, eos)
        except ImportError as e:
            report["engines"][name] = f"not installed ({e})"
            continue
        row: dict = {"tokenizer_setup_s": round(setup, 2), "schemas": {}, "keywords": {}}
        for sname, (schema, doc) in SCHEMAS.items():
            ids = tok.encode(json.dumps(doc), add_special_tokens=False)
            t = time.perf_counter()
            matcher = compile_(schema)
            compile_ms = (time.perf_counter() - t) * 1e3
            times = run(matcher, ids)
            row["schemas"][sname] = {
                "compile_ms": round(compile_ms, 2),
                "mask_us_median": round(statistics.median(times) * 1e6, 1),
                "mask_us_max": round(max(times) * 1e6, 1),
                "tokens": len(ids),
            }
        for kname, (schema, bad) in KEYWORDS.items():
            try:
                matcher = compile_(schema)
            except Exception as e:  # noqa: BLE001 (either engine's refusal)
                row["keywords"][kname] = f"refused: {str(e).splitlines()[0][:60]}"
                continue
            ids = tok.encode(bad, add_special_tokens=False)
            row["keywords"][kname] = (
                f"accepted, NOT enforced: lets {bad} through"
                if accepts(matcher, ids)
                else "accepted and enforced"
            )
        report["engines"][name] = row
    emit(report, None)


if __name__ == "__main__":
    main()
