"""The partition tables, slice strings and planner (tokenmill/partition/): every GPU's MIG table
is consistent, NVML device names find their GPU, and the planner places a layout exactly when one
exists (checked against brute force over every placement), never overlapping two instances."""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill.partition.planner import GB, Want, plan, table
from tokenmill.partition.profiles import (
    COMPUTE_SLICES,
    MEMORY_SLICES,
    CpuTopology,
    find_gpu,
    gpu_models,
    parse_cpulist,
)
from tokenmill.partition.slices import Cores, GpuShare, MigDevice, MigSlice, parse_slice

CPU = CpuTopology((0, 1, 2, 3), {0: (0, 1), 1: (2, 3)}, 64 * GB)
UUID = "MIG-4f8c1e2a-1b2c-4d5e-8f90-123456789abc"


def test_every_gpu_table_is_consistent():
    models = gpu_models()
    assert {"a100-40gb", "a100-80gb", "h100-80gb", "h100-94gb", "h200", "b200", "gb200"} <= set(models)  # fmt: skip
    for m in models.values():
        names = [p.name for p in m.profiles]
        assert len(names) == 7 and len(set(names)) == 7
        full = m.profiles[-1]
        assert (full.compute, full.memory_slices, full.starts, full.max) == (7, 8, (0,), 1)
        for p in m.profiles:
            assert all(s + p.memory_slices <= MEMORY_SLICES for s in p.starts)
            assert p.name.startswith(f"{p.compute}g.") and p.media == p.name.endswith("+me")
            # the instance count NVIDIA lists is what the placements give alone
            alone = plan([Want(f"x{i}", MigSlice(p.name)) for i in range(p.max)], CPU, m)
            assert alone.ok, (m.key, p.name, alone.problems)
            more = plan([Want(f"x{i}", MigSlice(p.name)) for i in range(p.max + 1)], CPU, m)
            assert not more.ok, (m.key, p.name)
    h200 = models["h200"]
    assert [p.name for p in h200.profiles] == [
        "1g.18gb", "1g.18gb+me", "1g.35gb", "2g.35gb", "3g.71gb", "4g.71gb", "7g.141gb"
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("NVIDIA H100 80GB HBM3", "h100-80gb"),
        ("NVIDIA H100 NVL", "h100-94gb"),  # the longer name wins over "H100"
        ("NVIDIA H200", "h200"),
        ("NVIDIA B200", "b200"),
        ("NVIDIA GB200", "gb200"),  # not B200
        ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
        ("NVIDIA A100 80GB PCIe", "a100-80gb"),
        ("h200", "h200"),
        ("H100", "h100-80gb"),
    ],
)
def test_device_names_find_their_gpu(name, key):
    assert find_gpu(name).key == key


def test_unknown_gpu_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown GPU 'rtx9999'; known: .*h200"):
        find_gpu("rtx9999")
    with pytest.raises(ValueError, match="has no MIG profile '1g.10gb'.*1g.18gb"):
        find_gpu("h200").profile("1g.10gb")


def test_slice_strings():
    assert parse_slice("1g.18gb") == MigSlice("1g.18gb")
    assert parse_slice("1g.18gb+me") == MigSlice("1g.18gb+me")
    assert parse_slice(UUID) == MigDevice(UUID)
    assert parse_slice("gpu-share=0.25") == GpuShare(0.25)
    assert parse_slice("gpu-share=0.5,gpu=1") == GpuShare(0.5, 1)
    assert parse_slice("cores=0-1") == Cores((0, 1))
    assert parse_slice("cores=1") == Cores((1,))
    assert parse_slice("cores=0,2-3") == Cores((0, 2, 3))
    for bad, why in [
        ("2 cores", "none of"),
        ("MIG-123", "MIG device UUID"),
        ("gpu-share=0", r"\(0, 1\]"),
        ("gpu-share=1.5", r"\(0, 1\]"),
        ("gpu-share=half", "a number"),
        ("gpu-share=0.5,dev=1", "gpu=N"),
        ("cores=3-1", "not a core list"),
        ("cores=1,1", "twice"),
        ("cores=", "names no core"),
    ]:
        with pytest.raises(ValueError, match=why):
            parse_slice(bad)
    assert parse_cpulist("0-3,8,10-11\n") == (0, 1, 2, 3, 8, 10, 11)


