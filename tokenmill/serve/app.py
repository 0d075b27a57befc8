"""The FastAPI app: OpenAI routes, NIM-style health, Prometheus metrics, OpenAI-shaped errors.

Every error leaves as `{"error": {"message", "type", "param", "code"}}` with a 4xx status that
says whose fault it is; nothing a client sends can crash the server or leak a stack trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

import tokenmill
from tokenmill.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from tokenmill.fleet.router import Unavailable
from tokenmill.serve import handlers, responses
from tokenmill.serve import protocol as P
from tokenmill.serve.limits import LimitExceeded, RequestLimits
from tokenmill.serve.metrics import ServingMetrics
from tokenmill.serve.tool_calls import ToolSettings
from tokenmill.serve.usage import UsageTracker

if TYPE_CHECKING:
    from tokenmill.fleet.front import Fleet

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type_,
            param,
            code,
        )
        self.headers = headers


@dataclass
class ServerState:
    model_name: str
    api_keys: dict[str, str | None] | None = None  # key -> tenant name (None: use `user`)
    max_body_bytes: int = 4 << 20
    engine: AsyncEngine | None = None  # None while the model loads
    max_model_len: int | None = None
    draining: bool = False
    usage: UsageTracker | None = None  # accounting and energy; None when switched off
    strict_api: bool = False  # unknown request fields: 400 instead of a warning
    admin_keys: set[str] = field(default_factory=set)  # keys that read every tenant's usage
    max_request_sequences: int = 256  # prompts x n per request
    body_timeout_s: float = 30.0  # a stalled body ends with 408
    literal_content: bool = True  # special-token text in chat content is plain text
    embedding_pooling: str = "last"  # /v1/embeddings: "last" or "mean"
    tools: ToolSettings = field(default_factory=ToolSettings)  # parser, auto choice, template
    fleet: Fleet | None = None  # serve --config: several models and instances, routed
    metrics: ServingMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = ServingMetrics(lambda: self.engine, self.model_name)
        if self.usage is not None:
            self.metrics.registry.register(self.usage)

    @property
    def registry(self):
        return self.fleet.registry if self.fleet is not None else self.metrics.registry

    def served(self) -> list[tuple[str, int | None]]:
        """(model name, max_model_len) of every model served."""
        if self.fleet is not None:
            return [(n, m.max_model_len) for n, m in self.fleet.models.items()]
        return [(self.model_name, self.max_model_len)]

    def resolve(self, name: str | None) -> tuple[str, Any]:
        """The served model a request names and its engine (a fleet's: the router in front of
        its replicas); APIError 404 for a model not served, 400 when a fleet's request names
        none, 503 while not ready."""
        names = [n for n, _ in self.served()] if self.fleet is None or self.fleet.models else []
        if self.fleet is not None and name is None and len(self.fleet.models) != 1:
            raise APIError(400, "model is required: this server serves "
                           f"{', '.join(map(repr, names)) or 'several models'}", param="model")  # fmt: skip
        if name is not None and names and name not in names:
            raise APIError(
                404,
                f"model {name!r} does not exist; this server serves {', '.join(map(repr, names))}",
                "not_found_error",
                "model",
                "model_not_found",
            )
        if not self.ready:
            raise APIError(
                503,
                "the server is not ready (loading or draining); retry later",
                "service_unavailable",
                headers={"Retry-After": "1"},
            )
        if self.fleet is not None:
            chosen = name if name is not None else names[0]
            return chosen, self.fleet.model(chosen)
        assert self.engine is not None
        return self.model_name, self.engine

    def attach(self, engine: AsyncEngine) -> None:
        """The model is loaded: start serving it."""
        usage = self.usage
        if usage is not None:
            usage.start(engine)

            def observe(out) -> None:
                self.metrics.observe(out)
                usage.observe(out)

            engine.on_output = observe
        else:
            engine.on_output = self.metrics.observe
        engine.on_step = self.metrics.observe_step
        self.max_model_len = engine.max_model_len
        self.engine = engine

    @property
    def num_in_flight(self) -> int:
        if self.fleet is not None:
            return self.fleet.num_in_flight
        return self.engine.num_in_flight if self.engine is not None else 0

    @property
    def ready(self) -> bool:
        if self.fleet is not None:
            return not self.draining and self.fleet.ready
        return self.engine is not None and not self.draining and not self.engine.is_dead


def error_response(e: APIError) -> JSONResponse:
    body = P.ErrorResponse(
        error=P.ErrorDetail(message=e.message, type=e.type, param=e.param, code=e.code)
    )
    return JSONResponse(body.model_dump(), status_code=e.status, headers=e.headers)


def value_error(exc: ValueError) -> APIError:
    text = str(exc)
    param = re.match(r"^([a-z_][a-z_0-9.\[\]]*)[ :]", text)
    code = "context_length_exceeded" if "context_length_exceeded" in text else None
    return APIError(400, text, param=param.group(1) if param else None, code=code)


async def until_disconnect(coro, request: Request):
    """Await `coro`; if the client disconnects first, cancel it and return None."""
    task = asyncio.ensure_future(coro)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    log.info("client disconnected; request aborted")
    return None


def own_usage(report: dict, tenant: str | None) -> dict:
    """The report as one tenant may see it: its rows and their sums, nobody else's. A key
    without a NAME has no tenant identity and sees no rows."""
    rows = [t for t in report["tenants"] if tenant is not None and t["tenant"] == tenant]
    tokens = sum(t["prompt_tokens"] + t["completion_tokens"] for t in rows)
    usd = sum(t["cost_usd"] or 0.0 for t in rows)
    total = {
        "tokens": tokens,
        "energy_joules": sum(t["energy_joules"] for t in rows),
        "cost_usd": usd,
        "cost_per_million_tokens": usd / tokens * 1e6 if tokens else None,
    }
    return {"prices": report["prices"], "instances": [], "tenants": rows, "total": total}


def needs_key(path: str) -> bool:
    """/v1/ (health and metrics excepted: probes and scrapers send no key), and vLLM's
    /tokenize and /detokenize (they run the tokenizer: a cost, so not for anyone)."""
    if path in ("/tokenize", "/detokenize"):
        return True
    return path.startswith("/v1/") and not path.startswith("/v1/health") and path != "/v1/metrics"


class APIKeys:
    """API keys where `needs_key`, as a plain ASGI middleware: Starlette's
    `BaseHTTPMiddleware` would relay every streamed chunk through a memory stream and a task,
    a third of the front's CPU per token. Puts the key's tenant name and admin flag in the
    request's state."""

    def __init__(self, app, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope, receive, send) -> None:
        keys = self.state.api_keys
        path = scope.get("path", "")
        if scope["type"] != "http" or not keys or not needs_key(path):
            return await self.app(scope, receive, send)
        auth = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        given = auth[7:] if auth[:7].lower() == b"bearer " else b""
        match = [k for k in keys if hmac.compare_digest(given, k.encode())]
        if not match:
            refusal = APIError(
                401,
                "missing or invalid API key; send 'Authorization: Bearer <key>'",
                "authentication_error",
                code="invalid_api_key",
            )
            return await error_response(refusal)(scope, receive, send)
        scope["state"] = {
            **scope.get("state", {}),
            "key_name": keys[match[0]],
            "is_admin": match[0] in self.state.admin_keys,
        }
        await self.app(scope, receive, send)


