"""Tool-call parsers: a model's text -> content and OpenAI tool calls, whole or as it streams.

One incremental scanner serves every format; a format says where tool calls begin and what sits
between them (vLLM's parser names, chosen with --tool-call-parser):
- `hermes`: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, repeated (Hermes,
  Qwen 2.5, the template tokenmill ships for ChatML models without a tool section);
- `llama3_json`: the output is `{"name": ..., "parameters": {...}}` (optionally after
  `<|python_tag|>`), several separated by `;` (Llama 3.1+ with JSON tool calling);
- `mistral`: `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]` (Mistral v0.3 and later's
  JSON-array form).
The internal `json_array` format reads what `tool_choice: "required"` constrains the output to:
`[{"name": ..., "parameters": {...}}, ...]`.

Arguments are passed on as the JSON text the model wrote (a JSON string holding JSON is
unwrapped), so a stream's argument deltas joined equal the non-streamed call's arguments. Text
that does not parse as tool calls when the output ends is content, as it would be without a
parser.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field

from tokenmill.config import TOOL_CALL_PARSERS

_NAME = re.compile(r'"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_DECODER = json.JSONDecoder()


def call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCallFormat:
    name: str
    start: str  # where tool calls begin; "" = at the start of the output
    markers: tuple[str, ...] = ()  # skipped between calls
    separators: str = " \t\r\n"  # characters skipped between calls
    args_keys: tuple[str, ...] = ("arguments", "parameters")
    leading: tuple[str, ...] = ()  # start "": the output must begin (after whitespace) so
    special_tokens: bool = False  # the markers are special tokens: keep them in the text

    def region_start(self, text: str, final: bool) -> int | None:
        """Where the tool-call region begins (after the start marker); None: no region (yet)."""
        if self.start:
            i = text.find(self.start)
            return None if i < 0 else i + len(self.start)
        stripped = text.lstrip()
        if any(stripped.startswith(p) for p in self.leading):
            return len(text) - len(stripped)
        return None

    def content_end(self, text: str, final: bool) -> int:
        """How much of `text` is surely content (not the beginning of a start marker)."""
        if self.start:
            i = text.find(self.start)
            if i >= 0:
                return i
            if final:
                return len(text)
            for k in range(min(len(self.start) - 1, len(text)), 0, -1):
                if text.endswith(self.start[:k]):
                    return len(text) - k
            return len(text)
        stripped = text.lstrip()
        if any(stripped.startswith(p) for p in self.leading):
            return 0
        if not final and any(p.startswith(stripped) for p in self.leading):
            return 0  # nothing yet, or a prefix of a leading marker: wait
        return len(text)


FORMATS = {
    "hermes": ToolCallFormat("hermes", "<tool_call>", markers=("<tool_call>", "</tool_call>")),
    "llama3_json": ToolCallFormat(
        "llama3_json",
        "",
        markers=("<|python_tag|>",),
        separators=" \t\r\n;",
        leading=("{", "<|python_tag|>"),
        special_tokens=True,
    ),
    "mistral": ToolCallFormat(
        "mistral", "[TOOL_CALLS]", separators=" \t\r\n[],", special_tokens=True
    ),
    "json_array": ToolCallFormat("json_array", "", separators=" \t\r\n[],", leading=("[",)),
}
PARSERS = TOOL_CALL_PARSERS  # the names --tool-call-parser takes
assert set(PARSERS) == set(FORMATS) - {"json_array"}


@dataclass
class Call:
    name: str | None = None
    arguments: str = ""  # the JSON text known so far
    complete: bool = False


@dataclass
class Scan:
    content: str  # text that is surely content
    calls: list[Call] = field(default_factory=list)
    valid: bool = True  # False: the region does not parse as tool calls


def _arguments(obj_text: str, keys: tuple[str, ...]) -> tuple[str, bool] | None:
    """The arguments' JSON text inside a (possibly partial) call object, and whether it is
    complete; None before its key is seen."""
    m = re.search(r'"(' + "|".join(keys) + r')"\s*:\s*', obj_text)
    if m is None:
        return None
    value = obj_text[m.end() :]
    try:
        parsed, end = _DECODER.raw_decode(value)
    except json.JSONDecodeError:
        if value.startswith('"'):
            return "", False  # JSON text inside a string: passed on once whole
        return value, False
    if isinstance(parsed, str):  # '"arguments": "{\"a\": 1}"': the string is the JSON
        return parsed, True
    return value[:end], True


def scan(fmt: ToolCallFormat, text: str, final: bool) -> Scan:
    """Content and tool calls in the output so far. With `final`, an unparsable region makes
    the whole text content."""
    begin = fmt.region_start(text, final)
    if begin is None:
        return Scan(text[: fmt.content_end(text, final)])
    content = text[: fmt.content_end(text, final)]
    region, pos, calls = text[begin:], 0, []
    while True:
        while pos < len(region) and region[pos] in fmt.separators:
            pos += 1
        marker = next((m for m in fmt.markers if region.startswith(m, pos)), None)
        if marker is not None:
            pos += len(marker)
            continue
        if pos >= len(region):
            break
        rest = region[pos:]
        if not final and any(m.startswith(rest) for m in fmt.markers):
            break  # a marker arriving
        if rest[0] != "{":
            if calls and calls[-1].complete:
                break  # text after the calls (a model's sign-off): dropped, as vLLM does
            return _invalid(text, calls, final)
        try:
            obj, end = _DECODER.raw_decode(rest)
        except json.JSONDecodeError:
            if final:
                return _invalid(text, calls, final)
            name = _NAME.search(rest)
            args = _arguments(rest, fmt.args_keys)
            calls.append(
                Call(name.group(1) if name else None, args[0] if args else "", complete=False)
            )
            break
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return _invalid(text, calls, final)
        args = _arguments(rest[:end], fmt.args_keys)
        calls.append(Call(obj["name"], args[0] if args else "{}", complete=True))
        pos += end
    return Scan(content, calls)


def _invalid(text: str, calls: list[Call], final: bool) -> Scan:
    if final:
        return Scan(text, [], valid=False)
    return Scan("", calls, valid=False)


def parse(fmt: ToolCallFormat, text: str) -> tuple[str | None, list[tuple[str, str]]]:
    """A finished output: (content or None, [(name, arguments JSON)])."""
    result = scan(fmt, text, final=True)
    if not result.valid or not result.calls:
        return text, []
    content = result.content.strip() or None
    return content, [(c.name or "", c.arguments) for c in result.calls]


@dataclass
class _Sent:
    id: str
    named: bool = False
    arguments: int = 0  # characters of arguments sent


class ToolCallStream:
    """One choice's streamed output -> (content delta, tool-call deltas) per step, shaped as
    OpenAI streams them: a call's first delta carries index, id, type and name (arguments
    ""), later ones argument fragments."""

    def __init__(self, fmt: ToolCallFormat) -> None:
        self.fmt = fmt
        self.content_sent = 0
        self.sent: list[_Sent] = []
        self.invalid = False

    def feed(self, text: str, final: bool) -> tuple[str, list[dict]]:
        if self.invalid:  # no longer tool calls: everything after is content
            delta, self.content_sent = text[self.content_sent :], len(text)
            return delta, []
        result = scan(self.fmt, text, final)
        if not result.valid:  # final: it was never tool calls; else: wait and see
            if final:
                self.invalid = True
                delta, self.content_sent = text[self.content_sent :], len(text)
                return delta, []
            return "", []
        delta = result.content[self.content_sent :]
        self.content_sent = max(self.content_sent, len(result.content))
        deltas: list[dict] = []
        for i, call in enumerate(result.calls):
            if i == len(self.sent):
                self.sent.append(_Sent(call_id()))
            sent = self.sent[i]
            if not sent.named:
                if call.name is None:
                    break
                sent.named = True
                deltas.append(
                    {"index": i, "id": sent.id, "type": "function",
                     "function": {"name": call.name, "arguments": ""}}
                )  # fmt: skip
            more = call.arguments[sent.arguments :]
            if more:
                sent.arguments = len(call.arguments)
                deltas.append({"index": i, "function": {"arguments": more}})
        return delta, deltas

    @property
    def num_calls(self) -> int:
        return sum(s.named for s in self.sent)
