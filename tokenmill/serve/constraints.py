"""Request fields -> StructuredOutputsParams: OpenAI's `response_format`, vLLM's
`structured_outputs` and `guided_*`, and the constraints `tool_choice` required or named puts
on a chat completion (its arguments always parse against the tool's schema).

At most one source per request; each constraint names its field, so a bad schema is a 400 that
says which (the grammar engine's check runs in the input processor, off the event loop).
"""

from __future__ import annotations

import json
from typing import Any

from tokenmill.sampling_params import StructuredOutputsParams
from tokenmill.serve import protocol as P

EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}


def requested(req: P.SamplingFields) -> StructuredOutputsParams | None:
    """The output constraint a completion or chat request asks for, if any."""
    found: list[StructuredOutputsParams] = []
    rf = req.response_format
    if rf is not None and rf.type == "json_object":
        found.append(StructuredOutputsParams(json_object=True, source="response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None or rf.json_schema.schema_ is None:
            raise ValueError(
                "response_format: type json_schema needs json_schema.schema (the JSON schema)"
            )
        found.append(
            StructuredOutputsParams(
                json=rf.json_schema.schema_, source="response_format.json_schema.schema"
            )
        )
    so = req.structured_outputs
    if so is not None:
        fields = {
            "json": so.json_,
            "regex": so.regex,
            "choice": so.choice,
            "grammar": so.grammar,
            "json_object": bool(so.json_object),
        }
        found.append(
            StructuredOutputsParams(
                **fields,  # type: ignore[arg-type]
                any_whitespace=so.disable_any_whitespace is False,
                source="structured_outputs",
            )
        )
    guided = {
        "guided_json": "json",
        "guided_regex": "regex",
        "guided_choice": "choice",
        "guided_grammar": "grammar",
    }
    for name, kind in guided.items():
        value = getattr(req, name)
        if value is not None:
            found.append(StructuredOutputsParams(**{kind: value}, source=name))
    if len(found) > 1:
        raise ValueError(
            f"{found[1].source}: only one output constraint per request; this one also has "
            f"{found[0].source}"
        )
    return found[0] if found else None


def closed(schema: Any) -> Any:
    """The schema with every object that does not say otherwise closed to its declared
    properties (additionalProperties false), as OpenAI's strict function calling requires: a
    function takes the parameters it declares, and a model must not invent others."""
    if isinstance(schema, list):
        return [closed(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    for key in ("properties", "patternProperties", "$defs", "definitions"):
        if isinstance(schema.get(key), dict):  # maps of names to schemas, not schemas
            out[key] = {name: closed(s) for name, s in schema[key].items()}
    if "properties" in schema and "additionalProperties" not in schema:
        if "patternProperties" not in schema:
            out["additionalProperties"] = False
    return out


def _parameters(tool: P.Tool) -> dict[str, Any]:
    return closed(tool.function.parameters or EMPTY_PARAMETERS)


def named_tool(req: P.ChatCompletionRequest, name: str) -> tuple[int, StructuredOutputsParams]:
    """tool_choice {"type": "function", "function": {"name": ...}}: the whole output is that
    tool's arguments."""
    for i, tool in enumerate(req.tools or []):
        if tool.function.name == name:
            return i, StructuredOutputsParams(
                json=json.dumps(_parameters(tool)), source=f"tools[{i}].function.parameters"
            )
    names = [t.function.name for t in req.tools or []]
    raise ValueError(f"tool_choice: no tool named {name!r} in tools ({names})")


def required_tools(req: P.ChatCompletionRequest) -> StructuredOutputsParams:
    """tool_choice "required": a JSON array of calls, each {"name": one of the tools,
    "parameters": its arguments}, at least one (exactly one without parallel_tool_calls)."""
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "enum": [tool.function.name]},
                "parameters": _parameters(tool),
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for tool in req.tools or []
    ]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not req.parallel_tool_calls:
        schema["maxItems"] = 1
    return StructuredOutputsParams(json=json.dumps(schema), source="tools")
