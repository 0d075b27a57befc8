"""Replicas on a Ray cluster (`tokenmill serve --config FLEET.toml --ray-address ADDR`): each
replica's engine core runs in a Ray actor, placed by Ray's scheduler on whichever node has the
resources its slice asks for (CPUs, a GPU or part of one), and the front process keeps the
router, the supervisor and the HTTP endpoint, exactly as for local processes.

The actor runs the same core loop as a local core process (engine/core_proc.py), on a thread,
over a pair of queues in place of the pipe; the front's `RayCoreClient` sends batches of
requests and aborts with one actor call each, and long-polls the actor for outputs (`take`
returns as soon as a step has finished, or after `POLL_S`). The two calls run in their own
concurrency groups, so a waiting `take` never holds up a `put`. A lost actor (its node or
process died, or `ray.kill`) fails the poll: the client reports the core dead, and the
supervisor starts a new actor. Ray itself is imported only here, and only when a cluster is
given: the single-machine path needs no Ray.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.engine.core_client import CoreClient
from tokenmill.engine.messages import (
    AbortRequests,
    CoreFailed,
    CoreReady,
    EngineCoreRequest,
    ModelInfo,
    Shutdown,
)

log = logging.getLogger(__name__)
POLL_S = 0.5  # the longest an output poll waits in the actor before returning empty


class _QueueConn:
    """The side of a multiprocessing Connection that core_proc's loop uses, over two queues."""

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue) -> None:
        self.inbox, self.outbox = inbox, outbox
        self._next: list[Any] = []

    def poll(self, timeout: float = 0.0) -> bool:
        if self._next:
            return True
        try:
            self._next.append(
                self.inbox.get(timeout=timeout) if timeout else self.inbox.get_nowait()
            )
        except queue.Empty:
            return False
        return True

    def recv(self) -> Any:
        return self._next.pop() if self._next else self.inbox.get()

    def send(self, msg: Any) -> None:
        self.outbox.put(msg)


class CoreActor:
    """The body of the Ray actor: an engine core stepping on a thread of the actor's process."""

    def __init__(self, config: EngineConfig, binding, level: int) -> None:
        from tokenmill.engine.core_proc import run_engine_core

        self._in: queue.Queue = queue.Queue()
        self._out: queue.Queue = queue.Queue()
        conn = _QueueConn(self._in, self._out)
        self._thread = threading.Thread(
            target=run_engine_core, args=(config, conn, level, binding), daemon=True,
            name="tokenmill-core",
        )  # fmt: skip
        self._thread.start()

    def ready(self) -> tuple[Any, int, str]:
        """(CoreReady or CoreFailed, this process's pid, its host) once the model loaded."""
        import socket

        return self._out.get(), os.getpid(), socket.gethostname()

    def put(self, messages: list) -> None:
        for m in messages:
            self._in.put(m)

    def take(self, timeout: float = POLL_S) -> list:
        """Whatever the core sent since the last call; waits up to `timeout` for the first."""
        out = []
        try:
            out.append(self._out.get(timeout=timeout))
        except queue.Empty:
            if not self._thread.is_alive():
                return [CoreFailed("the engine core's loop ended in its Ray actor")]
            return out
        while True:
            try:
                out.append(self._out.get_nowait())
            except queue.Empty:
                return out


_ACTOR = None


def _actor_class():
    global _ACTOR
    if _ACTOR is None:
        import ray

        groups = {"in": 1, "out": 1}
        cls = ray.remote(concurrency_groups=groups)(CoreActor)
        _ACTOR = cls
    return _ACTOR


class _ActorProcess:
    """What the supervisor reads of a local core process, for an actor: alive, kill, pid."""

    def __init__(self, actor, pid: int, host: str) -> None:
        self.actor, self.pid, self.host = actor, pid, host
        self.killed = False

    def is_alive(self) -> bool:
        return not self.killed

    def kill(self) -> None:
        import ray

        self.killed = True
        ray.kill(self.actor, no_restart=True)


