"""Binding a planned instance to the machine: which MIG device (by the UUID NVML lists, never an
index), GPU, memory share or cores its engine-core process gets, as an environment, a CPU
affinity, a thread count and engine options. NVML is read here (and in the energy meters) only;
`nvml` is the pynvml module or anything with its functions (the tests' fake has MIG devices).

A MIG profile binds to a free MIG device of that profile on its planned GPU when the GPU is in
MIG mode; on a GPU that is not, the profile's memory becomes a memory share of the whole GPU
(`gpu_memory_utilization`), which isolates memory but not compute, and the binding says so.
"""

from __future__ import annotations

import importlib
import logging
import re
from dataclasses import dataclass, field

from tokenmill.partition.planner import Placement
from tokenmill.partition.profiles import MEMORY_SLICES

_MIG_NAME = re.compile(r"(\d+g\.\d+gb(\+me)?)")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class MigInstance:
    uuid: str
    profile: str  # e.g. 1g.18gb, from the device name NVML gives
    memory_bytes: int


@dataclass(frozen=True)
class GpuDevice:
    index: int
    uuid: str
    name: str
    memory_bytes: int
    mig: bool
    instances: tuple[MigInstance, ...] = ()


def inventory(nvml=None) -> list[GpuDevice]:
    """Every GPU NVML lists, with its MIG mode and existing MIG devices."""
    nvml = nvml or importlib.import_module("pynvml")
    nvml.nvmlInit()
    out = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        try:
            current, _pending = nvml.nvmlDeviceGetMigMode(h)
        except nvml.NVMLError:  # not MIG-capable
            current = 0
        instances = []
        if current:
            for k in range(nvml.nvmlDeviceGetMaxMigDeviceCount(h)):
                try:
                    m = nvml.nvmlDeviceGetMigDeviceHandleByIndex(h, k)
                except nvml.NVMLError:  # an empty slot
                    continue
                found = _MIG_NAME.search(_text(nvml.nvmlDeviceGetName(m)))
                profile = found.group(1) if found else "?"
                memory = nvml.nvmlDeviceGetMemoryInfo(m).total
                instances.append(MigInstance(_text(nvml.nvmlDeviceGetUUID(m)), profile, memory))
        out.append(GpuDevice(
            i, _text(nvml.nvmlDeviceGetUUID(h)), _text(nvml.nvmlDeviceGetName(h)),
            nvml.nvmlDeviceGetMemoryInfo(h).total, bool(current), tuple(instances),
        ))  # fmt: skip
    return out


def local_devices() -> list[GpuDevice]:
    """This machine's GPUs (`inventory`), or none where NVML is missing or finds no driver."""
    try:
        return inventory()
    except Exception as e:  # no nvidia-ml-py, no driver: a CPU machine
        log.info("no GPUs (NVML: %s: %s); instances run on CPU cores", type(e).__name__, e)
        return []


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


@dataclass(frozen=True)
class Binding:
    """What an instance's process is given: environment variables (CUDA_VISIBLE_DEVICES, the
    thread counts), the cores it is pinned to, engine options (a memory share), and notes."""

    name: str
    env: dict[str, str] = field(default_factory=dict)
    cores: tuple[int, ...] = ()
    engine: dict[str, object] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    memory_limit: int | None = None  # bytes of host memory the process may hold (a cgroup)


def bind(placements: list[Placement], devices: list[GpuDevice]) -> list[Binding]:
    """A binding per placement (in order); a ValueError naming the instance where the machine
    lacks what the plan placed there (a MIG device of that profile, a UUID, a GPU)."""
    taken: set[str] = set()
    out = []
    by_uuid = {m.uuid: (g, m) for g in devices for m in g.instances}
    for p in placements:
        if p.cores:
            threads = str(len(p.cores))
            env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
            out.append(Binding(p.name, env, p.cores, {"num_threads": len(p.cores)}))
        elif p.slice.startswith("MIG-"):
            if p.slice not in by_uuid:
                raise ValueError(f"{p.name}: no MIG device {p.slice} on this machine (nvidia-smi -L lists them)")  # fmt: skip
            if p.slice in taken:
                raise ValueError(f"{p.name}: MIG device {p.slice} is bound twice")
            taken.add(p.slice)
            out.append(Binding(p.name, {"CUDA_VISIBLE_DEVICES": p.slice}))
        elif p.start is not None:  # a planned MIG profile
            out.append(_bind_profile(p, devices, taken))
        elif p.gpu is not None:  # a memory share
            g = _gpu(p, devices)
            assert p.memory_share is not None
            out.append(Binding(p.name, {"CUDA_VISIBLE_DEVICES": g.uuid},
                               engine={"gpu_memory_utilization": round(p.memory_share, 4)},
                               notes=("a memory share: compute is shared with the GPU's other instances",)))  # fmt: skip
        else:  # no slice: the machine shared
            out.append(Binding(p.name, notes=("no slice: shares the machine",)))
    return out


def _gpu(p: Placement, devices: list[GpuDevice]) -> GpuDevice:
    if p.gpu is None or p.gpu >= len(devices):
        raise ValueError(f"{p.name}: planned on GPU {p.gpu}, and NVML lists {len(devices)} GPU(s)")
    return devices[p.gpu]


def _bind_profile(p: Placement, devices: list[GpuDevice], taken: set[str]) -> Binding:
    g = _gpu(p, devices)
    if g.mig:
        for m in g.instances:
            if m.profile == p.slice and m.uuid not in taken:
                taken.add(m.uuid)
                return Binding(p.name, {"CUDA_VISIBLE_DEVICES": m.uuid})
        have = ", ".join(f"{m.profile} {m.uuid}" for m in g.instances) or "none"
        raise ValueError(
            f"{p.name}: GPU {g.index} ({g.name}) is in MIG mode with no free {p.slice} device "
            f"(it has: {have}); create one: nvidia-smi mig -cgi {p.slice} -C"
        )
    share = (p.memory_share or 0) or (p.memory_bytes or 0) / g.memory_bytes
    slices = round(share * MEMORY_SLICES)
    return Binding(
        p.name, {"CUDA_VISIBLE_DEVICES": g.uuid}, engine={"gpu_memory_utilization": round(share, 4)},
        notes=(f"GPU {g.index} is not in MIG mode: {p.slice} falls back to a memory share "
               f"({slices}/{MEMORY_SLICES} of its memory); compute is not isolated",),
    )  # fmt: skip


def apply(b: Binding) -> list[str]:
    """In the instance's own process, before torch starts its threads: the environment, the
    CPU affinity and the memory cap of its binding (the thread count travels as the engine
    option num_threads); on a GPU share, torch's allocator capped at the share. What enforces
    each, in words (logged by the caller)."""
    import os

    done = []
    os.environ.update(b.env)
    if b.cores:
        os.sched_setaffinity(0, b.cores)
        done.append(f"pinned to cores {','.join(map(str, b.cores))}")
    if b.memory_limit is not None:
        from tokenmill.partition.cgroups import confine

        done.append(confine(b.name, b.memory_limit))
    fraction = b.engine.get("gpu_memory_utilization")
    if isinstance(fraction, float) and b.env.get("CUDA_VISIBLE_DEVICES"):
        import torch

        if torch.cuda.is_available():  # the share is a cap, not only the KV budget's base
            torch.cuda.set_per_process_memory_fraction(fraction, 0)
            done.append(f"CUDA allocator capped at {fraction:.0%} of the GPU")
    return done
