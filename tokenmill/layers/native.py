"""Native CPU kernels: C++ sources in `csrc/`, built on first use with the system's C++ compiler
and loaded through ctypes.

The sources use a plain C ABI and no torch headers, so a build takes about a second; the shared
library is cached under `$XDG_CACHE_HOME/tokenmill` (default `~/.cache/tokenmill`) keyed by the source, the
flags, the compiler and this CPU's instruction-set flags (`-march=native` code must not run on
another CPU model), so later starts load it at once. OpenMP comes from the same libgomp that torch
loaded (matched by soname), so the kernels share torch's thread pool instead of competing with it.
Without a compiler, or when the build fails, `load` raises `NativeUnavailable` and the callers stay
on their torch code.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = Path(__file__).parent / "csrc"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17")


class NativeUnavailable(RuntimeError):
    """The native kernels cannot be built or loaded here; the message says why."""


def compiler() -> str | None:
    for name in (os.environ.get("CXX", ""), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "tokenmill" / "kernels"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


@functools.cache
def load(name: str) -> ctypes.CDLL:
    """Build (once per source, compiler and CPU) and load `csrc/<name>.cpp`."""
    cxx = compiler()
    if cxx is None:
        raise NativeUnavailable("no C++ compiler (g++, c++, clang++ or $CXX) on PATH")
    source = SOURCES / f"{name}.cpp"
    headers = [h.read_text() for h in sorted(SOURCES.glob("*.h"))]  # included by the sources
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(
        "\0".join([source.read_text(), *headers, " ".join(FLAGS), version, _cpu_flags()]).encode()
    ).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if not target.exists():
        try:
            _build(cxx, source, target)
        except OSError:  # a read-only home: build into the temporary directory instead
            target = Path(tempfile.gettempdir()) / "tokenmill-kernels" / target.name
            if not target.exists():
                _build(cxx, source, target)
    import torch  # noqa: F401  (loads torch's libgomp first, so the library binds to it)

    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        raise NativeUnavailable(f"loading {target} failed: {e}") from e


def _build(cxx: str, source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: concurrent builders never see a half-written file.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    done = subprocess.run([cxx, *FLAGS, str(source), "-o", tmp], capture_output=True, text=True)
    if done.returncode:
        os.unlink(tmp)
        raise NativeUnavailable(f"building {source.name} failed: {done.stderr.strip()[-400:]}")
    os.replace(tmp, target)
    log.info("built native kernels %s -> %s", source.name, target)
