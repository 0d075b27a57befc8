"""RayExecutor: tensor-parallel ranks as Ray actors in a placement group
(`distributed_executor_backend="ray"`), so the ranks of one engine can sit on several machines.

One actor per rank, each in its own bundle of a placement group (PACK: on one node where they
fit, spread over nodes where they do not), asking for `cpus_per_rank` CPUs or one GPU each.
Rank 0's actor names the group's rendezvous (its node's address and a free port); every actor
builds its Worker, joining torch.distributed there (Gloo on CPU, NCCL on CUDA). Each call goes to
every rank; rank 0's answer is the step's, as in the multiprocess executor. A rank whose actor
dies (its process or node lost) ends the executor with ExecutorDeadError at once, and the other
ranks' actors (blocked in a collective with it) are killed.

The cluster: the one this process is connected to, else RAY_ADDRESS, else a local one started
for it. Ray is imported here only when this backend is chosen (the `ray` extra).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.executor.base import ExecutorDeadError, RankExecutor

log = logging.getLogger(__name__)


class RankActor:
    """The body of one rank's actor: a Worker, built once every rank's actor exists."""

    def rendezvous(self) -> str:
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{ray.util.get_node_ip_address()}:{port}"

    def start(self, config: EngineConfig, rank: int, init_method: str) -> int:
        from tokenmill.worker.worker import Worker

        self.worker = Worker(config, rank=rank, init_method=init_method)
        return os.getpid()

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.worker, method)(*args)


class RayExecutor(RankExecutor):
    def __init__(self, config: EngineConfig, cpus_per_rank: int = 1) -> None:
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if not ray.is_initialized():
            ray.init(address=os.environ.get("RAY_ADDRESS"), logging_level=logging.WARNING)
        size = config.parallel.world_size
        p = config.parallel  # the last stage's first tensor-parallel rank
        self._output_rank = (p.pipeline_parallel_size - 1) * p.tensor_parallel_size
        gpu = config.device.device.startswith("cuda")
        bundle = {"GPU": 1.0} if gpu else {"CPU": float(cpus_per_rank)}
        self._pg = placement_group([bundle] * size, strategy="PACK")
        self._remove_pg = remove_placement_group
        ray.get(self._pg.ready(), timeout=300)
        if not gpu and config.device.num_threads is None:  # the bundle's CPUs, not the node's
            config = dataclasses.replace(config, device=dataclasses.replace(config.device, num_threads=cpus_per_rank))  # fmt: skip
        actor = ray.remote(RankActor)
        self._actors = [
            actor.options(
                num_cpus=0 if gpu else cpus_per_rank, num_gpus=1 if gpu else 0, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg, placement_group_bundle_index=i),
            ).remote()
            for i in range(size)
        ]  # fmt: skip
        self._dead: str | None = None
        try:
            init = ray.get(self._actors[0].rendezvous.remote())
            self.pids = self._gather([a.start.remote(config, r, init) for r, a in enumerate(self._actors)], "start")  # fmt: skip
        except BaseException:
            self.shutdown()
            raise
        log.info("%d tensor-parallel ranks as Ray actors (rendezvous %s)", size, init)

    def _gather(self, refs: list, method: str) -> list:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        try:
            return ray.get(refs)
        except RayTaskError as e:  # the worker raised: a failed step, for the core to isolate
            cause = e.cause if e.cause is not None else e
            raise RuntimeError(f"worker {method} failed: {type(cause).__name__}: {cause}") from None
        except RayActorError:
            for rank, ref in enumerate(refs):
                try:
                    ray.get(ref, timeout=1)
                except RayActorError:
                    self._dead = f"the Ray actor of rank {rank} died during {method}"
                    break
                except Exception:  # noqa: BLE001 - a survivor still in the collective
                    continue
            self._dead = self._dead or f"a rank's Ray actor died during {method}"
            self._kill_all()
            raise ExecutorDeadError(self._dead) from None

    def _call_all(self, method: str, *args: Any) -> list[Any]:
        if self._dead is not None:
            raise ExecutorDeadError(self._dead)
        return self._gather([a.call.remote(method, *args) for a in self._actors], method)

    def _kill_all(self) -> None:
        import ray

        for a in self._actors:
            ray.kill(a, no_restart=True)

    def shutdown(self) -> None:
        if getattr(self, "_actors", None):
            self._kill_all()
            self._actors = []
        if getattr(self, "_pg", None) is not None:
            try:
                self._remove_pg(self._pg)
            except Exception:  # noqa: BLE001 - the cluster may be gone already
                pass
            self._pg = None
