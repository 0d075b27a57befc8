"""MultiprocExecutor: the worker in a child process, driven over a pipe with the same values the
in-process path uses (SchedulerOutput in, RunnerOutput out), pickled by multiprocessing.

One rank today; tensor- and pipeline-parallel ranks (world size > 1) plug in here. A worker that
dies ends the executor with `WorkerDiedError` at the next call, never a hang on a dead pipe.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import traceback
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.engine.messages import RunnerOutput, SchedulerOutput, WorkerInfo
from tokenmill.executor.base import Executor, ExecutorDeadError
from tokenmill.kv.specs import CacheSpec

log = logging.getLogger(__name__)


class WorkerDiedError(ExecutorDeadError):
    """The worker process is gone (killed, crashed or out of memory)."""


def _worker_main(config: EngineConfig, conn) -> None:
    from tokenmill.worker.worker import Worker

    try:
        worker = Worker(config)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            return  # the executor is gone
        if method == "shutdown":
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(worker, method)(*args)))
        except Exception as exc:  # a failed step is the core's to isolate
            log.debug("worker call %s failed:\n%s", method, traceback.format_exc())
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


class MultiprocExecutor(Executor):
    def __init__(self, config: EngineConfig) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that holds torch threads
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(
            target=_worker_main, args=(config, child), name="tokenmill-worker-0", daemon=True
        )
        self._proc.start()
        child.close()  # so the parent sees EOF when the worker dies
        self._receive("start")

    def _receive(self, method: str) -> Any:
        try:
            status, value = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(timeout=1)
            raise WorkerDiedError(
                f"the worker process died during {method} (exit code {self._proc.exitcode})"
            ) from None
        if status == "error":
            raise RuntimeError(f"worker {method} failed: {value}")
        return value

    def _call(self, method: str, *args: Any) -> Any:
        try:
            self._conn.send((method, args))
        except (BrokenPipeError, OSError):
            raise WorkerDiedError(f"the worker process is gone ({method})") from None
        return self._receive(method)

    def describe(self) -> WorkerInfo:
        return self._call("describe")

    def cache_specs(self) -> list[CacheSpec]:
        return self._call("cache_specs")

    def default_kv_cache_memory(self, max_tokens: int) -> int:
        return self._call("default_kv_cache_memory", max_tokens)

    def initialize_cache(self, num_blocks: int) -> None:
        self._call("initialize_cache", num_blocks)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        return self._call("execute", out)

    def retry(self, request_ids: tuple[str, ...]) -> RunnerOutput:
        return self._call("retry", request_ids)

    def shutdown(self) -> None:
        if self._proc.is_alive():
            try:
                self._call("shutdown")
            except (WorkerDiedError, RuntimeError):
                pass
        self._proc.join(timeout=5)
        if self._proc.is_alive():
            self._proc.kill()
        self._conn.close()
