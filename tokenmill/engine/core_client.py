"""Core clients: how a front talks to an EngineCore, in this process or in its own.

Both take `EngineCoreRequest`s and aborts, and call `on_outputs(EngineCoreOutputs)` on a thread
of their own as steps finish. `ProcessCoreClient` spawns the core (engine/core_proc.py) and
exchanges the typed messages of engine/messages.py over a `multiprocessing` Pipe: the standard
library's framing and pickling carry frozen dataclasses as they are (no second schema to keep in
step), the pipe's EOF tells at once that the core died, and a step's messages are a few KB
(BENCHMARKS.md measures the encoding cost). `InprocCoreClient` steps the core on a thread.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable

from tokenmill.config import EngineConfig
from tokenmill.engine.messages import (
    AbortRequests,
    CoreFailed,
    CoreReady,
    EngineCoreOutputs,
    EngineCoreRequest,
    ModelInfo,
    Shutdown,
)

log = logging.getLogger(__name__)

OutputsCallback = Callable[[EngineCoreOutputs], None]
DeadCallback = Callable[[str], None]


class EngineDeadError(RuntimeError):
    """The engine core is gone; requests in flight cannot finish."""


def _ignore_outputs(_: EngineCoreOutputs) -> None:
    pass


def _ignore_dead(_: str) -> None:
    pass


class CoreClient(ABC):
    """How a front reaches one engine core: requests and aborts in, outputs out (on the
    client's thread, through `on_outputs`), and `on_dead` once if the core is lost."""

    info: ModelInfo

    def __init__(self) -> None:
        self.on_outputs: OutputsCallback = _ignore_outputs  # set by the front before start()
        self.on_dead: DeadCallback = _ignore_dead
        self.dead_reason: str | None = None

    @abstractmethod
    def start(self) -> None:
        """Begin stepping (and delivering outputs)."""

    @abstractmethod
    def add(self, request: EngineCoreRequest) -> None:
        """Queue a validated request; returns at once."""

    @abstractmethod
    def abort(self, request_ids: list[str]) -> None:
        """End requests or sequences; returns at once."""

    @abstractmethod
    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop the core and wait for it, at most `timeout` seconds."""

    def _handle(self, msg) -> bool:
        """One message from the core: outputs to `on_outputs`, a CoreFailed to `on_dead`;
        False once the core is gone."""
        if isinstance(msg, CoreFailed):
            self._died(msg.message)
            return False
        try:
            self.on_outputs(msg)
        except Exception:
            log.exception("handling the core's outputs failed")
        return True

    def _died(self, reason: str) -> None:
        if self.dead_reason is None:
            self.dead_reason = reason
            log.error("engine core died: %s", reason)
            self.on_dead(reason)


class InprocCoreClient(CoreClient):
    """The core stepped on a thread of this process; adds and aborts apply between steps."""

    def __init__(self, core) -> None:
        super().__init__()
        self.core = core
        self.info = core.info
        self._commands: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="tokenmill-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def add(self, request: EngineCoreRequest) -> None:
        self._commands.put(request)

    def abort(self, request_ids: list[str]) -> None:
        self._commands.put(AbortRequests(tuple(request_ids)))

    def shutdown(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._commands.put(Shutdown())
        self._thread.join(timeout)
        self.core.shutdown()

    def _loop(self) -> None:
        while not self._stop.is_set():
            handled = self._apply_commands(block=not self.core.has_unfinished())
            if self._stop.is_set():
                return
            if self.core.has_unfinished():
                try:
                    outputs = self.core.step()
                except Exception as exc:  # a bug, not bad input: the core's state is suspect
                    log.exception("engine step failed")
                    self._died(f"engine step failed: {exc}")
                    return
                self.on_outputs(outputs)
            elif handled:
                self.on_outputs(EngineCoreOutputs((), self.core.stats()))

    def _apply_commands(self, block: bool) -> int:
        handled = 0
        while True:
            try:
                cmd = self._commands.get(block=block, timeout=0.5 if block else None)
            except queue.Empty:
                return handled
            block = False
            if isinstance(cmd, Shutdown):
                return handled
            handled += 1
            if isinstance(cmd, EngineCoreRequest):
                self.core.add_request(cmd)
            else:
                self.core.abort(cmd.request_ids)


class ProcessCoreClient(CoreClient):
    """The core in a spawned child process. Construction blocks until the model is loaded.
    `binding` (partition/binder.Binding): the slice the process is bound to (its environment
    and CPU affinity, applied in the child before torch starts); its engine options are the
    caller's to merge into `config`."""

    def __init__(self, config: EngineConfig, binding=None) -> None:
        super().__init__()
        from tokenmill.engine.core_proc import run_engine_core

        ctx = mp.get_context("spawn")  # never fork a process that holds torch threads
        self._conn, child = ctx.Pipe()
        level = logging.getLogger().getEffectiveLevel()
        name = "tokenmill-core" + (f"-{binding.name}" if binding is not None else "")
        # a daemonic process may not start children: with tensor-parallel ranks the core is
        # not one (it still ends with its pipe, and shutdown() kills it)
        daemon = config.parallel.world_size == 1
        self.process = ctx.Process(
            target=run_engine_core, args=(config, child, level, binding), name=name, daemon=daemon
        )
        self.process.start()
        child.close()  # the parent's copy: EOF on our end once the core exits
        self.info = self._wait_ready()
        self._sends: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, name="tokenmill-core-out", daemon=True)
        self._sender = threading.Thread(target=self._send, name="tokenmill-core-in", daemon=True)

    def _wait_ready(self) -> ModelInfo:
        try:
            msg = self._conn.recv()
        except EOFError:
            self.process.join(5)
            raise RuntimeError(
                f"the engine core process exited while loading (exit code {self.process.exitcode})"
            ) from None
        if isinstance(msg, CoreFailed):
            self.process.join(5)
            kind = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}
            raise kind.get(msg.kind, RuntimeError)(msg.message)
        assert isinstance(msg, CoreReady), msg
        return msg.info

    def start(self) -> None:
        self._reader.start()
        self._sender.start()
        self._started = True

    _started = False

    def add(self, request: EngineCoreRequest) -> None:
        self._sends.put(request)

    def abort(self, request_ids: list[str]) -> None:
        self._sends.put(AbortRequests(tuple(request_ids)))

    def _send(self) -> None:
        """Sends leave from this thread: a large prompt never blocks the event loop on a full
        pipe while the core is inside a step."""
        while True:
            msg = self._sends.get()
            if msg is None:
                return
            try:
                self._conn.send(msg)
            except (BrokenPipeError, ConnectionResetError, OSError):
                return  # the reader reports the death

    def _read(self) -> None:
        while True:
            try:
                msg = self._conn.recv()
            except (EOFError, ConnectionResetError, OSError):
                self.process.join(1)
                if self.dead_reason is None and not self._closing:
                    self._died(
                        f"the engine core process exited (exit code {self.process.exitcode})"
                    )
                return
            if not self._handle(msg):
                return

    _closing = False

    def shutdown(self, timeout: float = 5.0) -> None:
        self._closing = True
        if self.process.is_alive():
            if self._started:
                self._sends.put(Shutdown())
            else:
                try:
                    self._conn.send(Shutdown())
                except OSError:
                    pass
        self._sends.put(None)
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(1)
