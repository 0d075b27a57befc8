"""Completions and chat completions: OpenAI requests -> engine requests -> responses or SSE.

Every engine request of an HTTP request is added (validated) before any byte is sent, so bad
input is a 400, never a broken stream. A stream that ends early (client gone) closes its request
streams, which aborts them and frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np

from tokenmill.engine.async_engine import AsyncEngine, EngineDeadError, RequestStream
from tokenmill.engine.outputs import CompletionOutput, RequestOutput, pooled_vector
from tokenmill.models.tokenizer import Tokenizer
from tokenmill.sampling_params import SamplingParams, StructuredOutputsParams
from tokenmill.serve import constraints, tool_calls
from tokenmill.serve import protocol as P
from tokenmill.serve.tool_calls import ToolPlan, ToolSettings
from tokenmill.serve.tool_parsers import ToolCallStream, call_id


def sampling_params(
    req: P.SamplingFields,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    structured: StructuredOutputsParams | None = None,
    skip_special_tokens: bool | None = None,
) -> SamplingParams:
    return SamplingParams(
        n=req.n,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0,
        min_p=req.min_p or 0.0,
        seed=req.seed,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty or 1.0,
        stop=req.stop,
        stop_token_ids=req.stop_token_ids,
        ignore_eos=req.ignore_eos,
        max_tokens=max_tokens,
        min_tokens=req.min_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        skip_special_tokens=(
            req.skip_special_tokens if skip_special_tokens is None else skip_special_tokens
        ),
        include_stop_str_in_output=req.include_stop_str_in_output,
        logit_bias=req.logit_bias or None,
        structured_outputs=structured,
    )


async def ending_on_error(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """A stream whose engine core died ends with an error event and [DONE], never a hang or a
    cut connection."""
    try:
        async for event in events:
            yield event
    except EngineDeadError as e:
        body = P.ErrorResponse(
            error=P.ErrorDetail(message=str(e), type="service_unavailable", param=None, code=None)
        )
        yield sse(body)
        yield "data: [DONE]\n\n"


async def finals(streams: list[RequestStream]) -> list[RequestOutput]:
    """Every stream's final output; if this is cancelled (client gone), all streams close."""
    try:
        return [await s.final() for s in streams]
    finally:
        for s in streams:
            s.close()


def sse(data: Any) -> str:
    body = data.model_dump_json(exclude_none=False) if hasattr(data, "model_dump_json") else data
    return f"data: {body}\n\n"


class DeltaEvents:
    """SSE events for the commonest chunk, a bare text delta of one choice (no logprobs, not
    the last), cut from one pydantic rendering per choice: the same fields in the same order
    as the model writes them, at a string join per token instead of a model build and dump.
    `make(index, text)` renders choice `index`'s chunk; where the mark is not found once in its
    rendering (a model name that holds it), that choice's events are rendered by the model."""

    MARK = "\u2063tokenmill-delta\u2063"

    def __init__(self, make: Any) -> None:
        self.make = make
        self._parts: dict[int, list[str] | None] = {}

    def templated(self, index: int) -> bool:
        if index not in self._parts:
            body = self.make(index, self.MARK).model_dump_json()
            self._parts[index] = body.split(self.MARK) if body.count(self.MARK) == 1 else None
        return self._parts[index] is not None

    def event(self, index: int, delta: str) -> str:
        if not self.templated(index):
            return sse(self.make(index, delta))
        head, tail = self._parts[index]  # type: ignore[misc]
        return f"data: {head}{json.dumps(delta, ensure_ascii=False)[1:-1]}{tail}\n\n"


async def add_all(
    engine: AsyncEngine, rid: str, prompts: list, params: SamplingParams, tenant: str | None
) -> list[RequestStream]:
    streams: list[RequestStream] = []
    try:
        for i, prompt in enumerate(prompts):
            streams.append(await engine.add(f"{rid}-{i}", prompt, params, tenant))
    except BaseException:
        for s in streams:
            s.close()
        raise
    return streams


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams as they arrive."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, s: RequestStream) -> None:
        try:
            async for out in s:
                await queue.put((i, out))
        except BaseException as exc:  # noqa: BLE001 (re-raised by the consumer)
            await queue.put((i, exc))
        finally:
            await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    remaining = len(tasks)
    try:
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.close()


def usage(outs: list[RequestOutput], scoring: bool = False) -> P.Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    completion = 0 if scoring else sum(len(c.token_ids) for o in outs for c in o.outputs)
    return P.Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


