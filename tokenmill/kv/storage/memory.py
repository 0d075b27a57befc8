"""Host memory for the KV pool: zeroed and mapped lazily, backed by transparent huge pages where
the kernel offers them, and faulted in ahead of use by a background thread.

A fresh anonymous mapping costs nothing at start-up, but the first write to each page faults:
on this VM about 13 us per 4 KiB page when new K/V rows land in never-used blocks, 16% of a
2048-token prefill step (BENCHMARKS.md). Huge pages (MADV_HUGEPAGE) cut the faults 512-fold and
the TLB misses of attention's block walks with them. The prefaulter then populates the pool in
the order the block allocator hands blocks out (ascending ids first), at the lowest CPU
priority, with MADV_POPULATE_WRITE, which maps pages without changing their contents, so it
never races the engine's own writes. Where the kernel lacks either call, memory stays lazy.
"""

from __future__ import annotations

import ctypes
import logging
import mmap
import os
import threading
import time

import numpy as np
import torch

log = logging.getLogger(__name__)

MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux 5.14+
CHUNK_BYTES = 2 << 20  # per row of the pool per pass: one huge page


def host_zeros(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A zeroed CPU tensor on its own anonymous private mapping (huge pages asked for)."""
    numel = 1
    for d in shape:
        numel *= d
    nbytes = numel * dtype.itemsize
    if nbytes == 0:
        return torch.zeros(shape, dtype=dtype)
    if not hasattr(mmap, "MAP_PRIVATE"):  # not POSIX: calloc'ed, also lazily mapped
        return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
    region = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        region.madvise(MADV_HUGEPAGE)
    except (OSError, AttributeError):
        pass  # no THP: 4 KiB pages
    return torch.frombuffer(region, dtype=torch.uint8).view(dtype).view(shape)


def _madvise():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


class Prefaulter:
    """Populates the pages of KV tensors [2, kv_heads, slots, x] in ascending slot order."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.tensors = [t for t in tensors if t.device.type == "cpu" and t.numel()]
        self.done = threading.Event()
        self.stopped = threading.Event()
        self.seconds = 0.0
        self.thread = threading.Thread(target=self._run, name="kv-prefault", daemon=True)

    def start(self) -> Prefaulter:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()

    def _rows(self):
        """(address, bytes) of each contiguous run of slots: one per (K/V, head) per tensor."""
        for t in self.tensors:
            per_row = t[0, 0].numel() * t.element_size()
            base = t.data_ptr()
            for r in range(t.shape[0] * t.shape[1]):
                yield base + r * per_row, per_row

    def _run(self) -> None:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except (OSError, AttributeError):
            pass
        madvise = _madvise()
        rows = list(self._rows())
        started = time.monotonic()
        page = mmap.PAGESIZE
        try:
            longest = max((n for _, n in rows), default=0)
            for offset in range(0, longest, CHUNK_BYTES):
                for addr, n in rows:
                    if self.stopped.is_set() or madvise is None:
                        return
                    if offset >= n:
                        continue
                    lo = (addr + offset) // page * page
                    hi = min(addr + n, addr + offset + CHUNK_BYTES)
                    if madvise(lo, hi - lo, MADV_POPULATE_WRITE):
                        log.debug("KV prefault unavailable (errno %d)", ctypes.get_errno())
                        return
        finally:
            self.seconds = time.monotonic() - started
            self.tensors = []
            self.done.set()
        log.info("KV pool faulted in ahead of use in %.1f s", self.seconds)
