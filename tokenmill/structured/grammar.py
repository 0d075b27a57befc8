"""StructuredOutputsParams -> an llguidance grammar, and its validation.

Validation builds the grammar the way the core will (llguidance's own checks, without a
tokenizer), so a request the front admits compiles in the core; errors are ValueErrors that name
the request field the constraint came from. Results are cached by spec: a client that sends one
schema with every request pays once.
"""

from __future__ import annotations

import functools
import json
import logging

import llguidance

from tokenmill.sampling_params import StructuredOutputsParams

log = logging.getLogger(__name__)

# compact JSON, as json.dumps writes it: ", " between items, ": " after keys, nothing else
COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def grammar_of(p: StructuredOutputsParams) -> str:
    """The llguidance grammar (its JSON form) for one constraint; ValueError naming the field
    for input that is not even shaped right (a schema that is not JSON, a grammar that does not
    convert)."""
    options = None if p.any_whitespace else COMPACT_JSON
    kind = p.kind
    if kind in ("json", "json_object"):
        text = p.json if kind == "json" else '{"type": "object"}'
        assert text is not None
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{p.source}: the JSON schema is not valid JSON ({e})") from None
        if not isinstance(schema, dict | bool):
            raise ValueError(f"{p.source}: a JSON schema must be an object or a boolean")
        return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=options)
    if kind == "regex":
        assert p.regex is not None
        return llguidance.LLMatcher.grammar_from_regex(p.regex)
    if kind == "choice":
        assert p.choice is not None
        return llguidance.grammar_from("choice", json.dumps(list(p.choice)))
    assert p.grammar is not None
    try:  # Lark as is; GBNF/EBNF (llama.cpp's, as vLLM's xgrammar users write) converted
        return llguidance.grammar_from("grammar", p.grammar)
    except ValueError as e:
        raise ValueError(f"{p.source}: the grammar is neither Lark nor GBNF ({e})") from None


@functools.lru_cache(maxsize=1024)
def _check(p: StructuredOutputsParams) -> str:
    """'' when the constraint is valid, else why not."""
    try:
        grammar = grammar_of(p)
    except ValueError as e:
        return str(e)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        what = {"json": "JSON schema", "json_object": "JSON schema", "regex": "regex"}
        return f"{p.source}: invalid {what.get(p.kind, p.kind)}: {messages[0]}"
    for message in messages:
        log.warning("%s: %s", p.source, message)
    return ""


def validate(p: StructuredOutputsParams) -> None:
    """Raise ValueError naming the field when the grammar engine cannot enforce `p`: a schema
    it cannot read, a keyword it does not implement (never silently ignored), a bad regex."""
    error = _check(p)
    if error:
        raise ValueError(error)
