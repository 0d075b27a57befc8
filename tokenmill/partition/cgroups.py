"""An instance's memory cap, enforced by the kernel: a Linux control group per instance
(`<root>/tokenmill/<instance>`) with its memory limit, which the instance's engine-core process
joins before it loads anything. Past the cap the kernel reclaims, then OOM-kills inside that
group only: the other instances keep their memory, and the supervisor restarts the one killed.

cgroup v2 (`memory.max`) and v1 (`memory/.../memory.limit_in_bytes`) both; where the cgroup
filesystem is not writable (an unprivileged container), `RLIMIT_DATA` (the process's private
writable memory, what torch allocates) carries the cap instead and the log says which held.
`root` is a parameter so that tests run against a directory laid out as either version.
"""

from __future__ import annotations

import logging
import os
import re
import resource
from pathlib import Path

log = logging.getLogger(__name__)
ROOT = Path("/sys/fs/cgroup")
GROUP = "tokenmill"
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_bytes(value: int | str) -> int:
    """4294967296, "4GiB", "4G", "512MiB", "512m" -> bytes (binary units)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"a memory size must be positive, got {value}")
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)(?:i?[bB])?\s*", str(value))
    if not m:
        raise ValueError(f"{value!r} is not a memory size (bytes, or a number with KiB, MiB, GiB, TiB)")  # fmt: skip
    size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    if size <= 0:
        raise ValueError(f"a memory size must be positive, got {value!r}")
    return size


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


def version(root: Path = ROOT) -> int | None:
    """2 (unified), 1 (a memory controller of its own), or None (no cgroup filesystem)."""
    if (root / "cgroup.controllers").is_file():
        return 2
    if (root / "memory").is_dir():
        return 1
    return None


def group_dir(name: str, root: Path = ROOT) -> Path | None:
    v = version(root)
    if v == 2:
        return root / GROUP / _safe(name)
    if v == 1:
        return root / "memory" / GROUP / _safe(name)
    return None


def confine(name: str, memory_bytes: int, pid: int | None = None, root: Path = ROOT) -> str:
    """Cap process `pid` (default: this one) at `memory_bytes` in the group of instance `name`;
    what enforces it, in words. Never raises for a cgroup filesystem it cannot use."""
    pid = os.getpid() if pid is None else pid
    try:
        where = _cgroup(name, memory_bytes, pid, root)
        return f"memory cap {memory_bytes / (1 << 20):.0f} MiB by cgroup ({where})"
    except OSError as e:
        log.info("instance %s: no usable cgroup (%s); capping with RLIMIT_DATA", name, e)
    if pid != os.getpid():
        return "memory cap not enforced (no cgroup, and RLIMIT_DATA is per process)"
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    cap = memory_bytes if hard == resource.RLIM_INFINITY else min(memory_bytes, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (cap, hard))
    return f"memory cap {cap / (1 << 20):.0f} MiB by RLIMIT_DATA (no writable cgroup)"


def _cgroup(name: str, memory_bytes: int, pid: int, root: Path) -> Path:
    v = version(root)
    group = group_dir(name, root)
    if v is None or group is None:
        raise OSError("no cgroup filesystem")
    parent = group.parent
    parent.mkdir(exist_ok=True)
    if v == 2:  # the memory controller handed down to the groups below
        for level in (root, parent):
            control = level / "cgroup.subtree_control"
            if control.exists() and "memory" not in control.read_text().split():
                control.write_text("+memory")
    group.mkdir(exist_ok=True)
    limit = group / ("memory.max" if v == 2 else "memory.limit_in_bytes")
    limit.write_text(str(memory_bytes))
    if v == 2 and (group / "memory.swap.max").exists():
        (group / "memory.swap.max").write_text("0")  # the cap is memory, not memory + swap
    (group / "cgroup.procs").write_text(str(pid))
    return group


def remove(name: str, root: Path = ROOT) -> None:
    """The instance's group, once its process has exited (a no-op where there is none)."""
    group = group_dir(name, root)
    if group is not None and group.is_dir():
        try:
            group.rmdir()
        except OSError as e:  # still has a process, or a test directory with files
            log.debug("cgroup %s left: %s", group, e)


def memory_of(name: str, root: Path = ROOT) -> tuple[int, int] | None:
    """(bytes in use, cap) of the instance's group, where it has one."""
    v, group = version(root), group_dir(name, root)
    if group is None or not group.is_dir():
        return None
    used = group / ("memory.current" if v == 2 else "memory.usage_in_bytes")
    cap = group / ("memory.max" if v == 2 else "memory.limit_in_bytes")
    try:
        return int(used.read_text()), int(cap.read_text())
    except (OSError, ValueError):
        return None
