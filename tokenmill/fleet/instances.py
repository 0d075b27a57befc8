"""A fleet's instances started: the partition plan for FLEET.toml on this machine, each replica
bound to its slice (partition/binder.py), each an engine core in its own process
(engine/core_client.ProcessCoreClient) behind its own AsyncEngine. The router and the
supervisor sit on top of these."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from tokenmill.config import EngineConfig
from tokenmill.fleet.config import FleetConfig, InstanceSpec
from tokenmill.partition.binder import Binding, GpuDevice, bind
from tokenmill.partition.planner import Plan, Want, plan
from tokenmill.partition.profiles import CpuTopology, GpuModel

log = logging.getLogger(__name__)


@dataclass
class Instance:
    """One replica: its served model name, its binding, its engine (None until started)."""

    name: str  # the replica's name (the instance's, or name#i)
    model_name: str  # what requests ask for
    spec: InstanceSpec
    binding: Binding
    config: EngineConfig
    engine: object | None = field(default=None, repr=False)  # engine.async_engine.AsyncEngine


def plan_fleet(
    fleet: FleetConfig, cpu: CpuTopology, gpu: GpuModel | None = None, gpus: int = 1
) -> tuple[Plan, list[tuple[InstanceSpec, str]]]:
    """The partition plan of every replica, and (spec, replica name) in the plan's order."""
    from tokenmill.fleet.needs import memory_need

    wants, owners = [], []
    for spec in fleet.instances:
        need, _ = memory_need(spec)
        for name, s in zip(spec.replica_names(), spec.slices):
            wants.append(Want(name, s, need))
            owners.append((spec, name))
    return plan(wants, cpu, gpu, gpus), owners


def bind_fleet(
    fleet: FleetConfig,
    cpu: CpuTopology,
    devices: list[GpuDevice] | None = None,
    gpu: GpuModel | None = None,
) -> list[Instance]:
    """Every replica planned and bound (not started); a ValueError listing why a layout does
    not fit or cannot be bound on this machine."""
    result, owners = plan_fleet(fleet, cpu, gpu, max(1, len(devices or [])))
    if not result.ok:
        raise ValueError(f"{fleet.source} cannot be placed here: " + "; ".join(result.problems))
    by_name = {p.name: p for p in result.placements}
    placements = [by_name[name] for _, name in owners]
    out = []
    for (spec, name), binding in zip(owners, bind(placements, devices or [])):
        # the slice's options (threads, a memory share) unless the instance sets them itself
        options = {**binding.engine, **spec.engine}
        config = EngineConfig.from_kwargs(model=spec.model, **options)
        out.append(Instance(name, spec.name, spec, binding, config))
    return out


def start(instances: list[Instance]) -> list[Instance]:
    """Each instance's engine core process, bound, loaded and serving (one after another:
    loading is memory-bound anyway); on a failure the ones started are stopped again."""
    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.engine.core_client import ProcessCoreClient
    from tokenmill.models.loader import load_tokenizer

    try:
        for inst in instances:
            log.info("starting instance %s (%s) on %s", inst.name, inst.spec.model,
                     inst.binding.cores or inst.binding.env or "the shared machine")  # fmt: skip
            engine = AsyncEngine(ProcessCoreClient(inst.config, inst.binding), load_tokenizer(inst.spec.model))  # fmt: skip
            engine.start()
            inst.engine = engine
    except BaseException:
        stop(instances)
        raise
    return instances


def stop(instances: list[Instance], timeout: float = 5.0) -> None:
    for inst in instances:
        if inst.engine is not None:
            inst.engine.shutdown(timeout)  # type: ignore[attr-defined]
            inst.engine = None