def occupancy_ok(p, model) -> bool:
    """No two MIG instances of a GPU overlap in memory slices; compute within 7; one media."""
    by_gpu: dict[int, list] = {}
    for x in p.placements:
        if x.start is not None:
            by_gpu.setdefault(x.gpu, []).append(x)
    for xs in by_gpu.values():
        used = 0
        for x in xs:
            prof = model.profile(x.slice)
            assert x.start in prof.starts
            mask = ((1 << prof.memory_slices) - 1) << x.start
            if used & mask:
                return False
            used |= mask
        if sum(model.profile(x.slice).compute for x in xs) > COMPUTE_SLICES:
            return False
        if sum(model.profile(x.slice).media for x in xs) > 1:
            return False
    return True


def brute_force_fits(profiles, model, gpus) -> bool:
    """Whether any assignment of (GPU, start) to each profile is a valid layout."""
    options = [[(g, s) for g in range(gpus) for s in p.starts] for p in profiles]
    for combo in itertools.product(*options):
        ok = True
        for g in range(gpus):
            mine = [(p, s) for p, (gg, s) in zip(profiles, combo) if gg == g]
            used = 0
            for p, s in mine:
                mask = ((1 << p.memory_slices) - 1) << s
                if used & mask:
                    ok = False
                    break
                used |= mask
            counts: dict[str, int] = {}
            for p, _ in mine:
                counts[p.name] = counts.get(p.name, 0) + 1
            if (
                not ok
                or sum(p.compute for p, _ in mine) > COMPUTE_SLICES
                or sum(p.media for p, _ in mine) > 1
                or any(counts[p.name] > p.max for p, _ in mine)
            ):
                ok = False
                break
        if ok:
            return True
    return False


@pytest.mark.parametrize("gpus", [1, 2])
def test_planner_places_exactly_the_layouts_that_exist(gpus):
    """Random sets of fixed profiles on H100s: placeable iff a brute-force search finds a
    layout, and every plan it gives is a valid one."""
    model = find_gpu("h100-80gb")
    rng = random.Random(gpus)
    seen = {True: 0, False: 0}
    for _ in range(150):
        chosen = [rng.choice(model.profiles) for _ in range(rng.randint(1, 4 if gpus == 2 else 6))]
        p = plan([Want(f"i{k}", MigSlice(q.name)) for k, q in enumerate(chosen)], CPU, model, gpus)
        assert p.ok == brute_force_fits(chosen, model, gpus), [q.name for q in chosen]
        if p.ok:
            assert occupancy_ok(p, model)
        seen[p.ok] += 1
    assert seen[True] > 10 and seen[False] > 10  # both outcomes exercised


def test_one_large_and_six_small_are_proposed_on_an_h200():
    wants = [Want("large", None, 30 * GB)] + [Want(f"small{i}", None, 8 * GB) for i in range(6)]
    p = plan(wants, CPU, find_gpu("h200"))
    assert p.ok, p.problems
    slices = {x.name: x.slice for x in p.placements}
    assert slices["large"] == "1g.35gb" and all(slices[f"small{i}"] == "1g.18gb" for i in range(6))
    assert occupancy_ok(p, find_gpu("h200")) and all(x.proposed for x in p.placements)
    large = next(x for x in p.placements if x.name == "large")
    assert large.memory_share == 2 / 8 and large.compute_share == 1 / 7 and large.sms == 16
    text = table(p)
    assert "placeable" in text and "1g.35gb (proposed)" in text


def test_layouts_that_cannot_be_placed_say_why():
    h200 = find_gpu("h200")
    big = [Want("large", MigSlice("3g.71gb"))] + [Want(f"s{i}", MigSlice("1g.18gb")) for i in range(6)]  # fmt: skip
    p = plan(big, CPU, h200)
    assert not p.ok and "9 compute slices" in p.problems[0] and "has 7" in p.problems[0]
    two_4g = plan([Want("a", MigSlice("4g.71gb")), Want("b", MigSlice("4g.71gb"))], CPU, h200)
    assert not two_4g.ok and "8 compute slices" in two_4g.problems[0]
    media = plan([Want("a", MigSlice("1g.18gb+me")), Want("b", MigSlice("1g.18gb+me"))], CPU, h200)
    assert not media.ok and "no arrangement" in media.problems[0]  # the sums fit, one media
    small = plan([Want("a", MigSlice("1g.18gb"), 40 * GB)], CPU, h200)
    assert not small.ok and "holds 18 GB" in small.problems[0]
    huge = plan([Want("a", None, 400 * GB)], CPU, h200)
    assert not huge.ok and "more than any MIG profile" in huge.problems[0]
    wrong = plan([Want("a", MigSlice("1g.10gb"))], CPU, h200)
    assert not wrong.ok and "no MIG profile '1g.10gb'" in wrong.problems[0]
    cpu_only = plan([Want("a", MigSlice("1g.10gb"))], CPU, None)
    assert not cpu_only.ok and "has no GPU" in cpu_only.problems[0]


