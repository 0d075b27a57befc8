"""The partition planner (pure): given a fleet's instances (each a slice, or none to propose one,
and the memory it needs) and a machine (GPUs of one model, its CPU cores and memory), either
place every instance or say why not.

MIG profiles are placed by a search over each GPU's memory slices (`gpus.toml`: the starts each
profile may take, 7 compute slices, at most one media profile), the largest first; an instance
without a slice gets the smallest non-media profile that holds its memory, so "one large + six
small" on an H200 becomes 1g.35gb + 6 x 1g.18gb. A GPU in MIG mode serves MIG devices only, so
memory shares (`gpu-share=`) go to the other GPUs. Core sets must exist and never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.partition.profiles import (
    COMPUTE_SLICES,
    MEMORY_SLICES,
    CpuTopology,
    GpuModel,
    MigProfile,
)
from tokenmill.partition.slices import Cores, GpuShare, MigDevice, MigSlice, Slice, describe

GB = 1 << 30


@dataclass(frozen=True)
class Want:
    """One instance (replica) to place: its name, slice (None: propose one) and the memory it
    needs in bytes (weights + KV budget; None where unknown)."""

    name: str
    slice: Slice | None
    memory_bytes: int | None = None


@dataclass(frozen=True)
class Placement:
    name: str
    slice: str  # what it runs on, as a slice string (a MIG profile: placed below)
    gpu: int | None = None  # GPU index (MIG, gpu-share)
    start: int | None = None  # first memory slice (MIG)
    compute_share: float | None = None  # of the device it runs on (None: not isolated)
    memory_bytes: int | None = None  # what the slice holds (None: the machine's, shared)
    memory_share: float | None = None
    sms: int | None = None
    cores: tuple[int, ...] = ()
    proposed: bool = False  # the planner chose the slice


@dataclass(frozen=True)
class Plan:
    device: str
    placements: tuple[Placement, ...]
    problems: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        return not self.problems


@dataclass
class _Gpu:
    used: int = 0  # bitmask of memory slices
    compute: int = 0
    media: int = 0
    counts: dict[str, int] = field(default_factory=dict)


def plan(
    wants: list[Want],
    cpu: CpuTopology,
    gpu: GpuModel | None = None,
    gpus: int = 1,
) -> Plan:
    """Place `wants` on `gpus` GPUs of model `gpu` (None: a CPU-only machine) and `cpu`."""
    problems: list[str] = []
    notes: list[str] = []
    placed: dict[str, Placement] = {}
    names = [w.name for w in wants]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        problems.append(f"instance names must be unique: {', '.join(dupes)}")
    mig = [w for w in wants if isinstance(w.slice, MigSlice)]
    unplaced = [w for w in wants if w.slice is None]
    if gpu is None:
        for w in mig:
            problems.append(f"{w.name}: slice {w.slice.profile} is a MIG profile, and this "  # type: ignore[union-attr]
                            "machine has no GPU (--device NAME plans for one)")  # fmt: skip
        mig = []
        for w in unplaced:  # a CPU machine: propose nothing, the instance shares the cores
            placed[w.name] = Placement(w.name, "shared", compute_share=None)
            notes.append(f"{w.name}: no slice: it shares the CPU with every other such instance")
        unplaced = []
    mig_gpus = _place_mig(gpu, gpus, mig + unplaced, placed, problems) if gpu else set()
    _place_shares(gpu, gpus, mig_gpus, wants, placed, problems)
    _place_devices(wants, placed, problems)
    _place_cores(cpu, wants, placed, problems)
    order = {n: i for i, n in enumerate(names)}
    kind = f"{gpus} x {gpu.key}" if gpu else "cpu"
    chosen = tuple(sorted(placed.values(), key=lambda p: order.get(p.name, 0)))
    return Plan(kind, chosen, tuple(problems), tuple(notes))


def _candidates(gpu: GpuModel, w: Want, problems: list[str]) -> list[MigProfile]:
    if isinstance(w.slice, MigSlice):
        try:
            p = gpu.profile(w.slice.profile)
        except ValueError as e:
            problems.append(f"{w.name}: {e}")
            return []
        if w.memory_bytes is not None and w.memory_bytes > p.memory_gb * GB:
            problems.append(
                f"{w.name}: needs {w.memory_bytes / GB:.1f} GB, and {p.name} holds {p.memory_gb} GB"
            )
        return [p]
    need = w.memory_bytes or 0
    fits = [p for p in gpu.profiles if not p.media and p.memory_gb * GB >= need]
    if not fits:
        problems.append(
            f"{w.name}: needs {need / GB:.1f} GB, more than any MIG profile of {gpu.key} holds"
        )
    return fits


def _place_mig(
    gpu: GpuModel, count: int, wants: list[Want], placed: dict, problems: list[str]
) -> set[int]:
    """MIG profiles for `wants` on `count` GPUs (backtracking, hardest first); the GPUs used."""
    items = [(w, _candidates(gpu, w, problems)) for w in wants]
    if any(not c for _, c in items) or not items:
        return set()
    items.sort(key=lambda it: (-it[1][0].memory_slices, -it[1][0].compute))
    state = [_Gpu() for _ in range(count)]
    choice: list[tuple[int, MigProfile, int]] = []

    def fits(g: _Gpu, p: MigProfile, start: int) -> bool:
        mask = ((1 << p.memory_slices) - 1) << start
        return (
            not g.used & mask
            and g.compute + p.compute <= COMPUTE_SLICES
            and g.media + p.media <= 1
            and g.counts.get(p.name, 0) < p.max
        )

    def search(i: int) -> bool:
        if i == len(items):
            return True
        for p in items[i][1]:
            for gi, g in enumerate(state):
                for start in p.starts:
                    if not fits(g, p, start):
                        continue
                    mask = ((1 << p.memory_slices) - 1) << start
                    g.used |= mask
                    g.compute += p.compute
                    g.media += p.media
                    g.counts[p.name] = g.counts.get(p.name, 0) + 1
                    choice.append((gi, p, start))
                    if search(i + 1):
                        return True
                    choice.pop()
                    g.used &= ~mask
                    g.compute -= p.compute
                    g.media -= p.media
                    g.counts[p.name] -= 1
                if not g.used:  # empty GPUs are alike: trying the next one adds nothing
                    break
        return False

    if not search(0):
        least = [c[0] for _, c in items]
        compute = sum(p.compute for p in least)
        memory = sum(p.memory_slices for p in least)
        why = []
        if compute > COMPUTE_SLICES * count:
            why.append(f"they need {compute} compute slices, {count} x {gpu.key} has {COMPUTE_SLICES * count}")  # fmt: skip
        if memory > MEMORY_SLICES * count:
            why.append(f"{memory} memory slices, of {MEMORY_SLICES * count}")
        if not why:
            why.append("no arrangement of their placements fits (gpus.toml lists each profile's starts)")  # fmt: skip
        names = ", ".join(f"{w.name} ({c[0].name})" for w, c in items)
        problems.append(f"MIG instances {names} do not fit: {'; '.join(why)}")
        return set()
    for (w, _), (gi, p, start) in zip(items, choice):
        placed[w.name] = Placement(
            w.name, p.name, gi, start, p.compute / COMPUTE_SLICES, p.memory_gb * GB,
            p.memory_slices / MEMORY_SLICES, p.sms, proposed=w.slice is None,
        )  # fmt: skip
    return {gi for gi, _, _ in choice}


def _place_shares(
    gpu: GpuModel | None, count: int, mig_gpus: set[int], wants: list[Want], placed: dict,
    problems: list[str],
) -> None:  # fmt: skip
    shares = [w for w in wants if isinstance(w.slice, GpuShare)]
    if shares and gpu is None:
        problems += [f"{w.name}: {describe(w.slice)} needs a GPU (--device NAME)" for w in shares]  # type: ignore[arg-type]
        return
    free = [0.0] * count
    for w in sorted(shares, key=lambda w: w.slice.gpu is None):  # type: ignore[union-attr]
        s: GpuShare = w.slice  # type: ignore[assignment]
        assert gpu is not None
        options = [s.gpu] if s.gpu is not None else [g for g in range(count) if g not in mig_gpus]
        if s.gpu is not None and not 0 <= s.gpu < count:
            problems.append(f"{w.name}: gpu={s.gpu}, and the machine has GPUs 0-{count - 1}")
            continue
        if s.gpu is not None and s.gpu in mig_gpus:
            problems.append(f"{w.name}: GPU {s.gpu} runs MIG instances, which take it whole")
            continue
        target = next((g for g in options if free[g] + s.fraction <= 1 + 1e-9), None)
        if target is None:
            problems.append(f"{w.name}: no GPU has {s.fraction:g} of its memory left")
            continue
        free[target] += s.fraction
        holds = int(s.fraction * gpu.memory_gb * GB)
        if w.memory_bytes is not None and w.memory_bytes > holds:
            problems.append(f"{w.name}: needs {w.memory_bytes / GB:.1f} GB, its share holds {holds / GB:.1f} GB")  # fmt: skip
        placed[w.name] = Placement(w.name, describe(s), target, None, None, holds, s.fraction, None)


def _place_devices(wants: list[Want], placed: dict, problems: list[str]) -> None:
    seen: dict[str, str] = {}
    for w in wants:
        if isinstance(w.slice, MigDevice):
            if w.slice.uuid in seen:
                problems.append(f"{w.name} and {seen[w.slice.uuid]} name the same MIG device")
            seen[w.slice.uuid] = w.name
            placed[w.name] = Placement(w.name, w.slice.uuid)  # its size: NVML's, at start


def _place_cores(cpu: CpuTopology, wants: list[Want], placed: dict, problems: list[str]) -> None:
    owner: dict[int, str] = {}
    memory = 0
    sharers: dict[tuple[int, ...], int] = {}  # a ":shared" core set -> instances on it
    for w in wants:
        if isinstance(w.slice, Cores) and w.slice.shared:
            sharers[w.slice.cores] = sharers.get(w.slice.cores, 0) + 1
    shared_owner: dict[tuple[int, ...], str] = {}
    for w in wants:
        if not isinstance(w.slice, Cores):
            continue
        missing = [c for c in w.slice.cores if c not in cpu.cores]
        if missing:
            problems.append(f"{w.name}: cores {missing} are not this process's (it may use {_span(cpu.cores)})")  # fmt: skip
        first = shared_owner.setdefault(w.slice.cores, w.name) if w.slice.shared else w.name
        taken = sorted({owner[c] for c in w.slice.cores if c in owner and owner[c] != first})
        if taken:
            problems.append(f"{w.name}: shares cores with {', '.join(taken)}; core sets must not overlap "
                            "(instances that share one set all name it the same, with ':shared')")  # fmt: skip
        for c in w.slice.cores:
            owner.setdefault(c, first)
        memory += w.memory_bytes or 0
        share = len(w.slice.cores) / len(cpu.cores) / (sharers[w.slice.cores] if w.slice.shared else 1)  # fmt: skip
        placed[w.name] = Placement(
            w.name, describe(w.slice), compute_share=share,
            memory_bytes=w.memory_bytes, memory_share=(w.memory_bytes or 0) / cpu.memory_bytes,
            cores=w.slice.cores,
        )  # fmt: skip
    if memory > cpu.memory_bytes:
        problems.append(f"the CPU instances need {memory / GB:.1f} GB, the machine has {cpu.memory_bytes / GB:.1f} GB")  # fmt: skip


def _span(cores: tuple[int, ...]) -> str:
    return ",".join(map(str, cores))


def table(p: Plan) -> str:
    """The plan as an aligned text table, problems and notes below it."""
    rows = [("instance", "slice", "where", "compute", "memory", "SMs")]
    for x in p.placements:
        where = "-"
        if x.gpu is not None:
            where = f"GPU {x.gpu}" + (f", memory slices {x.start}+" if x.start is not None else "")
        elif x.cores:
            where = f"cores {_span(x.cores)}"
        compute = f"{x.compute_share:.0%}" if x.compute_share is not None else "shared"
        memory = "-" if x.memory_bytes is None else f"{x.memory_bytes / GB:.1f} GB"
        if x.memory_share is not None:
            memory += f" ({x.memory_share:.0%})"
        slice_ = x.slice + (" (proposed)" if x.proposed else "")
        rows.append((x.name, slice_, where, compute, memory, str(x.sms) if x.sms else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [f"plan for {p.device}: " + ("placeable" if p.ok else "NOT placeable")]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines += [f"problem: {m}" for m in p.problems] + [f"note: {m}" for m in p.notes]
    return "\n".join(lines)
