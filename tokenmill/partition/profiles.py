"""Partition profiles as data: each MIG-capable GPU's instance profiles (gpus.toml: compute and
memory slices, placements, SMs, memory) and this machine's CPU core and memory sets. Pure: no
torch, no NVML (the binder reads the devices themselves)."""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

TABLES = Path(__file__).with_name("gpus.toml")
COMPUTE_SLICES = 7  # every MIG-capable GPU: 7 compute slices
MEMORY_SLICES = 8  # and 8 memory slices
_NAME = re.compile(r"^(\d+)g\.(\d+)gb(\+me)?$")


@dataclass(frozen=True)
class MigProfile:
    """A GPU instance profile: `compute` of 7 compute slices, `memory_slices` of 8, placed at
    one of `starts` (memory slice index); `max` of it fit on one GPU alone."""

    name: str
    compute: int
    memory_slices: int
    starts: tuple[int, ...]
    max: int
    media: bool  # the media-engine ("+me") variant: at most one per GPU
    memory_gb: int  # as its name gives it (NVIDIA rounds)
    sms: int


@dataclass(frozen=True)
class GpuModel:
    key: str
    aliases: tuple[str, ...]
    memory_gb: int
    sms_per_slice: int
    profiles: tuple[MigProfile, ...]  # smallest first

    def profile(self, name: str) -> MigProfile:
        for p in self.profiles:
            if p.name == name:
                return p
        known = ", ".join(p.name for p in self.profiles)
        raise ValueError(f"{self.key} has no MIG profile {name!r}; its profiles: {known}")

    def match(self, name: str) -> int:
        """How well `name` (a --device value, or an NVML device name such as "NVIDIA H100
        80GB HBM3") names this GPU: the length of the longest of its names found in it as whole
        words, 0 if none ("H100 NVL" must beat "H100")."""
        low = name.lower().strip()
        best = 0
        for a in (self.key, *self.aliases):
            a = a.lower()
            if low == a or re.search(rf"(^|[\s_]){re.escape(a)}($|[\s_])", low):
                best = max(best, len(a))
        return best


@cache
def gpu_models(path: Path = TABLES) -> dict[str, GpuModel]:
    """The GPU tables of `path` (gpus.toml), checked: every profile's name agrees with its
    geometry (its "Ng" and the memory its slices hold), placements lie on the GPU."""
    data = tomllib.loads(path.read_text())
    geometry = data["geometry"]
    out: dict[str, GpuModel] = {}
    for key, gpu in data["gpu"].items():
        profiles = []
        for name, kind in gpu["profiles"].items():
            g = geometry[kind]
            m = _NAME.match(name)
            if (
                m is None
                or int(m.group(1)) != g["compute"]
                or bool(m.group(3)) != g.get("media", False)
            ):
                raise ValueError(f"{path}: {key} profile {name!r} does not match geometry {kind}")
            share = gpu["memory_gb"] * g["memory_slices"] / MEMORY_SLICES
            if abs(int(m.group(2)) - share) > 0.08 * share + 1:  # the name: rounded GB
                raise ValueError(f"{path}: {key} profile {name!r}: {share:.0f} GB by its slices")
            if any(s + g["memory_slices"] > MEMORY_SLICES for s in g["starts"]):
                raise ValueError(f"{path}: geometry {kind} starts beyond the GPU's memory slices")
            profiles.append(
                MigProfile(
                    name,
                    g["compute"],
                    g["memory_slices"],
                    tuple(g["starts"]),
                    g["max"],
                    g.get("media", False),
                    int(m.group(2)),
                    g["compute"] * gpu["sms_per_slice"],
                )  # fmt: skip
            )
        profiles.sort(key=lambda p: (p.compute, p.memory_slices, p.media))
        out[key] = GpuModel(
            key, tuple(gpu["aliases"]), gpu["memory_gb"], gpu["sms_per_slice"], tuple(profiles)
        )
    return out


def find_gpu(name: str) -> GpuModel:
    """The GPU model called `name` (its key, an alias, or an NVML device name)."""
    scored = [(m.match(name), m) for m in gpu_models().values()]
    score, model = max(scored, key=lambda sm: sm[0])
    if score:
        return model
    raise ValueError(f"unknown GPU {name!r}; known: {', '.join(gpu_models())} (gpus.toml)")


@dataclass(frozen=True)
class CpuTopology:
    """The cores this process may run on, grouped by NUMA node, and the machine's memory."""

    cores: tuple[int, ...]
    nodes: dict[int, tuple[int, ...]]
    memory_bytes: int


def parse_cpulist(text: str) -> tuple[int, ...]:
    """'0-3,8,10-11' (the kernel's cpulist format) -> (0, 1, 2, 3, 8, 10, 11)."""
    cores: list[int] = []
    for part in text.strip().split(","):
        if not part:
            continue
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()) or (hi and int(hi) < int(lo)):
            raise ValueError(f"not a core list: {text!r} (e.g. 0-3,8)")
        cores.extend(range(int(lo), int(hi or lo) + 1))
    if len(set(cores)) != len(cores):
        raise ValueError(f"core list {text!r} names a core twice")
    return tuple(sorted(cores))


def cpu_topology(sysfs: Path = Path("/sys/devices/system/node")) -> CpuTopology:
    """This machine's: the affinity mask (what a container was given), NUMA nodes from sysfs
    (one node holding every core where sysfs has none), memory from sysconf."""
    cores = tuple(sorted(os.sched_getaffinity(0)))
    nodes: dict[int, tuple[int, ...]] = {}
    for node in sorted(sysfs.glob("node[0-9]*")):
        listed = parse_cpulist((node / "cpulist").read_text())
        mine = tuple(c for c in listed if c in cores)
        if mine:
            nodes[int(node.name[4:])] = mine
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return CpuTopology(cores, nodes or {0: cores}, memory)
