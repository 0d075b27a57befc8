"""Tool-call parsers: whole outputs and streams cut at every kind of place give the same calls."""

from __future__ import annotations

import json
import random

import pytest

from tokenmill.serve.tool_parsers import FORMATS, ToolCallStream, parse

OUTPUTS = {
    "hermes": (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"units": "metric"}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": '
        '{"tz": "Europe/Paris", "note": "a } and a \\" inside"}}\n</tool_call>'
    ),
    "llama3_json": (
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; '
        '{"name": "get_time", "parameters": {}}'
    ),
    "mistral": (
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
        '{"name": "get_time", "arguments": "{\\"tz\\": \\"UTC\\"}"}]'
    ),
    "json_array": '[{"name": "lookup", "parameters": {"q": "x", "n": [1, 2, {"y": "]"}]}}]',
}
EXPECTED = {
    "hermes": (
        "Let me check.",
        [
            ("get_weather", {"city": "Paris", "units": "metric"}),
            ("get_time", {"tz": "Europe/Paris", "note": 'a } and a " inside'}),
        ],
    ),
    "llama3_json": (None, [("get_weather", {"city": "Paris"}), ("get_time", {})]),
    "mistral": (None, [("get_weather", {"city": "Paris"}), ("get_time", {"tz": "UTC"})]),
    "json_array": (None, [("lookup", {"q": "x", "n": [1, 2, {"y": "]"}]})]),
}


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_whole_output(fmt):
    content, calls = parse(FORMATS[fmt], OUTPUTS[fmt])
    want_content, want_calls = EXPECTED[fmt]
    assert content == want_content
    assert [(n, json.loads(a)) for n, a in calls] == want_calls


def replay(fmt: str, text: str, cuts: list[int]):
    stream = ToolCallStream(FORMATS[fmt])
    content, calls = "", {}
    for end in [*cuts, len(text)]:
        delta, deltas = stream.feed(text[:end], final=end == len(text))
        content += delta
        for d in deltas:
            call = calls.setdefault(d["index"], {"name": None, "arguments": "", "ids": []})
            if "name" in d["function"]:  # a call's first delta: id, type and name
                assert d["type"] == "function" and d["id"].startswith("call_")
                assert call["name"] is None, "a call is named once"
                call["name"] = d["function"]["name"]
                call["ids"].append(d["id"])
            else:
                assert call["name"] is not None, "arguments come after the name"
            call["arguments"] += d["function"]["arguments"]
    return content, [(c["name"], c["arguments"]) for _, c in sorted(calls.items())]


@pytest.mark.parametrize("fmt", list(OUTPUTS))
def test_streams_cut_anywhere_reassemble_to_the_whole(fmt):
    text = OUTPUTS[fmt]
    whole_content, whole_calls = parse(FORMATS[fmt], text)
    every = list(range(1, len(text)))  # one character at a time
    trials = [every] + [
        sorted(random.Random(seed).sample(every, random.randint(1, 25))) for seed in range(150)
    ]
    for cuts in trials:
        content, calls = replay(fmt, text, cuts)
        assert calls == whole_calls
        assert (content.strip() or None) == whole_content


@pytest.mark.parametrize(
    "fmt,text",
    [
        ("hermes", "No tools needed: <tool_c"),  # a marker's prefix, never completed
        ("hermes", "<tool_call>\n{not json}\n</tool_call>"),
        ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),  # no name
        ("llama3_json", "{this is just braces"),
        ("llama3_json", "A plain answer."),
        ("mistral", "[TOOL_CALLS] oops"),
    ],
)
def test_what_does_not_parse_is_content(fmt, text):
    assert parse(FORMATS[fmt], text) == (text, [])
    cuts = list(range(1, len(text)))
    content, calls = replay(fmt, text, cuts)
    assert calls == [] and content == text


def test_content_streams_before_the_calls_and_a_marker_prefix_is_held_back():
    stream = ToolCallStream(FORMATS["hermes"])
    assert stream.feed("Checking <tool", False) == ("Checking ", [])
    assert stream.feed("Checking <tool_call>", False) == ("", [])
    _, deltas = stream.feed('Checking <tool_call>{"name": "f", "arguments": {"a', False)
    assert deltas[0]["function"] == {"name": "f", "arguments": ""}
    assert deltas[1]["function"] == {"arguments": '{"a'}


def test_text_after_the_calls_is_dropped():
    text = '<tool_call>{"name": "f", "arguments": {}}</tool_call>\nDone!'
    assert parse(FORMATS["hermes"], text) == (None, [("f", "{}")])
