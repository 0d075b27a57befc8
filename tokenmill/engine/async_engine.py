"""AsyncEngine: the server's front: one async stream per request over a core client.

The core runs in its own process (`ProcessCoreClient`, the server's default) or on a thread
(`InprocCoreClient`); either way the front tokenizes in a worker thread (never on the event
loop), sends values, and turns the core's deltas into `RequestOutput`s on the client's thread
(detokenizing, stop strings), handing each stream its own copies. A stream closed before its
request finished (client gone, task cancelled) aborts the request in the core, which frees its
KV blocks before the next step. If the core dies, every stream gets `EngineDeadError` at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tokenmill.config import EngineConfig
from tokenmill.engine.core_client import (
    CoreClient,
    EngineDeadError,
    InprocCoreClient,
    ProcessCoreClient,
)
from tokenmill.engine.input_processor import InputProcessor, PromptType
from tokenmill.engine.messages import EngineCoreOutputs, EngineStats, ModelInfo
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.outputs import RequestOutput
from tokenmill.models.tokenizer import Tokenizer
from tokenmill.sampling_params import SamplingParams

log = logging.getLogger(__name__)

__all__ = ["AsyncEngine", "EngineDeadError", "QueueFullError", "RequestStream"]


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(
        self, client: CoreClient, tokenizer: Tokenizer, max_waiting: int | None = None
    ) -> None:
        self.client = client
        self.info: ModelInfo = client.info
        self.tokenizer = tokenizer
        self.max_waiting = max_waiting
        self.inputs = InputProcessor(tokenizer, self.info.vocab_size, self.info.max_model_len)
        self.outputs = OutputProcessor(tokenizer)
        self._lock = threading.Lock()  # outputs, streams and tenants: event loop vs client thread
        self._streams: dict[str, _Stream] = {}
        self._no_output_yet: set[str] = set()  # "waiting": added, no token back yet
        self._stats = EngineStats(0, 0, 0, self.info.num_blocks, 0.0, 0.0, 0)
        self.on_output: Callable[[RequestOutput], None] | None = None  # metrics, client thread
        self.on_step: Callable[[EngineCoreOutputs], None] | None = None  # the same, per step
        self.on_dead: Callable[[str], None] | None = None  # the server's exit policy
        self.tenants: dict[str, str] = {}  # request id -> who it is served for (accounting)
        self.busy_s = 0.0  # seconds spent in engine steps: utilization for modeled power
        self.last_progress = time.monotonic()  # the core's last outputs (or going busy)
        client.on_outputs = self._on_core_outputs
        client.on_dead = self._on_core_dead

    @classmethod
    def build(
        cls, config: EngineConfig, engine_process: bool = True, max_waiting: int | None = None
    ) -> AsyncEngine:
        """Load the model (in the core's process, or here) and make the front for it."""
        if engine_process:
            from tokenmill.models.loader import load_tokenizer

            client: CoreClient = ProcessCoreClient(config)
            try:
                tokenizer = load_tokenizer(config.model.model)
            except BaseException:
                client.shutdown()
                raise
            return cls(client, tokenizer, max_waiting)
        from tokenmill.engine.core import EngineCore
        from tokenmill.executor import executor_for
        from tokenmill.executor.uniproc import UniprocExecutor

        executor = executor_for(config)
        core = EngineCore(config, executor)
        if isinstance(executor, UniprocExecutor):
            tokenizer = executor.worker.loaded.tokenizer
        else:
            from tokenmill.models.loader import load_tokenizer

            tokenizer = load_tokenizer(config.model.model)
        return cls(InprocCoreClient(core), tokenizer, max_waiting)

    def start(self) -> None:
        self.client.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self.client.shutdown(timeout)

    @property
    def max_model_len(self) -> int:
        return self.info.max_model_len

    @property
    def is_dead(self) -> bool:
        return self.client.dead_reason is not None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def stalled_for(self) -> float:
        """Seconds the core has sent nothing while requests are in flight (0 when idle): what
        the fleet supervisor reads to find a hung core."""
        return time.monotonic() - self.last_progress if self._streams else 0.0

    def stats(self) -> EngineStats:
        return self._stats

    # ---- caller side (event loop) --------------------------------------------------------
    async def add(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        tenant: str | None = None,
    ) -> RequestStream:
        """Queue a request; ValueError for invalid input, QueueFullError when full,
        EngineDeadError when the core is gone."""
        text, request = await asyncio.to_thread(self.inputs.process, request_id, prompt, params)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._lock:
            if self.is_dead:
                raise EngineDeadError(f"the engine core is gone: {self.client.dead_reason}")
            if self.max_waiting is not None and len(self._no_output_yet) >= self.max_waiting:
                raise QueueFullError(f"{len(self._no_output_yet)} requests are waiting")
            if request_id in self.outputs.requests:
                raise ValueError(f"request_id {request_id!r} is already in use")
            self.outputs.add(
                request_id, text, request.prompt_token_ids, params, request.arrival_time
            )
            if not self._streams:  # idle until now: waiting starts here, not at the last step
                self.last_progress = time.monotonic()
            self._streams[request_id] = stream
            self._no_output_yet.add(request_id)
            if tenant is not None:
                self.tenants[request_id] = tenant
        self.client.add(request)
        return RequestStream(self, request_id, stream)

    async def generate(
        self, request_id: str, prompt: PromptType, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come (add + iterate)."""
        stream = await self.add(request_id, prompt, params)
        async for out in stream:
            yield out

    def abort(self, request_id: str) -> None:
        """End a request now: its final output (finish_reason "abort") goes to its stream."""
        with self._lock:
            final = self.outputs.abort(request_id)
            if final is not None:
                self._deliver([final])
        self.client.abort([request_id])

    # ---- client thread -------------------------------------------------------------------
    def _on_core_outputs(self, result: EngineCoreOutputs) -> None:
        self.last_progress = time.monotonic()
        with self._lock:
            self._stats = result.stats
            self.busy_s += result.step_s
            outputs, to_abort = self.outputs.process(result.outputs)
            self._deliver(outputs)
            if self.on_step is not None:
                try:
                    self.on_step(result)
                except Exception:
                    log.exception("step observer failed")
        if to_abort:
            self.client.abort(to_abort)

    def _on_core_dead(self, reason: str) -> None:
        error = EngineDeadError(f"the engine core is gone: {reason}")
        with self._lock:
            for request_id in list(self.outputs.requests):
                final = self.outputs.abort(request_id, "error")
                if final is not None and self.on_output is not None:
                    self._observe(final)
            for stream in self._streams.values():
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
            self._streams.clear()
            self._no_output_yet.clear()
            self.tenants.clear()
        if self.on_dead is not None:
            self.on_dead(reason)

    def _observe(self, out: RequestOutput) -> None:
        try:
            self.on_output(out)  # type: ignore[misc]
        except Exception:
            log.exception("metrics observer failed")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Caller holds the lock. One wake-up of each event loop per call (per core step),
        not one per output: 64 streams cost one self-pipe write, not 64."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for out in outputs:
            self._no_output_yet.discard(out.request_id)
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
            if self.on_output is not None:
                self._observe(out)
            if out.finished:
                self.tenants.pop(out.request_id, None)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in by_loop.items():
            loop.call_soon_threadsafe(_put_all, items)


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, out in items:
        queue.put_nowait(out)


class RequestStream:
    """Async iterator over one request's outputs; closing it early aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, stream: _Stream) -> None:
        self.engine = engine
        self.request_id = request_id
        self._stream = stream
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                out = await self._stream.queue.get()
                if isinstance(out, BaseException):
                    self.finished = True
                    raise out
                self.finished = out.finished
                yield out
        finally:
            self.close()

    def close(self) -> None:
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)

    async def final(self) -> RequestOutput:
        last = None
        try:
            async for out in self:
                last = out
        finally:
            self.close()
        assert last is not None
        return last
