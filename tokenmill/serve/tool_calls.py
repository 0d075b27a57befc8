"""Tool calling on chat completions: what a request's `tools` and `tool_choice` ask of the
prompt, the sampler and the response.

- `tools` go to the chat template as transformers passes them (`tools=`). A model whose template
  has no tool section gets the template the server ships for ChatML models
  (templates/tool_chat_hermes.jinja: Hermes-style `<tool_call>` blocks), or `--chat-template`.
- `tool_choice` "none": tools are rendered (as vLLM does), nothing is parsed. "auto" (the
  default with tools): the output is parsed by the server's `--tool-call-parser`, which needs
  `--enable-auto-tool-choice` (vLLM's flags); the model decides. "required": the output is
  constrained to a JSON array of calls, each naming one of the tools with arguments that match
  its schema. A named function: the output is constrained to that function's arguments.
- `parallel_tool_calls` false: at most one call (enforced for "required", the first one kept
  for "auto").
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.serve import constraints
from tokenmill.serve import protocol as P
from tokenmill.serve.tool_parsers import FORMATS, PARSERS, ToolCallFormat, call_id, parse


def shipped_template(name: str = "tool_chat_hermes.jinja") -> str:
    return resources.files("tokenmill.serve").joinpath("templates").joinpath(name).read_text()


@dataclass(frozen=True)
class ToolSettings:
    """The server's tool-calling options."""

    parser: str | None = None  # --tool-call-parser
    auto_tool_choice: bool = False  # --enable-auto-tool-choice
    chat_template: str | None = None  # --chat-template (its text): replaces the model's

    def __post_init__(self) -> None:
        if self.parser is not None and self.parser not in PARSERS:
            raise ValueError(f"tool_call_parser must be one of {PARSERS}, got {self.parser!r}")
        if self.auto_tool_choice and self.parser is None:
            raise ValueError(
                "--enable-auto-tool-choice needs --tool-call-parser (one of "
                f"{', '.join(PARSERS)}): how to read tool calls in the model's output"
            )


@dataclass(frozen=True)
class ToolPlan:
    """What one chat request needs: its template, tools, constraint and how to read calls."""

    tools: list[dict[str, Any]] | None  # for the template
    chat_template: str | None  # None: the model's own
    constraint: StructuredOutputsParams | None
    format: ToolCallFormat | None  # parse the output as tool calls in this format
    named: str | None = None  # the forced function: the whole output is its arguments
    parallel: bool = True

    @property
    def calls_tools(self) -> bool:
        return self.format is not None or self.named is not None


def plan(
    req: P.ChatCompletionRequest, settings: ToolSettings, model_template: str | None
) -> ToolPlan:
    """ValueError naming the field for what cannot be served."""
    constraint = constraints.requested(req)
    choice = req.tool_choice or ("auto" if req.tools else "none")
    template = chat_template(bool(req.tools), settings, model_template)
    if not req.tools:
        if choice not in ("none", "auto"):
            raise ValueError("tool_choice: there are no tools to choose from; send `tools`")
        return ToolPlan(None, template, constraint, None)
    tools = [t.model_dump(exclude_none=True) for t in req.tools]
    if choice == "none":
        return ToolPlan(tools, template, constraint, None)
    if constraint is not None:
        raise ValueError(
            f"{constraint.source}: an output constraint cannot be combined with tool_choice "
            f"{choice if isinstance(choice, str) else 'naming a function'}; send tool_choice "
            '"none" with it'
        )
    if isinstance(choice, P.NamedToolChoice):
        _, named = constraints.named_tool(req, choice.function.name)
        return ToolPlan(tools, template, named, None, named=choice.function.name)
    if choice == "required":
        for i, tool in enumerate(req.tools):  # name the tool whose schema is bad
            if tool.function.parameters is not None:
                params = json.dumps(tool.function.parameters)
                src = f"tools[{i}].function.parameters"
                _validate(StructuredOutputsParams(json=params, source=src))
        return ToolPlan(
            tools, template, constraints.required_tools(req), FORMATS["json_array"],
            parallel=req.parallel_tool_calls,
        )  # fmt: skip
    if not (settings.auto_tool_choice and settings.parser):
        raise ValueError(
            'tool_choice: "auto" (the default when tools are given) needs the server started '
            "with --enable-auto-tool-choice and --tool-call-parser NAME; or send tool_choice "
            '"required", a named function, or "none"'
        )
    return ToolPlan(
        tools, template, None, FORMATS[settings.parser], parallel=req.parallel_tool_calls
    )


def chat_template(
    has_tools: bool, settings: ToolSettings, model_template: str | None
) -> str | None:
    """The template a chat request renders with: --chat-template, else the model's own, or for
    a request with tools and a ChatML model whose template has no tool section, the shipped
    one. None: the model's own."""
    if settings.chat_template is not None or not has_tools:
        return settings.chat_template
    if "tools" in (model_template or ""):
        return None
    if "<|im_start|>" not in (model_template or ""):
        raise ValueError(
            "tools: this model's chat template has no tool section; start the server with "
            "--chat-template FILE (a template that renders `tools`)"
        )
    return shipped_template()


def _validate(p: StructuredOutputsParams) -> None:
    from tokenmill.structured.grammar import validate

    validate(p)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI messages as templates read them: a tool call's `arguments` as an object (OpenAI
    sends JSON text; Hugging Face templates write `arguments | tojson`)."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            fixed = []
            for call in calls:
                fn = dict(call.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        raise ValueError(
                            "messages: a tool call's function.arguments is not JSON"
                        ) from None
                fixed.append({**call, "function": fn})
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


def message(plan: ToolPlan, text: str, eos_texts: tuple[str, ...] = ()) -> P.AssistantMessage:
    """A finished choice's assistant message: content and tool calls."""
    if plan.named is not None:
        call = P.ToolCall(id=call_id(), function=P.FunctionCall(name=plan.named, arguments=text))
        return P.AssistantMessage(content=None, tool_calls=[call])
    if plan.format is None:
        return P.AssistantMessage(content=text)
    content, calls = parse(plan.format, strip_eos(text, eos_texts))
    if not plan.parallel:
        calls = calls[:1]
    return P.AssistantMessage(
        content=content,
        tool_calls=[
            P.ToolCall(id=call_id(), function=P.FunctionCall(name=n, arguments=a)) for n, a in calls
        ],
    )


def strip_eos(text: str, eos_texts: tuple[str, ...]) -> str:
    for eos in eos_texts:
        if eos and text.endswith(eos):
            return text[: -len(eos)]
    return text


def finish_reason(plan: ToolPlan, msg: P.AssistantMessage, reason: str | None) -> str | None:
    """OpenAI's: "tool_calls" when the model chose to call (auto, required); a forced function
    ends with "stop"; a cut-off output stays "length"."""
    if msg.tool_calls and reason == "stop" and plan.named is None:
        return "tool_calls"
    return reason