def so_far(out: RequestOutput, c: CompletionOutput) -> P.Usage:
    """vLLM's continuous usage stats: the prompt and this choice's tokens so far."""
    prompt, done = len(out.prompt_token_ids), len(c.token_ids)
    return P.Usage(prompt_tokens=prompt, completion_tokens=done, total_tokens=prompt + done)


# ---- embeddings ---------------------------------------------------------------------------
async def embeddings(
    engine: AsyncEngine, model: str, req: P.EmbeddingRequest, pooling: str, tenant: str | None
) -> P.EmbeddingResponse:
    """The served model's final hidden states pooled per input (the server's --embedding-pooling),
    L2-normalized, as floats or base64 float32 (OpenAI's encoding_format)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, pooling=pooling)
    rid = f"embd-{uuid.uuid4().hex}"
    streams = await add_all(engine, rid, completion_prompts(req.input), params, tenant)
    outs = await finals(streams)
    data = []
    for i, out in enumerate(outs):
        vector = pooled_vector(out)
        if req.dimensions is not None and req.dimensions != len(vector):
            raise ValueError(
                f"dimensions: this model's embeddings have {len(vector)} dimensions and are not "
                f"shortened; got {req.dimensions}"
            )
        value: list[float] | str = vector
        if req.encoding_format == "base64":
            value = base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode()
        data.append(P.EmbeddingData(index=i, embedding=value))
    prompt = sum(len(o.prompt_token_ids) for o in outs)
    return P.EmbeddingResponse(
        data=data, model=model, usage=P.EmbeddingUsage(prompt_tokens=prompt, total_tokens=prompt)
    )


# ---- completions --------------------------------------------------------------------------
def completion_prompts(prompt: Any) -> list:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [{"prompt_token_ids": prompt}]
    return [p if isinstance(p, str) else {"prompt_token_ids": p} for p in prompt]


def top_of(entry: dict[int, float], chosen: int, k: int) -> dict[int, float]:
    """An entry cut to the chosen token and the k most likely (the engine may hold more)."""
    best = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
    return {chosen: entry[chosen], **dict(best)}


def vllm_prompt_logprobs(tok: Tokenizer, out: RequestOutput, k: int) -> P.PromptLogprobs:
    """vLLM's prompt_logprobs: per prompt token (the first: null) {token id: {logprob, rank,
    decoded_token}} for the token itself and the k most likely there (ranks 1..k)."""
    result: P.PromptLogprobs = []
    ranks = out.prompt_logprob_ranks or []
    entries = out.prompt_logprobs or []
    for pos, (token_id, entry) in enumerate(zip(out.prompt_token_ids, entries)):
        if entry is None:
            result.append(None)
            continue
        row = {}
        for r, (tid, value) in enumerate(sorted(entry.items(), key=lambda kv: -kv[1])[:k]):
            text = tok.decode([tid], skip_special_tokens=False)
            row[str(tid)] = P.PromptLogprob(logprob=value, rank=r + 1, decoded_token=text)
        row[str(token_id)] = P.PromptLogprob(
            logprob=entry[token_id],
            rank=ranks[pos] if pos < len(ranks) else None,
            decoded_token=tok.decode([token_id], skip_special_tokens=False),
        )
        result.append(row)
    return result


def echoed_logprobs(
    tok: Tokenizer, out: RequestOutput, k: int | None = None
) -> P.CompletionLogprobs:
    """The prompt's part of echo + logprobs: every prompt token, the first with no logprob
    (nothing comes before it), each other with its logprob given those before it and the top
    k; text offsets from 0, as OpenAI's and vLLM's echo return them."""
    lp = P.CompletionLogprobs()
    offset = 0
    entries = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
    for token_id, entry in zip(out.prompt_token_ids, entries):
        if entry is not None and k is not None:
            entry = top_of(entry, token_id, k)
        text = tok.decode([token_id], skip_special_tokens=False)
        lp.tokens.append(text)
        lp.token_logprobs.append(None if entry is None else entry[token_id])
        lp.top_logprobs.append(
            None
            if entry is None
            else {tok.decode([t], skip_special_tokens=False): v for t, v in entry.items()}
        )
        lp.text_offset.append(offset)
        offset += len(text)
    return lp


def joined(a: P.CompletionLogprobs, b: P.CompletionLogprobs) -> P.CompletionLogprobs:
    return P.CompletionLogprobs(
        tokens=a.tokens + b.tokens,
        token_logprobs=a.token_logprobs + b.token_logprobs,
        top_logprobs=a.top_logprobs + b.top_logprobs,
        text_offset=a.text_offset + b.text_offset,
    )


def completion_logprobs(tok: Tokenizer, c: CompletionOutput, start: int, offset: int):
    lp = P.CompletionLogprobs()
    for token_id, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        text = tok.decode([token_id], skip_special_tokens=False)
        lp.tokens.append(text)
        lp.token_logprobs.append(entry[token_id])
        lp.top_logprobs.append(
            {tok.decode([t], skip_special_tokens=False): v for t, v in entry.items()}
        )
        lp.text_offset.append(offset)
        offset += len(text)
    return lp


async def completions(
    engine: AsyncEngine,
    tok: Tokenizer,
    model: str,
    req: P.CompletionRequest,
    tenant: str | None = None,
):
    scoring = req.echo and req.max_tokens == 0  # score the prompt only (lm-eval's requests)
    if scoring and req.stream:
        raise ValueError("max_tokens 0 (scoring the echoed prompt) is not supported with stream")
    prompt_lps = req.logprobs if req.echo and req.logprobs is not None else None
    if req.prompt_logprobs is not None:  # vLLM's field; the engine computes the larger k once
        if req.stream:
            raise ValueError("prompt_logprobs is not supported with stream; send stream false")
        prompt_lps = max(prompt_lps or 0, req.prompt_logprobs)
    structured = constraints.requested(req)
    if scoring and structured is not None:
        raise ValueError(f"{structured.source}: does not apply to max_tokens 0 (scoring)")
    params = sampling_params(
        req, 1 if scoring else req.max_tokens, req.logprobs, prompt_lps, structured
    )
    prompts = completion_prompts(req.prompt)
    rid = f"cmpl-{uuid.uuid4().hex}"
    streams = await add_all(engine, rid, prompts, params, tenant)
    if req.stream:
        return _stream_completions(tok, model, req, rid, streams)
    outs = await finals(streams)
    choices = []
    for i, out in enumerate(outs):
        prefix = (out.prompt or tok.decode(out.prompt_token_ids)) if req.echo else ""
        echoed = (
            echoed_logprobs(tok, out, req.logprobs)
            if req.echo and req.logprobs is not None
            else None
        )
        vllm_lps = (
            vllm_prompt_logprobs(tok, out, req.prompt_logprobs)
            if req.prompt_logprobs is not None
            else None
        )
        for c in out.outputs:
            lps = None
            if req.logprobs is not None:  # completion tokens sit after the prefix in the text
                lps = (
                    P.CompletionLogprobs()
                    if scoring
                    else completion_logprobs(tok, c, 0, len(prefix))
                )
                lps = joined(echoed, lps) if echoed else lps
            choices.append(
                P.CompletionChoice(
                    index=i * req.n + c.index,
                    text=prefix + ("" if scoring else c.text),
                    logprobs=lps,
                    finish_reason="length" if scoring else c.finish_reason,
                    stop_reason=None if scoring else c.stop_reason,
                    prompt_logprobs=vllm_lps,
                )
            )
    return P.CompletionResponse(
        id=rid, model=model, choices=choices, usage=usage(outs, scoring=scoring)
    )


async def _stream_completions(tok, model, req, rid, streams) -> AsyncIterator[str]:
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    finals: dict[int, RequestOutput] = {}
    done: set[int] = set()
    created = int(time.time())  # one stream, one creation time (as OpenAI's chunks carry)
    plain = DeltaEvents(
        lambda index, text: P.CompletionResponse(
            id=rid,
            model=model,
            created=created,
            choices=[P.CompletionChoice(index=index, text=text)],
        )
    )

    async for i, out in merged(streams):
        for c in out.outputs:
            index = i * req.n + c.index
            if index in done:
                continue
            if c.finish_reason is not None:
                done.add(index)
            if index not in sent_text and req.echo:
                prefix = out.prompt or tok.decode(out.prompt_token_ids)
                echoed = echoed_logprobs(tok, out) if req.logprobs is not None else None
                choice = P.CompletionChoice(index=index, text=prefix, logprobs=echoed)
                yield sse(
                    P.CompletionResponse(id=rid, model=model, created=created, choices=[choice])
                )
                sent_text.setdefault(index, 0)
            start_text, start_tok = sent_text.get(index, 0), sent_tokens.get(index, 0)
            delta = c.text[start_text:]
            if not delta and c.finish_reason is None:
                continue
            sent_text[index], sent_tokens[index] = len(c.text), len(c.token_ids)
            if c.finish_reason is None and req.logprobs is None and not req.continuous_usage:
                yield plain.event(index, delta)
                continue
            lps = (
                completion_logprobs(tok, c, start_tok, start_text)
                if req.logprobs is not None
                else None
            )
            yield sse(
                P.CompletionResponse(
                    id=rid,
                    model=model,
                    created=created,
                    choices=[
                        P.CompletionChoice(
                            index=index,
                            text=delta,
                            logprobs=lps,
                            finish_reason=c.finish_reason,
                            stop_reason=c.stop_reason,
                        )
                    ],
                    usage=so_far(out, c) if req.continuous_usage else None,
                )
            )
        if out.finished:
            finals[i] = out
    if req.stream_options and req.stream_options.include_usage:
        yield sse(
            P.CompletionResponse(
                id=rid, model=model, created=created, choices=[], usage=usage(list(finals.values()))
            )
        )
    yield "data: [DONE]\n\n"


# ---- chat ---------------------------------------------------------------------------------
def render_chat(
    tok: Tokenizer,
    req: P.ChatCompletionRequest,
    literal_content: bool = True,
    max_model_len: int | None = None,
    plan: ToolPlan | None = None,
) -> dict:
    messages = []
    for i, m in enumerate(req.messages):
        content = m.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text":
                    raise ValueError(
                        f"messages: content part {i}.{j} has type {part.type!r}; only 'text' "
                        "parts are supported by this model"
                    )
                if part.text is None:
                    raise ValueError(f"messages: content part {i}.{j} of type 'text' has no text")
            content = "".join(part.text or "" for part in content)
        messages.append({**m.model_dump(exclude_none=True), "content": content or ""})
    if any(m.get("tool_calls") for m in messages):
        messages = tool_calls.template_messages(messages)
    tools, template = (plan.tools, plan.chat_template) if plan is not None else (None, None)
    text, ids = tok.encode_chat(
        messages, req.add_generation_prompt, literal_content, req.chat_template_kwargs,
        max_model_len, tools, template,
    )  # fmt: skip
    return {"prompt": text, "prompt_token_ids": ids}


def tokenize(
    tok: Tokenizer,
    max_model_len: int | None,
    req,
    literal_content: bool = True,
    settings: ToolSettings | None = None,
) -> P.TokenizeResponse:
    """vLLM's /tokenize: chat messages (and tools) through the template a chat request would
    use, or a prompt (with the tokenizer's special tokens unless add_special_tokens is
    false). Not capped at max_model_len: the count says whether it fits."""
    if req.messages is not None:
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        template = tool_calls.chat_template(bool(tools), settings or ToolSettings(),
                                            tok.chat_template)  # fmt: skip
        plan = ToolPlan(tools, template, None, None)
        rendered = render_chat(tok, req, literal_content, None, plan)
        ids = rendered["prompt_token_ids"]
        if req.add_special_tokens:
            ids = tok.encode(rendered["prompt"], add_special_tokens=True)
    else:
        special = True if req.add_special_tokens is None else req.add_special_tokens
        ids = tok.encode(req.prompt, add_special_tokens=special)
    strs = [tok.id_to_token(i) or "" for i in ids] if req.return_token_strs else None
    return P.TokenizeResponse(
        count=len(ids), max_model_len=max_model_len or 0, tokens=ids, token_strs=strs
    )


def detokenize(tok: Tokenizer, vocab_size: int, req: P.DetokenizeRequest) -> P.DetokenizeResponse:
    bad = [t for t in req.tokens if t >= vocab_size]
    if bad:
        raise ValueError(f"tokens: token id {bad[0]} is out of range [0, {vocab_size})")
    return P.DetokenizeResponse(prompt=tok.decode(req.tokens, skip_special_tokens=False))


def chat_logprobs(tok: Tokenizer, c: CompletionOutput, start: int, k: int) -> P.ChatLogprobs:
    """Per token: its logprob and the k most likely tokens (the chosen one among them when it
    is one of the k: an entry holds the chosen token, then the top k)."""
    content = []
    for token_id, entry in zip(c.token_ids[start:], (c.logprobs or [])[start:]):
        text = tok.decode([token_id], skip_special_tokens=False)
        best = sorted(entry.items(), key=lambda kv: -kv[1])[:k]
        tops = [
            P.TopLogprob(
                token=tok.decode([t], skip_special_tokens=False),
                logprob=v,
                bytes=list(tok.decode([t], skip_special_tokens=False).encode()),
            )
            for t, v in best
        ]
        content.append(
            P.TokenLogprob(
                token=text, logprob=entry[token_id], bytes=list(text.encode()), top_logprobs=tops
            )
        )
    return P.ChatLogprobs(content=content)


def _plan_and_render(tok, req, literal_content, max_model_len, settings):
    plan = tool_calls.plan(req, settings, tok.chat_template)
    return plan, render_chat(tok, req, literal_content, max_model_len, plan)


async def chat(
    engine: AsyncEngine,
    tok: Tokenizer,
    model: str,
    req: P.ChatCompletionRequest,
    tenant: str | None = None,
    literal_content: bool = True,
    settings: ToolSettings | None = None,
):
    max_tokens = req.max_completion_tokens or req.max_tokens
    k = (req.top_logprobs or 0) if req.logprobs else None
    plan, prompt = await asyncio.to_thread(
        _plan_and_render, tok, req, literal_content, engine.max_model_len,
        settings or ToolSettings(),
    )  # off the event loop: templates, tokenizing, tool schemas  # fmt: skip
    special = plan.format is not None and plan.format.special_tokens
    if req.prompt_logprobs is not None and req.stream:
        raise ValueError("prompt_logprobs is not supported with stream; send stream false")
    params = sampling_params(
        req,
        max_tokens,
        k,
        req.prompt_logprobs,
        plan.constraint,
        skip_special_tokens=False if special else None,
    )
    rid = f"chatcmpl-{uuid.uuid4().hex}"
    streams = await add_all(engine, rid, [prompt], params, tenant)
    if req.stream:
        if plan.calls_tools:
            return _stream_tool_chat(tok, model, req, rid, streams, plan)
        return _stream_chat(tok, model, req, rid, streams, len(prompt["prompt_token_ids"]))
    (out,) = await finals(streams)
    eos = _eos_texts(tok)
    choices = []
    for c in out.outputs:
        msg = tool_calls.message(plan, c.text, eos) if plan.calls_tools else None
        choices.append(
            P.ChatChoice(
                index=c.index,
                message=msg or P.AssistantMessage(content=c.text),
                logprobs=chat_logprobs(tok, c, 0, k or 0) if req.logprobs else None,
                finish_reason=(
                    tool_calls.finish_reason(plan, msg, c.finish_reason) if msg else c.finish_reason
                ),
                stop_reason=c.stop_reason,
            )
        )
    return P.ChatCompletionResponse(
        id=rid,
        model=model,
        choices=choices,
        usage=usage([out]),
        prompt_logprobs=(
            vllm_prompt_logprobs(tok, out, req.prompt_logprobs)
            if req.prompt_logprobs is not None
            else None
        ),
    )


def _eos_texts(tok: Tokenizer) -> tuple[str, ...]:
    return tuple(t for t in (tok.special_tokens.get("eos_token"),) if t)


def chat_stream_end(req, rid: str, model: str, created: int, final) -> list[str]:
    """A chat stream's last events: the usage chunk when asked for, then [DONE]."""
    events = []
    if req.stream_options and req.stream_options.include_usage and final is not None:
        chunk = P.ChatCompletionChunk(
            id=rid, model=model, created=created, choices=[], usage=usage([final])
        )
        events.append(sse(chunk))
    return [*events, "data: [DONE]\n\n"]


