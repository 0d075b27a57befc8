"""Running the service: uvicorn, the model loaded in the background, a graceful drain on SIGTERM.

The HTTP port is up at once (live = 200, ready = 503) while the model loads; if loading fails,
the server exits with the error. On SIGTERM (or
Ctrl-C) the server stops admitting work (ready -> 503), lets in-flight requests finish within a
grace period, then exits with status 0. A second signal stops it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from pathlib import Path

import uvicorn

from tokenmill.config import EngineConfig
from tokenmill.engine.async_engine import AsyncEngine
from tokenmill.serve.app import ServerState, build_app
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
        engine = self.state.engine
        while engine is not None and engine.num_in_flight and time.monotonic() < deadline:
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


def serve(
    config: EngineConfig,
    host: str,
    port: int,
    served_model_name: str | None = None,
    api_keys: list[str] | None = None,
    max_waiting: int | None = None,
    grace_s: float = 30.0,
    max_body_bytes: int = 4 << 20,
    usage: UsageOptions | None = None,
) -> None:
    from tokenmill.engine.engine import LLMEngine

    name = served_model_name or default_model_name(config.model.model)
    tracker = UsageTracker(usage, name, usage.instance) if usage else None
    state = ServerState(name, parse_api_keys(api_keys), max_body_bytes, usage=tracker)
    app = build_app(state)
    holder: dict[str, AsyncEngine] = {}
    failed: list[BaseException] = []

    def load() -> None:
        try:
            engine = AsyncEngine(LLMEngine(config), max_waiting)
        except Exception as exc:  # a server that can never be ready should not linger
            log.error("could not load the model: %s", exc)
            failed.append(exc)
            server.should_exit = True
            return
        engine.start()
        holder["engine"] = engine
        state.attach(engine)
        log.info("ready: serving %r on http://%s:%d/v1", state.model_name, host, port)

    @contextlib.asynccontextmanager
    async def lifespan(_):
        loader = threading.Thread(target=load, name="tokenmill-load", daemon=True)
        loader.start()
        yield
        # A stop during loading waits for the load to end (bounded): a daemon thread still inside
        # torch at interpreter exit aborts the process ("terminate called ...").
        loader.join(timeout=LOAD_JOIN_S)
        if "engine" in holder:
            holder["engine"].shutdown()
        if tracker is not None:
            tracker.close()  # the last partial interval, then the store

    app.router.lifespan_context = lifespan
    cfg = uvicorn.Config(
        app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5, access_log=False
    )
    server = DrainingServer(cfg, state, grace_s)
    asyncio.run(server.serve())
    if failed:
        raise failed[0]
