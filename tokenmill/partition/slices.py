"""Where an instance runs (a fleet's `slice = ...`), parsed once into a value:

"1g.18gb"           a MIG profile: the planner places it on a GPU
"MIG-<uuid>"        a MIG device as NVML lists it (bound by its UUID, never an index)
"gpu-share=0.25"    a share of a GPU's memory (no compute isolation), ",gpu=1" to pick one
"cores=0-1", "cores=1", "cores=0,2-3"   CPU cores (the process's affinity and threads)
"cores=1:shared"    a core set several instances share (the kernel divides its time between
                    them), still apart from every other instance's cores
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenmill.partition.profiles import parse_cpulist

_PROFILE = re.compile(r"^\d+g\.\d+gb(\+me)?$")
_UUID = re.compile(r"^MIG-[0-9A-Fa-f]{8}(-[0-9A-Fa-f]{4}){3}-[0-9A-Fa-f]{12}$")
FORMS = '"1g.18gb" (a MIG profile), "MIG-<uuid>", "gpu-share=0.25[,gpu=N]", "cores=0-1[:shared]"'


@dataclass(frozen=True)
class MigSlice:
    profile: str


@dataclass(frozen=True)
class MigDevice:
    uuid: str


@dataclass(frozen=True)
class GpuShare:
    fraction: float
    gpu: int | None = None  # None: the planner picks


@dataclass(frozen=True)
class Cores:
    cores: tuple[int, ...]
    shared: bool = False  # other instances naming the same set (":shared") run there too


Slice = MigSlice | MigDevice | GpuShare | Cores


def parse_slice(text: str) -> Slice:
    """One slice string -> its value; a ValueError naming the accepted forms otherwise."""
    s = text.strip()
    if _PROFILE.match(s):
        return MigSlice(s)
    if s.startswith("MIG-"):
        if not _UUID.match(s):
            raise ValueError(
                f"slice {text!r}: a MIG device UUID is MIG-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx"
            )
        return MigDevice(s)
    key, eq, rest = s.partition("=")
    if eq and key == "cores":
        rest, colon, mode = rest.partition(":")
        if colon and mode != "shared":
            raise ValueError(f"slice {text!r}: after the cores only ':shared' may follow")
        try:
            cores = parse_cpulist(rest)
        except ValueError as e:
            raise ValueError(f"slice {text!r}: {e}") from None
        if not cores:
            raise ValueError(f"slice {text!r} names no core")
        return Cores(cores, shared=bool(colon))
    if eq and key == "gpu-share":
        share, _, more = rest.partition(",")
        gpu = None
        if more:
            k, _, v = more.partition("=")
            if k != "gpu" or not v.isdigit():
                raise ValueError(f"slice {text!r}: after the share only ',gpu=N' may follow")
            gpu = int(v)
        try:
            fraction = float(share)
        except ValueError:
            raise ValueError(f"slice {text!r}: the share is a number in (0, 1]") from None
        if not 0 < fraction <= 1:
            raise ValueError(f"slice {text!r}: the share is a number in (0, 1], got {fraction}")
        return GpuShare(fraction, gpu)
    raise ValueError(f"slice {text!r} is none of {FORMS}")


def describe(s: Slice) -> str:
    if isinstance(s, MigSlice):
        return s.profile
    if isinstance(s, MigDevice):
        return s.uuid
    if isinstance(s, GpuShare):
        return f"gpu-share={s.fraction:g}" + (f",gpu={s.gpu}" if s.gpu is not None else "")
    return "cores=" + ",".join(map(str, s.cores)) + (":shared" if s.shared else "")