def build_app(state: ServerState) -> FastAPI:
    app = FastAPIOffline(  # /docs and /redoc with their scripts served here, never from a CDN
        title="tokenmill",
        version=tokenmill.__version__,
        description="OpenAI-compatible LLM inference microservice",
    )
    app.state.tm = state

    @app.exception_handler(APIError)
    async def _api_error(_: Request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, "request body is not valid JSON"))
        text = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        named = re.match(r"^([a-z_]+) ", text)  # a model-level check names its field first
        param = loc[0] if loc else named.group(1) if named else None
        return error_response(APIError(400, f"{'.'.join(loc) or 'body'}: {text}", param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, e: StarletteHTTPException):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        code = e.code if isinstance(e, LimitExceeded) else None
        return error_response(APIError(e.status_code, str(e.detail), kind, None, code, e.headers))

    app.add_middleware(
        RequestLimits, max_body_bytes=state.max_body_bytes, body_timeout_s=state.body_timeout_s
    )

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, e: Exception):
        log.exception("unhandled error")
        return error_response(APIError(500, "internal server error", "server_error"))

    app.add_middleware(APIKeys, state=state)

    resolve = state.resolve

    async def run(coro, request: Request):
        """The handler's result; a client that disconnects first cancels it, which closes its
        request streams and so aborts them in the core (streaming or not)."""
        try:
            result = await until_disconnect(coro, request)
        except ValueError as e:
            raise value_error(e) from None
        except EngineDeadError as e:
            raise APIError(
                503, str(e), "service_unavailable", headers={"Retry-After": "5"}
            ) from None
        except Unavailable as e:  # a fleet's model with no replica up (restarting)
            wait = str(max(1, int(e.retry_after + 0.999)))
            raise APIError(
                503, str(e), "service_unavailable", "model", headers={"Retry-After": wait}
            ) from None
        except QueueFullError as e:
            raise APIError(
                429,
                f"too many requests waiting ({e}); retry later",
                "rate_limit_error",
                headers={"Retry-After": "1"},
            ) from None
        if result is None:  # the client is gone; nobody reads this
            return Response(status_code=499)
        if isinstance(result, P.BaseModel):
            return result
        return StreamingResponse(handlers.ending_on_error(result), media_type="text/event-stream")

    def check_fields(req: P.RequestModel) -> None:
        """Unknown fields: named in a warning (and ignored), or refused with --strict-api."""
        unknown = sorted(req.model_extra or {})
        if not unknown:
            return
        if state.strict_api:
            raise APIError(
                400,
                f"unknown field(s) {unknown}: not supported by this server",
                param=unknown[0],
                code="unsupported_field",
            )
        log.warning("ignoring unknown request field(s): %s", ", ".join(unknown))

    def check_sequences(count: int, field: str, what: str) -> None:
        if count > state.max_request_sequences:
            raise APIError(
                400,
                f"{field}: {count} {what} exceed this server's limit of "
                f"{state.max_request_sequences} per request; split the request",
                param=field,
            )

    def tenant(request: Request, user: str | None) -> str:
        """The API key's name, else the request's `user`, else anonymous."""
        return getattr(request.state, "key_name", None) or user or "anonymous"

    @app.post("/v1/completions", response_model=P.CompletionResponse)
    async def completions(req: P.CompletionRequest, request: Request):
        name, engine = resolve(req.model)
        check_fields(req)
        check_sequences(len(handlers.completion_prompts(req.prompt)) * req.n, "prompt",
                        "sequences (prompts x n)")  # fmt: skip
        who = tenant(request, req.user)
        coro = handlers.completions(engine, engine.tokenizer, name, req, who)
        return await run(coro, request)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse)
    async def chat(req: P.ChatCompletionRequest, request: Request):
        name, engine = resolve(req.model)
        check_fields(req)
        who = tenant(request, req.user)
        coro = handlers.chat(
            engine, engine.tokenizer, name, req, who, state.literal_content, state.tools
        )
        return await run(coro, request)

    @app.post("/v1/responses", response_model=P.ResponseObject)
    async def create_response(req: P.ResponsesRequest, request: Request):
        """OpenAI's Responses API, the text subset (serve/responses.py): text or message input,
        instructions, text.format (structured outputs), streaming events. Not stored."""
        name, engine = resolve(req.model)
        check_fields(req)
        who = tenant(request, req.user)
        coro = responses.respond(engine, engine.tokenizer, name, req, who, state.literal_content)
        return await run(coro, request)

    @app.get("/v1/responses/{response_id}", include_in_schema=False)  # always a 404
    async def get_response(response_id: str):
        raise APIError(
            404,
            f"response {response_id!r} not found: this server does not store responses "
            "(send the conversation again as input)",
            "not_found_error",
            param="response_id",
        )

    @app.post("/v1/embeddings", response_model=P.EmbeddingResponse)
    async def embeddings(req: P.EmbeddingRequest, request: Request):
        name, engine = resolve(req.model)
        check_fields(req)
        check_sequences(len(handlers.completion_prompts(req.input)), "input", "inputs")
        who = tenant(request, req.user)
        coro = handlers.embeddings(engine, name, req, state.embedding_pooling, who)
        return await run(coro, request)

    @app.get("/v1/usage")
    async def usage(request: Request):
        """Tokens, energy and derived cost per model, instance and tenant (persisted). With API
        keys, a tenant's key sees its own rows only; an --admin-key sees every tenant."""
        if state.fleet is not None and state.fleet.usage:
            report = state.fleet.usage_report()
        elif state.usage is None:
            raise APIError(404, "usage accounting is off on this server", "not_found_error")
        else:
            report = state.usage.report()
        if not state.api_keys or getattr(request.state, "is_admin", False):
            return report
        return own_usage(report, getattr(request.state, "key_name", None))

    @app.get("/v1/models", response_model=P.ModelList)
    async def models():
        return P.ModelList(data=[P.ModelCard(id=n, max_model_len=m) for n, m in state.served()])

    @app.get("/v1/models/{model_id:path}", response_model=P.ModelCard)
    async def model(model_id: str):
        served = dict(state.served())
        if model_id not in served:
            raise APIError(
                404,
                f"model {model_id!r} does not exist; this server serves "
                f"{', '.join(map(repr, served))}",
                "not_found_error",
                "model",
                "model_not_found",
            )
        return P.ModelCard(id=model_id, max_model_len=served[model_id])

    @app.post("/tokenize", response_model=P.TokenizeResponse)
    async def tokenize(req: P.TokenizeRequest):
        """vLLM's: a prompt, or chat messages rendered by the model's template, to token ids."""
        _, engine = resolve(req.model)
        check_fields(req)
        try:
            return await asyncio.to_thread(
                handlers.tokenize,
                engine.tokenizer,
                engine.max_model_len,
                req,
                state.literal_content,
                state.tools,
            )
        except ValueError as e:
            raise value_error(e) from None

    @app.post("/detokenize", response_model=P.DetokenizeResponse)
    async def detokenize(req: P.DetokenizeRequest):
        _, engine = resolve(req.model)
        check_fields(req)
        try:
            return handlers.detokenize(engine.tokenizer, engine.info.vocab_size, req)
        except ValueError as e:
            raise value_error(e) from None

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping():
        """SageMaker's health probe, as vLLM serves it."""
        return await ready()

    @app.get("/v1/health/live")
    async def live():
        return {"status": "live"}

    @app.get("/v1/health/ready")
    async def ready():
        if not state.ready:
            raise APIError(503, "not ready", "service_unavailable", headers={"Retry-After": "1"})
        return {"status": "ready"}

    @app.get("/health")
    async def health():
        return await ready()

    @app.get("/v1/health/instances")
    async def instances():
        """A fleet's instances: model, up or down, restarts, slice, process (one entry, the
        server's own engine, without --config)."""
        if state.fleet is not None:
            return {"instances": state.fleet.health()}
        engine = state.engine
        up = engine is not None and not engine.is_dead
        return {"instances": [{"instance": state.model_name, "model": state.model_name,
                               "status": "up" if up else "down", "restarts": 0}]}  # fmt: skip

    @app.get("/version")
    async def version():
        return {"version": tokenmill.__version__}

    @app.get("/metrics")
    @app.get("/v1/metrics", include_in_schema=False)  # NIM's path
    async def metrics():
        return Response(generate_latest(state.registry), media_type=CONTENT_TYPE_LATEST)

    return app
