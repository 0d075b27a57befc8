"""The partition binder (tokenmill/partition/binder.py) against a fake NVML with MIG devices:
instances bind to MIG devices by UUID, never by index; a GPU not in MIG mode falls back to a
memory share; CPU instances get their cores and thread counts, applied in their own process."""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from tokenmill.partition.binder import bind, inventory
from tokenmill.partition.planner import Want, plan
from tokenmill.partition.profiles import CpuTopology, find_gpu
from tokenmill.partition.slices import Cores, GpuShare, MigDevice, MigSlice

GB = 1 << 30


class FakeNVML:
    """pynvml's functions over a described machine: GPUs (name, uuid, memory, mig mode) and
    their MIG devices (profile, uuid, memory) in sparse slots, as NVML lists them."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus):
        self.gpus = gpus
        self.inited = False

    def nvmlInit(self):
        self.inited = True

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return ("gpu", i)

    def nvmlDeviceGetMigMode(self, h):
        g = self.gpus[h[1]]
        if g.get("mig") is None:
            raise self.NVMLError("not supported")
        return (int(g["mig"]), int(g["mig"]))

    def nvmlDeviceGetMaxMigDeviceCount(self, h):
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h, k):
        slots = self.gpus[h[1]].get("slots", {})
        if k not in slots:
            raise self.NVMLError("not found")
        return ("mig", h[1], k)

    def _mig(self, h):
        return self.gpus[h[1]]["slots"][h[2]]

    def nvmlDeviceGetUUID(self, h):
        return self._mig(h)["uuid"] if h[0] == "mig" else self.gpus[h[1]]["uuid"]

    def nvmlDeviceGetName(self, h):
        g = self.gpus[h[1]]
        return f"{g['name']} MIG {self._mig(h)['profile']}".encode() if h[0] == "mig" else g["name"]

    def nvmlDeviceGetMemoryInfo(self, h):
        gb = self._mig(h)["gb"] if h[0] == "mig" else self.gpus[h[1]]["gb"]
        return SimpleNamespace(total=gb * GB)


def uuid(n: int) -> str:
    return f"MIG-{n:08x}-0000-4000-8000-{n:012x}"


H200_MIG = {"name": "NVIDIA H200", "uuid": "GPU-aaaa", "gb": 141, "mig": True,
            "slots": {0: {"profile": "1g.35gb", "uuid": uuid(7), "gb": 35},
                      2: {"profile": "1g.18gb", "uuid": uuid(1), "gb": 18},
                      3: {"profile": "1g.18gb", "uuid": uuid(2), "gb": 18},
                      5: {"profile": "1g.18gb", "uuid": uuid(3), "gb": 18}}}  # fmt: skip
H200_PLAIN = {"name": "NVIDIA H200", "uuid": "GPU-bbbb", "gb": 141, "mig": False}
CPU = CpuTopology((0, 1, 2, 3), {0: (0, 1, 2, 3)}, 64 * GB)


def test_inventory_lists_mig_devices_by_uuid():
    nvml = FakeNVML([H200_MIG, H200_PLAIN, {"name": "NVIDIA L4", "uuid": "GPU-cccc", "gb": 24}])
    gpus = inventory(nvml)
    assert nvml.inited and [g.mig for g in gpus] == [True, False, False]
    assert [(m.profile, m.uuid) for m in gpus[0].instances] == [
        ("1g.35gb", uuid(7)), ("1g.18gb", uuid(1)), ("1g.18gb", uuid(2)), ("1g.18gb", uuid(3))
    ]  # fmt: skip
    assert gpus[0].instances[0].memory_bytes == 35 * GB and gpus[1].instances == ()


def test_profiles_bind_to_free_mig_devices_by_uuid():
    gpus = inventory(FakeNVML([H200_MIG]))
    wants = [Want("large", MigSlice("1g.35gb"))] + [Want(f"s{i}", MigSlice("1g.18gb")) for i in range(3)]  # fmt: skip
    p = plan(wants, CPU, find_gpu("NVIDIA H200"))
    assert p.ok
    b = {x.name: x for x in bind(list(p.placements), gpus)}
    assert b["large"].env == {"CUDA_VISIBLE_DEVICES": uuid(7)}
    assert sorted(b[f"s{i}"].env["CUDA_VISIBLE_DEVICES"] for i in range(3)) == [uuid(1), uuid(2), uuid(3)]  # fmt: skip
    four = plan(wants + [Want("s3", MigSlice("1g.18gb"))], CPU, find_gpu("h200"))
    with pytest.raises(ValueError, match="s3: GPU 0 .* no free 1g.18gb device.*nvidia-smi mig -cgi 1g.18gb"):  # fmt: skip
        bind(list(four.placements), gpus)


def test_a_gpu_not_in_mig_mode_falls_back_to_a_memory_share():
    gpus = inventory(FakeNVML([H200_PLAIN]))
    p = plan([Want("a", MigSlice("3g.71gb")), Want("b", MigSlice("1g.18gb"))], CPU, find_gpu("h200"))  # fmt: skip
    a, b = bind(list(p.placements), gpus)
    assert a.env == {"CUDA_VISIBLE_DEVICES": "GPU-bbbb"} and a.engine == {"gpu_memory_utilization": 0.5}  # fmt: skip
    assert "not in MIG mode" in a.notes[0] and "compute is not isolated" in a.notes[0]
    assert b.engine == {"gpu_memory_utilization": 0.125}
    share = plan([Want("c", GpuShare(0.25))], CPU, find_gpu("h200"))
    (c,) = bind(list(share.placements), gpus)
    assert (
        c.engine == {"gpu_memory_utilization": 0.25} and c.env["CUDA_VISIBLE_DEVICES"] == "GPU-bbbb"
    )


def test_named_mig_devices_and_missing_ones():
    gpus = inventory(FakeNVML([H200_MIG]))
    p = plan([Want("x", MigDevice(uuid(2)))], CPU, find_gpu("h200"))
    assert bind(list(p.placements), gpus)[0].env == {"CUDA_VISIBLE_DEVICES": uuid(2)}
    missing = plan([Want("y", MigDevice(uuid(99)))], CPU, find_gpu("h200"))
    with pytest.raises(ValueError, match="y: no MIG device"):
        bind(list(missing.placements), gpus)


def test_cores_become_affinity_and_threads_in_the_instance_process():
    p = plan([Want("a", Cores((1,))), Want("b", Cores((0,)))], CpuTopology((0, 1), {0: (0, 1)}, 8 * GB))  # fmt: skip
    a, b = bind(list(p.placements), [])
    assert a.cores == (1,) and a.env["OMP_NUM_THREADS"] == "1" and a.engine == {"num_threads": 1}
    code = (
        "import os, sys\n"
        "from tokenmill.partition.binder import Binding, apply\n"
        "apply(Binding('a', {'OMP_NUM_THREADS': '1'}, (int(sys.argv[1]),)))\n"
        "print(sorted(os.sched_getaffinity(0)), os.environ['OMP_NUM_THREADS'])\n"
    )
    core = max(os.sched_getaffinity(0))
    out = subprocess.run([sys.executable, "-c", code, str(core)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [f"[{core}]", "1"]