class RayCoreClient(CoreClient):
    """An engine core in a Ray actor asking for `resources` (num_cpus, num_gpus). Blocks until
    the model has loaded there (or raises what the core raised)."""

    def __init__(self, config: EngineConfig, binding, resources: dict[str, float]) -> None:
        super().__init__()
        import ray

        actor_cls = _actor_class()
        level = logging.getLogger().getEffectiveLevel()
        name = getattr(binding, "name", "core")
        self.actor = actor_cls.options(
            name=None, max_restarts=0, max_concurrency=2, **resources
        ).remote(config, binding, level)
        try:
            msg, pid, host = ray.get(self.actor.ready.remote())
        except Exception as e:  # the actor could not be created or died while loading
            ray.kill(self.actor, no_restart=True)
            raise RuntimeError(
                f"instance {name}: its Ray actor failed while loading: {e}"
            ) from None
        if isinstance(msg, CoreFailed):
            ray.kill(self.actor, no_restart=True)
            kind = {"ValueError": ValueError, "FileNotFoundError": FileNotFoundError}
            raise kind.get(msg.kind, RuntimeError)(msg.message)
        assert isinstance(msg, CoreReady), msg
        self.info: ModelInfo = msg.info
        self.process = _ActorProcess(self.actor, pid, host)
        log.info("instance %s: engine core in a Ray actor on %s (pid %d)", name, host, pid)
        self._sends: queue.Queue = queue.Queue()
        self._closing = False
        self._reader = threading.Thread(target=self._read, name="tokenmill-ray-out", daemon=True)
        self._sender = threading.Thread(target=self._send, name="tokenmill-ray-in", daemon=True)

    def start(self) -> None:
        self._reader.start()
        self._sender.start()

    def add(self, request: EngineCoreRequest) -> None:
        self._sends.put(request)

    def abort(self, request_ids: list[str]) -> None:
        self._sends.put(AbortRequests(tuple(request_ids)))

    def _send(self) -> None:
        """One actor call per batch of what queued up meanwhile, each waited for (the order
        of requests and aborts is the order they were made in)."""
        import ray

        while True:
            batch = [self._sends.get()]
            while True:
                try:
                    batch.append(self._sends.get_nowait())
                except queue.Empty:
                    break
            stop = None in batch
            batch = [m for m in batch if m is not None]
            if batch:
                try:
                    ray.get(self.actor.put.remote(batch))
                except Exception:  # noqa: BLE001 - the reader reports the death
                    return
            if stop:
                return

    def _read(self) -> None:
        import ray

        while not self._closing:
            try:
                messages = ray.get(self.actor.take.remote(POLL_S))
            except Exception as e:  # noqa: BLE001 - RayActorError and its kin: the actor is gone
                if not self._closing:
                    self._died(f"the engine core's Ray actor died ({type(e).__name__})")
                return
            for msg in messages:
                if not self._handle(msg):
                    return

    def shutdown(self, timeout: float = 5.0) -> None:
        import ray

        self._closing = True
        self._sends.put(Shutdown())
        self._sends.put(None)
        if self._sender.is_alive():
            self._sender.join(timeout)
        ray.kill(self.actor, no_restart=True)
        self.process.killed = True


def connect(address: str) -> None:
    """Join the Ray cluster at `address` ("auto", "HOST:PORT" or "ray://HOST:PORT") once."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=True, logging_level=logging.WARNING)
        log.info("Ray cluster at %s: %s", address, ray.cluster_resources())


def resources_of(binding, placement) -> dict[str, float]:
    """The Ray resources a replica's slice asks for: its cores as CPUs (1 for none), a GPU
    slice or share as that fraction of a GPU."""
    cores = len(getattr(binding, "cores", ()) or ()) or 1
    out: dict[str, float] = {"num_cpus": float(cores)}
    if placement is not None and placement.gpu is not None:
        share = placement.compute_share or placement.memory_share or 1.0
        out["num_gpus"] = round(share, 4)
    return out
