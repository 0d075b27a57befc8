"""Running the service: uvicorn, the model loaded in the background, a graceful drain on SIGTERM.

The HTTP port is up at once (live = 200, ready = 503) while the engine core loads the model (in
its own process by default); if loading fails, the server exits with the error. On SIGTERM (or
Ctrl-C) the server stops admitting work (ready -> 503), lets in-flight requests finish within a
grace period, then exits with status 0. A second signal stops it at once. If the engine core
dies, readiness turns 503 at once, every request in flight ends with an error, and the server
exits with status 1 so that an orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path

import uvicorn

from tokenmill.config import EngineConfig, ServeConfig
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.serve.app import ServerState, build_app
from tokenmill.serve.tool_calls import ToolSettings
from tokenmill.serve.usage import UsageOptions, UsageTracker

log = logging.getLogger(__name__)
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
LOAD_JOIN_S = 60.0  # how long a stop waits for a model load in progress


def default_model_name(model: str) -> str:
    if model == "default":
        return DEFAULT_MODEL_NAME
    path = Path(model)
    return path.stem if path.suffix == ".gguf" else path.name


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, grace_s: float) -> None:
        super().__init__(config)
        self.state = state
        self.grace_s = grace_s

    def handle_exit(self, sig, frame) -> None:  # not re-raised: a drained exit is a clean exit
        if self.state.draining:
            self.should_exit = self.force_exit = True
            return
        log.info("signal %s: draining (grace %.0f s)", sig, self.grace_s)
        self.state.draining = True
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        deadline = time.monotonic() + self.grace_s
        while self.state.num_in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        self.should_exit = True


def parse_api_keys(values: list[str] | None) -> dict[str, str | None] | None:
    """`KEY` or `NAME=KEY` (the name is the tenant in usage accounting) -> {key: name}."""
    if not values:
        return None
    keys: dict[str, str | None] = {}
    for value in values:
        name, sep, key = value.partition("=")
        if not sep:
            name, key = "", value
        if not key:
            raise ValueError(f"empty API key in {value!r}; use KEY or NAME=KEY")
        keys[key] = name or None
    return keys


def tool_settings(opts: ServeConfig) -> ToolSettings:
    """--tool-call-parser, --enable-auto-tool-choice and --chat-template (read once, here:
    a missing file is an error at start, not in a request)."""
    template = None
    if opts.chat_template is not None:
        path = Path(opts.chat_template)
        if not path.is_file():
            raise ValueError(f"chat_template: no file {path}")
        template = path.read_text()
    return ToolSettings(opts.tool_call_parser, opts.enable_auto_tool_choice, template)


def server_state(name: str, opts: ServeConfig, tracker: UsageTracker | None = None) -> ServerState:
    keys = parse_api_keys(list(opts.api_key) + list(opts.admin_key))
    admins = set(parse_api_keys(list(opts.admin_key)) or {})
    if tracker is not None:
        tracker.tenant_labels = opts.metrics_tenants
    return ServerState(
        name, keys, opts.max_body_bytes, usage=tracker, strict_api=opts.strict_api,
        admin_keys=admins, max_request_sequences=opts.max_request_sequences,
        body_timeout_s=opts.body_timeout, literal_content=not opts.special_tokens_in_content,
        embedding_pooling=opts.embedding_pooling, tools=tool_settings(opts),
    )  # fmt: skip


def serve(config: EngineConfig, opts: ServeConfig, usage: UsageOptions | None = None) -> int:
    """Serve until stopped; the exit status (0 drained, 1 engine core lost)."""
    name = opts.served_model_name or default_model_name(config.model.model)
    tracker = UsageTracker(usage, name, usage.instance) if usage else None
    state = server_state(name, opts, tracker)
    holder: dict[str, AsyncEngine] = {}
    lost: list[str] = []

    def load(server: uvicorn.Server) -> None:
        engine = AsyncEngine.build(config, opts.engine_process, opts.max_waiting)

        def on_dead(reason: str) -> None:
            lost.append(reason)
            server.should_exit = True

        engine.on_dead = on_dead
        holder["engine"] = engine
        if server.should_exit:  # stopped while loading
            return
        engine.start()
        state.attach(engine)
        mode = "its own process" if opts.engine_process else "a thread"
        log.info("ready: serving %r on http://%s:%d/v1 (engine core in %s)", state.model_name,
                 opts.host, opts.port, mode)  # fmt: skip

    def close() -> None:
        if "engine" in holder:
            holder["engine"].shutdown()
        if tracker is not None:
            tracker.close()  # the last partial interval, then the store

    run_server(state, opts, load, close)
    if lost:
        log.error("exiting with status 1: the engine core died (%s)", lost[0])
        return 1
    return 0


def serve_fleet(path: str, opts: ServeConfig, usage: UsageOptions | None = None,
                hang_after: float = 120.0, defaults: dict | None = None,
                ray_address: str | None = None) -> int:  # fmt: skip
    """Serve every instance of FLEET.toml behind this one endpoint until stopped: each bound
    to its slice in its own engine-core process, routed by `model`, restarted with backoff by
    the supervisor when it dies or hangs (the server itself does not exit for that). Errors in
    the file or a layout that does not fit this machine stop it before anything starts."""
    from tokenmill.fleet.config import load_fleet
    from tokenmill.fleet.front import Fleet
    from tokenmill.fleet.instances import bind_fleet, bind_fleet_ray
    from tokenmill.partition.binder import local_devices
    from tokenmill.partition.profiles import cpu_topology, find_gpu

    fleet_config = load_fleet(path, defaults or {})
    if opts.served_model_name is not None:
        raise ValueError("served_model_name: with --config each instance's `name` is its served "
                         "model name; leave --served-model-name out")  # fmt: skip
    if ray_address is not None:  # every replica a Ray actor, placed by Ray's scheduler
        from tokenmill.fleet.ray_client import connect

        instances = bind_fleet_ray(fleet_config)
        connect(ray_address)
    else:
        devices = local_devices()
        gpu = find_gpu(devices[0].name) if devices else None
        instances = bind_fleet(fleet_config, cpu_topology(), devices, gpu)
    for inst in instances:
        log.info("instance %s (%s): %s, %.3g of the device%s", inst.name, inst.spec.model,
                 inst.describe(), inst.share,
                 "".join(f"; {n}" for n in inst.binding.notes))  # fmt: skip
    fleet = Fleet(instances, usage, opts.metrics_tenants if usage else False, hang_after)
    state = server_state(",".join(sorted({i.model_name for i in instances})), opts)
    state.fleet = fleet

    def load(server: uvicorn.Server) -> None:
        fleet.start()
        log.info("ready: serving %s on http://%s:%d/v1 (%d instances)",
                 ", ".join(map(repr, fleet.models)), opts.host, opts.port, len(instances))  # fmt: skip

    run_server(state, opts, load, fleet.stop)
    return 0


def run_server(state: ServerState, opts: ServeConfig, load, close) -> None:
    """uvicorn on `state`'s app: the port up at once, `load(server)` on a thread (an exception
    there stops the server and is raised here), `close()` once it has stopped."""
    app = build_app(state)
    failed: list[BaseException] = []

    def loading() -> None:
        try:
            load(server)
        except Exception as exc:  # a server that can never be ready should not linger
            log.error("could not load the model: %s", exc)
            failed.append(exc)
            server.should_exit = True

    @contextlib.asynccontextmanager
    async def lifespan(_):
        loader = threading.Thread(target=loading, name="tokenmill-load", daemon=True)
        loader.start()
        yield
        # A stop during loading waits for the load to end (bounded): a daemon thread still inside
        # torch at interpreter exit aborts the process ("terminate called ...").
        loader.join(timeout=LOAD_JOIN_S)
        close()

    app.router.lifespan_context = lifespan
    cfg = uvicorn.Config(
        app,
        host=opts.host,
        port=opts.port,
        log_level="info",
        timeout_graceful_shutdown=5,
        access_log=False,
        http=header_timeout_protocol(opts.header_timeout) or "auto",
    )
    server = DrainingServer(cfg, state, opts.grace_period)
    with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
        runner.run(server.serve())
    if failed:
        raise failed[0]


def event_loop_factory():
    """uvloop's event loop when installed (a libuv loop: fewer microseconds per wake-up and per
    socket write than asyncio's, which a streamed token pays several times), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def header_timeout_protocol(timeout_s: float):
    """uvicorn's httptools protocol with a deadline on each request's line and headers: a
    connection that has not sent them whole within `timeout_s` (of connecting, or of a
    kept-alive request's first byte) gets 408 and is closed. uvicorn times idle keep-alive
    connections, not slow headers. None where httptools is not installed."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    body = b'{"error": {"message": "the request headers took too long; send them whole", ' \
           b'"type": "invalid_request_error", "param": null, "code": "timeout"}}'  # fmt: skip
    refusal = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )

    class HeaderDeadlineProtocol(HttpToolsProtocol):
        _header_deadline = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            if self._header_deadline is None:
                self._header_deadline = self.loop.call_later(timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _too_slow(self) -> None:
            self._header_deadline = None
            if not self.transport.is_closing():
                log.info("closing a connection whose request headers took over %.0f s", timeout_s)
                self.transport.write(refusal)
                self.transport.close()

    return HeaderDeadlineProtocol