async def _stream_tool_chat(tok, model, req, rid, streams, plan: ToolPlan) -> AsyncIterator[str]:
    """A chat stream whose output is read as tool calls: content deltas as they are surely
    content, each call's id and name once known, then its arguments in fragments."""
    created = int(time.time())
    eos = _eos_texts(tok)

    def chunk(index, delta, finish=None, usage_=None, lps=None) -> str:
        choice = P.ChatChunkChoice(index=index, delta=delta, logprobs=lps, finish_reason=finish)
        return sse(
            P.ChatCompletionChunk(
                id=rid, model=model, created=created, choices=[choice], usage=usage_
            )
        )

    parsers = {i: ToolCallStream(plan.format) for i in range(req.n)} if plan.format else {}
    named_ids = {i: call_id() for i in range(req.n)}
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    called: dict[int, bool] = {}
    done: set[int] = set()
    final = None
    for i in range(req.n):
        yield chunk(i, P.DeltaMessage(role="assistant", content=""))
    async for _, out in merged(streams):
        for c in out.outputs:
            if c.index in done:
                continue
            finished = c.finish_reason is not None
            if finished:
                done.add(c.index)
            start_tok = sent_tokens.get(c.index, 0)
            sent_tokens[c.index] = len(c.token_ids)
            lps = chat_logprobs(tok, c, start_tok, req.top_logprobs or 0) if req.logprobs else None
            if plan.named is not None:
                start = sent_text.get(c.index, 0)
                sent_text[c.index] = len(c.text)
                call: dict[str, Any] = {"index": 0, "function": {"arguments": c.text[start:]}}
                if not called.get(c.index):
                    called[c.index] = True
                    call = {"index": 0, "id": named_ids[c.index], "type": "function",
                            "function": {"name": plan.named, "arguments": c.text[start:]}}  # fmt: skip
                deltas = [call] if call["function"]["arguments"] or "id" in call else []
                content = ""
            else:
                text = tool_calls.strip_eos(c.text, eos) if finished else c.text
                content, deltas = parsers[c.index].feed(text, finished)
                if not plan.parallel:
                    deltas = [d for d in deltas if d["index"] == 0]
                called[c.index] = called.get(c.index, False) or bool(deltas)
            if content or deltas or lps:
                delta = P.DeltaMessage(
                    content=content or None,
                    tool_calls=[P.DeltaToolCall.model_validate(d) for d in deltas] or None,
                )
                yield chunk(c.index, delta, lps=lps)
            if finished:
                reason = c.finish_reason
                if called.get(c.index) and reason == "stop" and plan.named is None:
                    reason = "tool_calls"
                yield chunk(
                    c.index, P.DeltaMessage(), reason,
                    so_far(out, c) if req.continuous_usage else None,
                )  # fmt: skip
        if out.finished:
            final = out
    for event in chat_stream_end(req, rid, model, created, final):
        yield event


