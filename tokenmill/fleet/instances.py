"""A fleet's instances started: the partition plan for FLEET.toml on this machine, each replica
bound to its slice (partition/binder.py), each an engine core in its own process
(engine/core_client.ProcessCoreClient) behind its own AsyncEngine. The router and the
supervisor sit on top of these."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path

from tokenmill.config import EngineConfig
from tokenmill.fleet.config import FleetConfig, InstanceSpec
from tokenmill.partition.binder import Binding, GpuDevice, bind
from tokenmill.partition.planner import Placement, Plan, Want, plan
from tokenmill.partition.profiles import CpuTopology, GpuModel

log = logging.getLogger(__name__)
RUNTIME_BYTES = 1 << 30  # a replica's memory cap past its weights and KV: torch, Python, buffers


def memory_cap(spec: InstanceSpec) -> int:
    """A replica's host-memory cap: its own `memory`, or its weights, KV budget and host KV
    tier (which lives in the process's memory wherever the model runs) + the runtime."""
    from tokenmill.fleet.needs import memory_need

    if spec.memory is not None:
        return spec.memory
    return memory_need(spec)[0] + int(spec.engine.get("kv_host_memory") or 0) + RUNTIME_BYTES


@dataclass
class Instance:
    """One replica: its served model name, its binding, its engine (None until started)."""

    name: str  # the replica's name (the instance's, or name#i)
    model_name: str  # what requests ask for
    spec: InstanceSpec
    binding: Binding
    config: EngineConfig
    engine: object | None = field(default=None, repr=False)  # engine.async_engine.AsyncEngine
    placement: Placement | None = None
    share: float = 1.0  # of the device it runs on: what its hardware cost is a share of
    ray_resources: dict[str, float] | None = None  # a Ray actor asking for these; None: local

    def describe(self) -> str:
        """Where it runs, in words (logs, /v1/health/instances)."""
        if self.ray_resources is not None:
            asks = ", ".join(f"{k.removeprefix('num_')}={v:g}" for k, v in self.ray_resources.items())  # fmt: skip
            return f"a Ray actor ({asks})"
        p = self.placement
        where = p.slice if p is not None else "the shared machine"
        if self.binding.env.get("CUDA_VISIBLE_DEVICES"):
            where += f" ({self.binding.env['CUDA_VISIBLE_DEVICES']})"
        return where


def plan_fleet(
    fleet: FleetConfig, cpu: CpuTopology, gpu: GpuModel | None = None, gpus: int = 1
) -> tuple[Plan, list[tuple[InstanceSpec, str]]]:
    """The partition plan of every replica, and (spec, replica name) in the plan's order."""
    from tokenmill.fleet.needs import memory_need

    wants, owners = [], []
    for spec in fleet.instances:
        need = memory_need(spec)[0] if spec.memory is None else spec.memory
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
    shares = cost_shares(placements)
    out = []
    for (spec, name), binding, p, share in zip(owners, bind(placements, devices or []), placements, shares):  # fmt: skip
        # the slice's options (threads, a memory share) unless the instance sets them itself
        options = {**binding.engine, **replica_options(spec, name)}
        config = EngineConfig.from_kwargs(model=spec.model, **options)
        binding = replace(binding, memory_limit=memory_cap(spec))
        out.append(Instance(name, spec.name, spec, binding, config, placement=p, share=share))
    return out


def replica_options(spec: InstanceSpec, replica: str) -> dict:
    """A replica's engine options: its instance's (profiled), with a disk KV tier of its own
    (`kv_disk_dir/<replica>`: a directory serves one server, and twins would share one)."""
    options = profiled(spec)
    if options.get("kv_disk_dir"):
        options["kv_disk_dir"] = str(Path(options["kv_disk_dir"]) / replica)
    return options


def profiled(spec: InstanceSpec) -> dict:
    """The instance's engine options over its hardware profile's (when it names one)."""
    if spec.profile == "none":
        return dict(spec.engine)
    from tokenmill.profiles.commands import apply_profile

    log.info("instance %s:", spec.name)
    return apply_profile(spec.profile, spec.model, dict(spec.engine))


def cost_shares(placements: list[Placement]) -> list[float]:
    """Each placement's part of its device's cost, the parts of one device adding up to 1 (at
    most): a slice its own share; instances without one split what the slices leave, or,
    where the slices take it all, count as one more equal part each (all scaled to sum 1)."""
    out: list[float] = []
    for group in _by_device(placements):
        own = [device_share(placements[i]) for i in group]
        sliced = sum(s for s in own if s is not None)
        unsliced = sum(1 for s in own if s is None)
        rest = 1.0 - sliced
        if unsliced and rest > 1e-9:
            parts = [s if s is not None else rest / unsliced for s in own]
        else:
            parts = [s if s is not None else 1.0 / len(own) for s in own]
        total = sum(parts)
        scale = 1.0 / total if total > 1.0 else 1.0
        out.extend(p * scale for p in parts)
    order = [i for group in _by_device(placements) for i in group]
    return [share for _, share in sorted(zip(order, out))]


def _by_device(placements: list[Placement]) -> list[list[int]]:
    """Indices of the placements on each device (the CPU: gpu None; each GPU by index)."""
    groups: dict[int | None, list[int]] = {}
    for i, p in enumerate(placements):
        groups.setdefault(p.gpu, []).append(i)
    return list(groups.values())


def device_share(p: Placement) -> float | None:
    """The part of its device a placement holds: its compute (MIG SMs, cores), else its memory
    share; None for one that shares the machine unpartitioned."""
    if p.compute_share is not None:
        return p.compute_share
    return p.memory_share


def bind_fleet_ray(fleet: FleetConfig) -> list[Instance]:
    """Every replica as a Ray actor: Ray's scheduler places it on a node with the resources
    its slice asks for (cores=0-3: 4 CPUs, with as many threads; gpu-share=F: F of a GPU and
    that share of its memory; none: 1 CPU). A node's cores are Ray's to assign, so nothing is
    pinned; MIG slices need the node's MIG devices and are refused here."""
    from tokenmill.partition.slices import Cores, GpuShare

    out = []
    for spec in fleet.instances:
        for name, s in zip(spec.replica_names(), spec.slices):
            options: dict[str, object] = {}
            resources: dict[str, float] = {"num_cpus": 1.0}
            if isinstance(s, Cores):
                resources["num_cpus"] = float(len(s.cores))
                options["num_threads"] = len(s.cores)
            elif isinstance(s, GpuShare):
                resources["num_gpus"] = s.fraction
                options["gpu_memory_utilization"] = s.fraction
            elif s is not None:
                raise ValueError(f"{fleet.source}: instance {spec.name!r}: slice {s} cannot be "
                                 "placed through Ray (MIG devices are per node); use cores=N or "
                                 "gpu-share=F with --ray-address")  # fmt: skip
            cap = memory_cap(spec)
            threads = str(int(resources["num_cpus"]))
            binding = Binding(name, {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads},
                              engine=options, memory_limit=cap)  # fmt: skip
            config = EngineConfig.from_kwargs(model=spec.model, **{**options, **replica_options(spec, name)})  # fmt: skip
            # cost: a GPU share its fraction; a CPU replica its node (the node's size is Ray's)
            share = s.fraction if isinstance(s, GpuShare) else 1.0
            out.append(Instance(name, spec.name, spec, binding, config, share=share,
                                ray_resources={**resources, "memory": float(cap)}))  # fmt: skip
    return out


def start(instances: list[Instance]) -> list[Instance]:
    """Each instance's engine core process (or Ray actor), bound, loaded and serving (one after
    another: loading is memory-bound anyway); on a failure the ones started are stopped."""
    from tokenmill.engine.async_engine import AsyncEngine
    from tokenmill.engine.core_client import CoreClient, ProcessCoreClient
    from tokenmill.models.loader import load_tokenizer

    try:
        for inst in instances:
            log.info("starting instance %s (%s) on %s", inst.name, inst.spec.model, inst.describe())  # fmt: skip
            client: CoreClient
            if inst.ray_resources is not None:
                from tokenmill.fleet.ray_client import RayCoreClient

                client = RayCoreClient(inst.config, inst.binding, inst.ray_resources)
            else:
                client = ProcessCoreClient(inst.config, inst.binding)
            engine = AsyncEngine(client, load_tokenizer(inst.spec.model))
            engine.start()
            inst.engine = engine
    except BaseException:
        stop(instances)
        raise
    return instances


def stop(instances: list[Instance], timeout: float = 5.0) -> None:
    from tokenmill.partition.cgroups import remove

    for inst in instances:
        if inst.engine is not None:
            inst.engine.shutdown(timeout)  # type: ignore[attr-defined]
            inst.engine = None
        if inst.binding.memory_limit is not None:
            remove(inst.name)