def test_memory_shares_take_whole_gpus_from_mig():
    h100 = find_gpu("h100-80gb")
    p = plan([Want("a", GpuShare(0.6)), Want("b", GpuShare(0.6))], CPU, h100, gpus=2)
    assert p.ok and {x.gpu for x in p.placements} == {0, 1}
    assert not plan([Want("a", GpuShare(0.6)), Want("b", GpuShare(0.6))], CPU, h100).ok
    mixed = plan([Want("m", MigSlice("1g.10gb")), Want("s", GpuShare(0.5))], CPU, h100, gpus=2)
    assert mixed.ok
    assert {x.name: x.gpu for x in mixed.placements} == {"m": 0, "s": 1}
    onto_mig = plan([Want("m", MigSlice("1g.10gb")), Want("s", GpuShare(0.5, 0))], CPU, h100, 2)
    assert not onto_mig.ok and "runs MIG instances" in onto_mig.problems[0]
    too_big = plan([Want("s", GpuShare(0.25), 30 * GB)], CPU, h100)
    assert not too_big.ok and "its share holds 20.0 GB" in too_big.problems[0]
    assert not plan([Want("s", GpuShare(0.5, 3))], CPU, h100, gpus=2).ok


def test_core_sets_exist_and_never_overlap():
    ok = plan([Want("a", Cores((0, 1))), Want("b", Cores((2,))), Want("c", Cores((3,)))], CPU)
    assert ok.ok and [x.compute_share for x in ok.placements] == [0.5, 0.25, 0.25]
    overlap = plan([Want("a", Cores((0, 1))), Want("b", Cores((1, 2)))], CPU)
    assert not overlap.ok and "shares cores with a" in overlap.problems[0]
    missing = plan([Want("a", Cores((7,)))], CPU)
    assert not missing.ok and "cores [7]" in missing.problems[0]
    memory = plan([Want("a", Cores((0,)), 40 * GB), Want("b", Cores((1,)), 40 * GB)], CPU)
    assert not memory.ok and "the machine has 64.0 GB" in memory.problems[0]
    same_uuid = plan([Want("a", MigDevice(UUID)), Want("b", MigDevice(UUID))], CPU)
    assert not same_uuid.ok and "same MIG device" in same_uuid.problems[0]
    dupes = plan([Want("a", Cores((0,))), Want("a", Cores((1,)))], CPU)
    assert not dupes.ok and "unique" in dupes.problems[0]


def test_a_shared_core_set_is_divided_among_those_naming_it():
    """One large on cores 0-1, six small sharing cores 2-3 (CPU's "one large + six small"): the
    small ones split their set's compute; naming an overlapping set, or the same set without
    ':shared' next to sharers, is refused."""
    assert parse_slice("cores=2-3:shared") == Cores((2, 3), shared=True)
    with pytest.raises(ValueError, match="only ':shared'"):
        parse_slice("cores=1:mine")
    small = [Want(f"s{i}", Cores((2, 3), shared=True)) for i in range(6)]
    ok = plan([Want("large", Cores((0, 1))), *small], CPU)
    assert ok.ok and [x.compute_share for x in ok.placements] == pytest.approx([0.5] + [0.5 / 6] * 6)  # fmt: skip
    assert ok.placements[1].slice == "cores=2,3:shared" and ok.placements[1].cores == (2, 3)
    for intruder in (Cores((2, 3)), Cores((3,), shared=True), Cores((1, 2), shared=True)):
        bad = plan([*small, Want("x", intruder)], CPU)
        assert not bad.ok and "x: shares cores with s0" in bad.problems[0]


def test_partition_cli(tmp_path: Path):
    fleet = tmp_path / "FLEET.toml"
    fleet.write_text(
        '[[instances]]\nname = "a"\nmodel = "default"\nslice = "3g.71gb"\n'
        '[[instances]]\nname = "b"\nmodel = "default"\nslice = "3g.71gb"\nreplicas = 2\n'
    )
    run = lambda *a: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "tokenmill.cli", "partition", *a], capture_output=True, text=True
    )
    bad = run("plan", "--device", "h200", "--config", str(fleet))
    assert bad.returncode == 1 and "NOT placeable" in bad.stdout and "compute slices" in bad.stdout
    good = run("plan", "--device", "h200", "--gpus", "2", "--config", str(fleet))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "b#1" in good.stdout and "3g.71gb" in good.stdout
    listed = run("list", "--device", "b200")
    assert (
        listed.returncode == 0
        and "7g.180gb" in listed.stdout
        and "this machine: cores" in listed.stdout
    )
