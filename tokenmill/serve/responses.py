"""The Responses API (`POST /v1/responses`), the subset a text model serves: input as text or
messages, `instructions`, sampling fields, `text.format` (text, json_object, json_schema:
structured outputs), streaming as OpenAI's typed events. Answered as a chat completion of the
same conversation would be (the model's chat template, the same engine request).

Not served, refused with a 400 naming the field: `previous_response_id` and `store`d responses
(nothing is kept after a response is sent), `background`, `tools` (function calling: use chat
completions), non-text input parts (images, files), `reasoning` effort.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.models.tokenizer import Tokenizer
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams
from tokenmill.serve import protocol as P


def _text_of(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for j, part in enumerate(content):
        if part.type not in ("input_text", "output_text", "text"):
            raise ValueError(
                f"{where}.content[{j}]: type {part.type!r} is not served (text parts only)"
            )
        parts.append(part.text or "")
    return "".join(parts)


def messages_of(req: P.ResponsesRequest) -> list[dict[str, str]]:
    messages = []
    if req.instructions:
        messages.append({"role": "system", "content": req.instructions})
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
    else:
        for i, item in enumerate(req.input):
            messages.append({"role": item.role, "content": _text_of(item.content, f"input[{i}]")})
    return messages


def constraint(req: P.ResponsesRequest) -> StructuredOutputsParams | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return StructuredOutputsParams(json_object=True, source="text.format")
    if fmt.schema_ is None:
        raise ValueError("text.format: type json_schema needs a schema")
    return StructuredOutputsParams(json=fmt.schema_, source="text.format.schema")


def params_of(req: P.ResponsesRequest) -> SamplingParams:
    return SamplingParams(
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        seed=req.seed,
        max_tokens=req.max_output_tokens,
        structured_outputs=constraint(req),
    )


def _usage(out: RequestOutput) -> P.ResponseUsage:
    prompt = len(out.prompt_token_ids)
    done = sum(len(c.token_ids) for c in out.outputs)
    return P.ResponseUsage(
        input_tokens=prompt,
        input_tokens_details={"cached_tokens": out.num_cached_tokens or 0},
        output_tokens=done,
        output_tokens_details={"reasoning_tokens": 0},
        total_tokens=prompt + done,
    )


def _status(c: CompletionOutput | None) -> tuple[str, dict | None]:
    if c is None or c.finish_reason is None:
        return "in_progress", None
    if c.finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    if c.finish_reason in ("abort", "error"):
        return "failed", None
    return "completed", None


class ResponseBuilder:
    """One response's objects: the whole response, its message item and text part."""

    def __init__(self, req: P.ResponsesRequest, model: str) -> None:
        self.req = req
        self.model = model
        self.id = f"resp_{uuid.uuid4().hex}"
        self.msg_id = f"msg_{uuid.uuid4().hex}"
        self.created = int(time.time())

    def part(self, text: str) -> dict:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def item(self, text: str | None, status: str) -> dict:
        content = [] if text is None else [self.part(text)]
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant",
                "content": content}  # fmt: skip

    def response(self, out: RequestOutput | None, status: str, incomplete=None) -> P.ResponseObject:
        c = out.outputs[0] if out is not None and out.outputs else None
        item_status = "completed" if status == "completed" else "incomplete"
        output = [] if c is None else [self.item(c.text, item_status)]
        req = self.req
        error = None
        if status == "failed":
            error = {"code": "server_error", "message": f"generation ended: {c.stop_reason}"}
        return P.ResponseObject(
            id=self.id, created_at=self.created, model=self.model, status=status,
            output=output, usage=_usage(out) if out is not None and c is not None else None,
            incomplete_details=incomplete, error=error, instructions=req.instructions,
            max_output_tokens=req.max_output_tokens, temperature=req.temperature,
            top_p=req.top_p, text=req.text.model_dump(by_alias=True) if req.text else
            {"format": {"type": "text"}}, metadata=req.metadata or {}, user=req.user,
        )  # fmt: skip


def render(tok: Tokenizer, req: P.ResponsesRequest, literal_content: bool, max_model_len: int):
    text, ids = tok.encode_chat(messages_of(req), True, literal_content, None, max_model_len)
    return {"prompt": text, "prompt_token_ids": ids}


async def respond(engine: AsyncEngine, tok: Tokenizer, model: str, req: P.ResponsesRequest,
                  tenant: str | None = None, literal_content: bool = True):  # fmt: skip
    import asyncio

    from tokenmill.serve.handlers import add_all, finals

    params = params_of(req)
    prompt = await asyncio.to_thread(render, tok, req, literal_content, engine.max_model_len)
    build = ResponseBuilder(req, model)
    streams = await add_all(engine, build.id, [prompt], params, tenant)
    if req.stream:
        return _events(build, streams)
    (out,) = await finals(streams)
    status, incomplete = _status(out.outputs[0])
    return build.response(out, status, incomplete)


def _event(kind: str, seq: int, **fields) -> str:
    import json

    body = {"type": kind, "sequence_number": seq, **fields}
    return f"event: {kind}\ndata: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _events(build: ResponseBuilder, streams) -> AsyncIterator[str]:
    """OpenAI's event sequence for one text message."""
    from tokenmill.serve.handlers import merged

    seq = iter(range(1 << 62))
    started = build.response(None, "in_progress").model_dump(mode="json")
    yield _event("response.created", next(seq), response=started)
    yield _event("response.in_progress", next(seq), response=started)
    where = {"item_id": build.msg_id, "output_index": 0, "content_index": 0}
    yield _event("response.output_item.added", next(seq), output_index=0,
                 item=build.item(None, "in_progress"))  # fmt: skip
    yield _event("response.content_part.added", next(seq), **where, part=build.part(""))
    sent = 0
    final = None
    async for _, out in merged(streams):
        c = out.outputs[0]
        if len(c.text) > sent:
            yield _event("response.output_text.delta", next(seq), **where,
                         delta=c.text[sent:], logprobs=[])  # fmt: skip
            sent = len(c.text)
        if out.finished:
            final = out
    assert final is not None
    c = final.outputs[0]
    status, incomplete = _status(c)
    yield _event("response.output_text.done", next(seq), **where, text=c.text, logprobs=[])
    yield _event("response.content_part.done", next(seq), **where, part=build.part(c.text))
    item_status = "completed" if status == "completed" else "incomplete"
    yield _event("response.output_item.done", next(seq), output_index=0,
                 item=build.item(c.text, item_status))  # fmt: skip
    done = build.response(final, status, incomplete).model_dump(mode="json")
    kind = {"completed": "response.completed", "incomplete": "response.incomplete"}
    yield _event(kind.get(status, "response.failed"), next(seq), response=done)
