"""The memory cap of an instance (tokenmill/partition/cgroups.py): a control group per instance
with its limit, in the v2 and v1 layouts (directories laid out as the kernel's), the process
written into it; RLIMIT_DATA where no cgroup filesystem can be written."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from tokenmill.partition import cgroups
from tokenmill.partition.cgroups import confine, group_dir, memory_of, parse_bytes, remove, version


def test_memory_sizes_parse_in_binary_units():
    assert parse_bytes(4096) == 4096
    assert parse_bytes("4GiB") == parse_bytes("4G") == parse_bytes("4gb") == 4 << 30
    assert parse_bytes("512MiB") == parse_bytes("512m") == 512 << 20
    assert parse_bytes("1.5GiB") == 3 << 29
    for bad in ("lots", "-1G", "0", 0, "4 parsecs"):
        with pytest.raises(ValueError):
            parse_bytes(bad)


def v2_root(tmp_path: Path) -> Path:
    (tmp_path / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
    (tmp_path / "cgroup.subtree_control").write_text("cpu\n")
    return tmp_path


def test_v2_a_group_per_instance_with_its_cap_and_the_process(tmp_path: Path):
    root = v2_root(tmp_path)
    assert version(root) == 2
    said = confine("chat#1", 3 << 30, pid=4242, root=root)
    group = root / "tokenmill" / "chat_1"
    assert group_dir("chat#1", root) == group and "by cgroup" in said
    assert (group / "memory.max").read_text() == str(3 << 30)
    assert (group / "cgroup.procs").read_text() == "4242"
    assert (root / "cgroup.subtree_control").read_text() == "+memory"  # handed down
    (group / "memory.current").write_text("1000")
    assert memory_of("chat#1", root) == (1000, 3 << 30)


def test_v1_the_memory_controllers_limit(tmp_path: Path):
    (tmp_path / "memory").mkdir()
    assert version(tmp_path) == 1
    confine("a", 1 << 30, pid=7, root=tmp_path)
    group = tmp_path / "memory" / "tokenmill" / "a"
    assert (group / "memory.limit_in_bytes").read_text() == str(1 << 30)
    assert (group / "cgroup.procs").read_text() == "7"
    for f in group.iterdir():
        f.unlink()
    remove("a", tmp_path)
    assert not group.exists()


def test_without_a_cgroup_filesystem_rlimit_data_caps_the_process(tmp_path: Path):
    """In a child (a cap is for life): its private memory past the cap fails to allocate."""
    code = (
        "import resource, sys; from pathlib import Path\n"
        "from tokenmill.partition.cgroups import confine\n"
        "print(confine('x', 512 << 20, root=Path(sys.argv[1])))\n"
        "print(resource.getrlimit(resource.RLIMIT_DATA)[0])\n"
        "try:\n    b = bytearray(1 << 30)\nexcept MemoryError:\n    print('refused')\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "none")],
                         capture_output=True, text=True, timeout=60, check=True).stdout.split("\n")  # fmt: skip
    assert "RLIMIT_DATA" in out[0] and int(out[1]) == 512 << 20 and out[2] == "refused"
    assert resource.getrlimit(resource.RLIMIT_DATA)[0] == resource.RLIM_INFINITY  # not ours


@pytest.mark.skipif(
    not os.access(cgroups.ROOT / "memory", os.W_OK) and not os.access(cgroups.ROOT, os.W_OK),
    reason="the cgroup filesystem is not writable here",
)
def test_the_kernel_enforces_the_cap_on_this_machine():
    """The real cgroup filesystem: a child capped at 256 MiB that touches 512 MiB is killed
    by the kernel (OOM inside its group); the group is removed after."""
    code = (
        "import sys; from tokenmill.partition.cgroups import confine\n"
        "print(confine('tm-test-cap', 256 << 20), flush=True)\n"
        "b = bytearray(512 << 20)\n"
        "print('survived', flush=True)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    try:
        assert "by cgroup" in p.stdout, p.stdout + p.stderr
        assert "survived" not in p.stdout and p.returncode == -9  # SIGKILL, the OOM killer
    finally:
        remove("tm-test-cap")