async def _stream_chat(tok, model, req, rid, streams, prompt_tokens: int) -> AsyncIterator[str]:
    sent_text: dict[int, int] = {}
    sent_tokens: dict[int, int] = {}
    done: set[int] = set()
    final = None
    created = int(time.time())
    plain = DeltaEvents(
        lambda index, text: P.ChatCompletionChunk(
            id=rid,
            model=model,
            created=created,
            choices=[P.ChatChunkChoice(index=index, delta=P.DeltaMessage(content=text))],
        )
    )

    for i in range(req.n):
        yield sse(
            P.ChatCompletionChunk(
                id=rid,
                model=model,
                created=created,
                choices=[
                    P.ChatChunkChoice(index=i, delta=P.DeltaMessage(role="assistant", content=""))
                ],
                usage=(
                    P.Usage(
                        prompt_tokens=prompt_tokens, completion_tokens=0, total_tokens=prompt_tokens
                    )
                    if req.continuous_usage
                    else None
                ),  # fmt: skip
            )
        )
    async for _, out in merged(streams):
        for c in out.outputs:
            if c.index in done:
                continue
            if c.finish_reason is not None:
                done.add(c.index)
            start_text, start_tok = sent_text.get(c.index, 0), sent_tokens.get(c.index, 0)
            delta = c.text[start_text:]
            if not delta and c.finish_reason is None:
                continue
            sent_text[c.index], sent_tokens[c.index] = len(c.text), len(c.token_ids)
            if c.finish_reason is None and not req.logprobs and not req.continuous_usage:
                yield plain.event(c.index, delta)
                continue
            yield sse(
                P.ChatCompletionChunk(
                    id=rid,
                    model=model,
                    created=created,
                    choices=[
                        P.ChatChunkChoice(
                            index=c.index,
                            delta=P.DeltaMessage(content=delta),
                            logprobs=chat_logprobs(tok, c, start_tok, req.top_logprobs or 0)
                            if req.logprobs
                            else None,
                            finish_reason=c.finish_reason,
                        )
                    ],
                    usage=so_far(out, c) if req.continuous_usage else None,
                )
            )
        if out.finished:
            final = out
    for event in chat_stream_end(req, rid, model, created, final):
        yield event
