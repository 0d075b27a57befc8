"""The hardware a profile is chosen for, as a value: the CPU's instruction sets, cores and
memory, and each GPU's name, compute capability, memory and MIG mode. Pure: GPUs come from the
caller (the partition binder reads NVML; tests and `--hardware FILE` give them), so profile
choice never touches a device."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

# the CPU features that decide a profile (as /proc/cpuinfo spells them)
ISA = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8", "avx512_fp16")


@dataclass(frozen=True)
class GpuInfo:
    name: str
    capability: tuple[int, int]  # CUDA compute capability
    memory_bytes: int
    mig: bool = False


@dataclass(frozen=True)
class Hardware:
    cpu_flags: frozenset[str]
    cores: int
    memory_bytes: int
    gpus: tuple[GpuInfo, ...] = field(default_factory=tuple)
    cpu_model: str = ""

    @property
    def cpu_bf16(self) -> bool:
        """Native bf16 matmuls on the CPU (AVX512-BF16 or AMX)."""
        return bool({"avx512_bf16", "amx_bf16"} & self.cpu_flags)

    def describe(self) -> str:
        isa = ", ".join(f for f in ISA if f in self.cpu_flags) or "no AVX2"
        out = f"CPU {self.cpu_model or '?'}: {self.cores} cores, {self.memory_bytes / 2**30:.1f} GB, {isa}"  # fmt: skip
        for i, g in enumerate(self.gpus):
            out += (f"; GPU {i} {g.name} (sm_{g.capability[0]}{g.capability[1]}, "
                    f"{g.memory_bytes / 2**30:.0f} GB{', MIG' if g.mig else ''})")  # fmt: skip
        return out


def detect_cpu(cpuinfo: Path = Path("/proc/cpuinfo")) -> Hardware:
    """This machine's CPU (flags and model name from /proc/cpuinfo, the cores this process may
    use, physical memory); no GPUs (add them with `with_gpus`)."""
    flags: frozenset[str] = frozenset()
    model = ""
    if cpuinfo.exists():
        for line in cpuinfo.read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features") and not flags:
                flags = frozenset(value.split())
            elif key.strip() == "model name" and not model:
                model = value.strip()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return Hardware(flags, len(os.sched_getaffinity(0)), memory, (), model)


def load_hardware(path: str | Path) -> Hardware:
    """A described machine (JSON: cpu_flags, cores, memory_gb, gpus: [{name, capability,
    memory_gb, mig}]): profiles for hardware you do not have."""
    data = json.loads(Path(path).read_text())
    known = {"cpu_flags", "cores", "memory_gb", "gpus", "cpu_model"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}; known: {sorted(known)}")
    gpus = []
    for g in data.get("gpus", []):
        extra = sorted(set(g) - {"name", "capability", "memory_gb", "mig"})
        if extra:
            raise ValueError(f"{path}: unknown GPU keys {extra}")
        cap = tuple(int(x) for x in str(g["capability"]).split("."))
        if len(cap) != 2:
            raise ValueError(
                f"{path}: capability is MAJOR.MINOR, e.g. 9.0, got {g['capability']!r}"
            )
        gpus.append(GpuInfo(g["name"], cap, int(g["memory_gb"] * 2**30), bool(g.get("mig", False))))  # type: ignore[arg-type]
    return Hardware(
        frozenset(data.get("cpu_flags", [])), int(data.get("cores", 1)),
        int(data.get("memory_gb", 8) * 2**30), tuple(gpus), data.get("cpu_model", ""),
    )  # fmt: skip
