"""AsyncEngine: the LLMEngine stepped on its own thread, one async stream per request.

The HTTP event loop never waits for a model step: adds and aborts are queued to the engine
thread and applied between steps; outputs come back through each request's asyncio.Queue.
A stream that is closed before its request finished (client gone, task cancelled) aborts the
request, so its KV blocks are freed at the next step boundary.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass

from tokenmill.engine.engine import EngineStats, LLMEngine, PromptType
from tokenmill.engine.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Too many requests are waiting; the caller should retry later (HTTP 429)."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int | None = None) -> None:
        self.engine = engine
        self.max_waiting = max_waiting
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tokenmill-engine", daemon=True)
        self._stats = engine.stats()
        self.on_output = None  # callable(RequestOutput) run on the engine thread (metrics)
        self.tenants: dict[str, str] = {}  # request id -> who it is served for (accounting)
        self.busy_s = 0.0  # seconds spent in engine steps: utilization for modeled power

    def start(self) -> None:
        self._thread.start()

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(None)
        self._thread.join(timeout)

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    def stats(self) -> EngineStats:
        return self._stats

    # ---- caller side (event loop) ------------------------------------------------------
    async def add(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        tenant: str | None = None,
    ) -> RequestStream:
        """Queue a request; raises ValueError for invalid input, QueueFullError when full."""
        if tenant is not None:
            self.tenants[request_id] = tenant
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        done: Future = Future()
        self._commands.put(("add", request_id, prompt, params, stream, done))
        await asyncio.wrap_future(done)
        return RequestStream(self, request_id, stream)

    async def generate(
        self, request_id: str, prompt: PromptType, params: SamplingParams
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as they come (add + iterate)."""
        stream = await self.add(request_id, prompt, params)
        async for out in stream:
            yield out

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    # ---- engine thread -----------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stop.is_set():
            block = not self.engine.has_unfinished()
            self._apply_commands(block)
            if self._stop.is_set():
                break
            start = time.perf_counter()
            try:
                outputs = self.engine.step()
            except Exception as exc:  # a bug, not bad input: fail the requests, keep serving
                log.exception("engine step failed")
                outputs = self.engine.abort(list(self.engine.groups))
                for stream in list(self._streams.values()):
                    stream.loop.call_soon_threadsafe(stream.queue.put_nowait, exc)
            self.busy_s += time.perf_counter() - start
            self._stats = self.engine.stats()
            self._deliver(outputs)

    def _apply_commands(self, block: bool) -> None:
        while True:
            try:
                cmd = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return
            if cmd is None:
                return
            block = False
            if cmd[0] == "add":
                self._add(*cmd[1:])
            else:
                self._deliver(self.engine.abort([cmd[1]]))

    def _add(self, request_id, prompt, params, stream: _Stream, done: Future) -> None:
        try:
            if (
                self.max_waiting is not None
                and self.engine.scheduler.num_waiting >= self.max_waiting
            ):
                raise QueueFullError(f"{self.engine.scheduler.num_waiting} requests are waiting")
            self.engine.add_request(request_id, prompt, params)
        except Exception as exc:  # validation errors go back to the caller
            self.tenants.pop(request_id, None)
            done.set_exception(exc)
            return
        self._streams[request_id] = stream
        self._stats = self.engine.stats()
        done.set_result(None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            stream = self._streams.get(out.request_id)
            if out.finished:
                self._streams.pop(out.request_id, None)
            if self.on_output is not None:
                try:
                    self.on_output(out)
                except Exception:
                    log.exception("metrics observer failed")
            if out.finished:
                self.tenants.pop(out.request_id, None)
            if stream is not None:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, out)


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
        async for out in self:
            last = out
        assert last is not None
        return last
