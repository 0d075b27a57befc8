"""MultiprocExecutor: the workers in child processes, one per tensor-parallel rank, driven over
pipes with the same values the in-process path uses (SchedulerOutput in, RunnerOutput out),
pickled by multiprocessing.

Every rank gets every call; each runs the same step on its shard (the ranks meet in the
layers' all-reduces and all-gather, torch.distributed over Gloo on CPU or NCCL on CUDA) and,
the logits being gathered whole on every rank, samples the same tokens; rank 0's answer is the
step's. A rank that dies ends the executor with `WorkerDiedError` at once, never a hang: each
call waits on every rank's pipe and the processes' sentinels together, and the survivors
(blocked in a collective with the dead rank) are killed.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import multiprocessing.connection as mpc
import socket
import traceback
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.executor.base import ExecutorDeadError, RankExecutor

log = logging.getLogger(__name__)


class WorkerDiedError(ExecutorDeadError):
    """A worker process is gone (killed, crashed or out of memory)."""


def _worker_main(config: EngineConfig, conn, rank: int = 0, init_method: str | None = None) -> None:
    from tokenmill.worker.worker import Worker

    try:
        worker = Worker(config, rank=rank, init_method=init_method)
    except Exception as exc:
        log.debug("worker %d failed to start:\n%s", rank, traceback.format_exc())
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", None))
    while True:
        try:
            method, args = conn.recv()
        except (EOFError, OSError):
            return  # the executor is gone
        if method == "shutdown":
            worker.close()
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(worker, method)(*args)))
        except Exception as exc:  # a failed step is the core's to isolate
            log.debug("worker call %s failed:\n%s", method, traceback.format_exc())
            conn.send(("error", f"{type(exc).__name__}: {exc}"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MultiprocExecutor(RankExecutor):
    def __init__(self, config: EngineConfig) -> None:
        ctx = mp.get_context("spawn")  # never fork a process that holds torch threads
        size = config.parallel.world_size
        # the step's answer: rank 0's, or the last pipeline stage's (it samples)
        p = config.parallel  # the last stage's first tensor-parallel rank
        self._output_rank = (p.pipeline_parallel_size - 1) * p.tensor_parallel_size
        init = f"tcp://127.0.0.1:{_free_port()}" if size > 1 else None
        self._conns, self._procs = [], []
        for rank in range(size):
            conn, child = ctx.Pipe()
            proc = ctx.Process(
                target=_worker_main, args=(config, child, rank, init),
                name=f"tokenmill-worker-{rank}", daemon=True,
            )  # fmt: skip
            proc.start()
            child.close()  # so the parent sees EOF when the worker dies
            self._conns.append(conn)
            self._procs.append(proc)
        self._dead: str | None = None
        try:
            self._receive("start")
        except BaseException:
            self._kill_all()
            raise

    def _receive(self, method: str) -> list[Any]:
        """Every rank's answer to `method`, in rank order; a death of any rank while waiting
        ends all of them."""
        answers: dict[int, Any] = {}
        pending = dict(enumerate(self._conns))
        sentinels = {p.sentinel: r for r, p in enumerate(self._procs)}
        while pending:
            ready = mpc.wait([*pending.values(), *[p.sentinel for r, p in enumerate(self._procs) if r in pending]])  # fmt: skip
            for obj in ready:
                if obj in sentinels and sentinels[obj] in pending:
                    rank = sentinels[obj]
                    conn = pending[rank]
                    if not conn.poll():  # it exited without answering
                        self._died(rank, method)
                    continue
                rank = next(r for r, c in pending.items() if c is obj)
                try:
                    answers[rank] = obj.recv()
                except (EOFError, OSError):
                    self._died(rank, method)
                del pending[rank]
        errors = [(r, v) for r, (status, v) in sorted(answers.items()) if status == "error"]
        if errors:
            rank, value = errors[0]
            raise RuntimeError(f"worker {method} failed{f' on rank {rank}' if len(self._procs) > 1 else ''}: {value}")  # fmt: skip
        return [answers[r][1] for r in range(len(self._procs))]

    def _died(self, rank: int, method: str) -> None:
        proc = self._procs[rank]
        proc.join(timeout=1)
        self._dead = f"the worker process of rank {rank} died during {method} (exit code {proc.exitcode})"  # fmt: skip
        self._kill_all()  # the others wait in a collective with it: they never return
        raise WorkerDiedError(self._dead if len(self._procs) > 1 else self._dead.replace(" of rank 0", ""))  # fmt: skip

    def _kill_all(self) -> None:
        for p in self._procs:
            if p.is_alive():
                p.kill()
        for p in self._procs:
            p.join(timeout=2)

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        if self._dead is not None:
            raise WorkerDiedError(self._dead)
        for rank, conn in enumerate(self._conns):
            try:
                conn.send((method, args))
            except (BrokenPipeError, OSError):
                self._died(rank, method)
        return self._receive(method)

    def shutdown(self) -> None:
        if self._dead is None and all(p.is_alive() for p in self._procs):
            try:
                self._call("shutdown")
            except (WorkerDiedError, RuntimeError):
                pass
        for p in self._procs:
            p.join(timeout=5)
        self._kill_all()
        for conn in self._conns:
            conn.close()
