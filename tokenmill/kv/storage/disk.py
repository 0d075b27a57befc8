"""The disk KV tier: one safetensors file per block, named by the block's prefix hash.

Layout: `<kv_disk_dir>/.lock` (held while a server uses the directory; a second server is
refused) and `<kv_disk_dir>/<fingerprint>/<hash>.kvb`, where the fingerprint names the model
(its weight files' sizes and edges), dtype, KV dtype, block size and tensor shapes that wrote
them. With tensor or pipeline parallelism each rank keeps its shard of every block below
`<kv_disk_dir>/rank<r>-tp<T>-pp<P>/` (its own lock, budget and files), the layout in the
fingerprint too. Each file's metadata repeats the fingerprint and hash and carries a CRC-32 of
its tensors: a file that does not match, or whose checksum fails, is skipped, logged and
removed, never loaded. Files of other fingerprints (another model) are left alone.

Writes are atomic (a temporary file renamed) and run on a writer thread in order; a read of a
block still queued is served from the queue. The budget is counted in whole files, which all
have one size for one fingerprint. safetensors was chosen over raw files for its documented,
checked header (dtype, shape, offsets) and because every tool in the stack reads it.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import queue
import shutil
import struct
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

log = logging.getLogger(__name__)

FORMAT = "tokenmill-kv-block/1"
SUFFIX = ".kvb"
DEFAULT_DISK_BYTES = 8 << 30


def model_identity(path: str) -> list:
    """Cheap identity of a model's weights: each file's name, size and first and last MiB."""
    root = Path(path)
    if not root.exists():
        raise ValueError(f"cannot fingerprint the model at {path}: no such file or directory")
    files = [root] if root.is_file() else sorted(
        p for p in root.rglob("*") if p.suffix in (".safetensors", ".gguf", ".bin")
    )  # fmt: skip
    out = []
    for f in files:
        size = f.stat().st_size
        with open(f, "rb") as fh:
            head = fh.read(1 << 20)
            fh.seek(max(size - (1 << 20), 0))
            tail = fh.read(1 << 20)
        out.append([f.name, size, hashlib.blake2b(head + tail, digest_size=16).hexdigest()])
    return out


def fingerprint(identity: dict) -> str:
    return hashlib.blake2b(json.dumps(identity, sort_keys=True).encode(), digest_size=8).hexdigest()


def checksum(tensors: Sequence[torch.Tensor]) -> str:
    """CRC-32 of the tensors' bytes in place: it catches torn and bit-flipped files (every
    burst up to 32 bits) at 4x blake2b's speed here; the threat is the disk, not an adversary
    (the directory is the server's own)."""
    crc = 0
    for t in tensors:
        crc = zlib.crc32(t.contiguous().view(torch.uint8).numpy().data, crc)
    return f"{crc:08x}"


def _header(path: Path) -> dict:
    """A safetensors file's JSON header (8-byte little-endian length, then JSON)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > 1 << 20:
            raise ValueError("header too large")
        return json.loads(f.read(n))


class DiskBlocks:
    def __init__(
        self,
        directory: str,
        max_bytes: int | None,
        identity: dict,
        block_shapes: Sequence[tuple[torch.Size, torch.dtype]],
        num_ranks: int = 1,
    ) -> None:
        """`max_bytes` for this directory (None: a share of the free space); `num_ranks` such
        directories may share the filesystem (the ranks of one server), each with that budget."""
        self.root = Path(directory)
        self.num_ranks = num_ranks
        self._lock = self._take_lock()
        try:
            self._setup(directory, max_bytes, identity, block_shapes)
        except BaseException:
            os.close(self._lock)
            raise
        self._pending: dict[bytes, list[torch.Tensor]] = {}  # queued writes, readable
        self._mutex = threading.Lock()
        self._lost: list[bytes] = []  # writes that failed, for the policy
        self._queue: queue.Queue = queue.Queue()
        threading.Thread(target=self._writer, name="kv-disk-writer", daemon=True).start()

    def _setup(self, directory, max_bytes, identity, block_shapes) -> None:
        self.fingerprint = fingerprint(identity)
        self.dir = self.root / self.fingerprint
        self.dir.mkdir(exist_ok=True)
        self.shapes = list(block_shapes)
        self.file_bytes = len(self._encode(b"\0" * 16, [torch.zeros(s, dtype=d) for s, d in self.shapes]))  # fmt: skip
        found = sorted(self.dir.glob("*" + SUFFIX))
        ours = len(found) * self.file_bytes
        free = shutil.disk_usage(self.root).free + ours * self.num_ranks
        ranks = self.num_ranks
        budget = max_bytes if max_bytes is not None else min(DEFAULT_DISK_BYTES, free // 2 // ranks)
        if budget * ranks > free:
            per_rank = f" for each of {ranks} ranks" if ranks > 1 else ""
            raise ValueError(
                f"kv_disk_dir {directory} has {free / 2**30:.2f} GiB free (with this model's "
                f"cached blocks), kv_disk_memory asks for {budget / 2**30:.2f} GiB{per_rank}; "
                "free space or lower kv_disk_memory"
            )
        self.num_blocks = budget // self.file_bytes
        if self.num_blocks < 1:
            raise ValueError(
                f"kv_disk_memory of {budget} bytes holds no KV block ({self.file_bytes} bytes "
                "each); raise it"
            )

    def _take_lock(self):
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ValueError(f"kv_disk_dir {self.root} is not writable ({exc}); choose a directory this user can write") from exc  # fmt: skip
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(f"kv_disk_dir {self.root} is in use by another tokenmill server (pid {owner}); give each server its own kv_disk_dir") from None  # fmt: skip
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd

    # ---- start: what an earlier run left --------------------------------------------------
    def scan(self) -> list[bytes]:
        """Valid blocks in the directory, oldest first; invalid files are logged and removed."""
        others = [p.name for p in self.root.iterdir() if p.is_dir() and p.name != self.fingerprint]
        if others:
            log.info("kv_disk_dir %s: blocks of %d other model(s) or settings left alone", self.root, len(others))  # fmt: skip
        good: list[tuple[float, bytes]] = []
        for path in self.dir.glob("*" + SUFFIX):
            try:
                block_hash = bytes.fromhex(path.stem)
                meta = _header(path).get("__metadata__", {})
                stat = path.stat()
                if meta.get("fingerprint") != self.fingerprint or meta.get("hash") != path.stem:
                    raise ValueError("written by another model or settings")
                if stat.st_size != self.file_bytes:
                    raise ValueError(f"{stat.st_size} bytes, expected {self.file_bytes}")
            except (OSError, ValueError, UnicodeDecodeError) as exc:
                log.warning("KV disk tier: skipped and removed %s (%s)", path.name, exc)
                path.unlink(missing_ok=True)
                continue
            good.append((stat.st_mtime, block_hash))
        for tmp in self.dir.glob(".*.tmp"):  # a write cut short by a crash
            tmp.unlink(missing_ok=True)
        return [h for _, h in sorted(good)]

    # ---- moves -----------------------------------------------------------------------------
    def write(self, block_hash: bytes, tensors: list[torch.Tensor]) -> None:
        """Queue a block's file (tensors are the caller's copy, never changed afterwards)."""
        with self._mutex:
            self._pending[block_hash] = tensors
        self._queue.put(("write", block_hash, tensors))

    def drop(self, block_hash: bytes) -> None:
        with self._mutex:
            self._pending.pop(block_hash, None)
        self._queue.put(("drop", block_hash, None))

    def read(self, block_hash: bytes) -> list[torch.Tensor] | None:
        """A block's tensors, or None (logged, file removed) if missing or not valid."""
        with self._mutex:
            pending = self._pending.get(block_hash)
        if pending is not None:
            return pending
        path = self._path(block_hash)
        try:
            data = path.read_bytes()
            (n,) = struct.unpack("<Q", data[:8])
            meta = json.loads(data[8 : 8 + n]).get("__metadata__", {})
            if meta.get("fingerprint") != self.fingerprint or meta.get("hash") != block_hash.hex():
                raise ValueError("written by another model or settings")
            loaded = st_load(data)
            tensors = [loaded[str(i)] for i in range(len(self.shapes))]
            if any(t.shape != s or t.dtype != d for t, (s, d) in zip(tensors, self.shapes)):
                raise ValueError("tensor shapes differ")
            if checksum(tensors) != meta.get("checksum"):
                raise ValueError("checksum mismatch")
        except Exception as exc:  # any unreadable file is a miss, never a crash
            log.warning("KV disk tier: could not load %s (%s: %s); removed, recomputing", path.name, type(exc).__name__, exc)  # fmt: skip
            path.unlink(missing_ok=True)
            return None
        return tensors

    def take_lost(self) -> list[bytes]:
        with self._mutex:
            lost, self._lost = self._lost, []
        return lost

    def flush(self) -> None:
        """Wait until every queued write and drop is done (shutdown, tests)."""
        self._queue.join()

    def close(self) -> None:
        """Finish queued writes and release the directory for the next server."""
        self.flush()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # ---- the writer thread -------------------------------------------------------------------
    def _path(self, block_hash: bytes) -> Path:
        return self.dir / (block_hash.hex() + SUFFIX)

    def _encode(self, block_hash: bytes, tensors: Sequence[torch.Tensor]) -> bytes:
        meta = {"format": FORMAT, "fingerprint": self.fingerprint, "hash": block_hash.hex(),
                "checksum": checksum(tensors)}  # fmt: skip
        return st_save({str(i): t.contiguous() for i, t in enumerate(tensors)}, metadata=meta)

    def _writer(self) -> None:
        while True:
            op, block_hash, tensors = self._queue.get()
            try:
                if op == "drop":
                    self._path(block_hash).unlink(missing_ok=True)
                    continue
                with self._mutex:
                    current = self._pending.get(block_hash)
                if current is tensors and tensors is not None:  # not dropped or rewritten since
                    self._write_file(block_hash, tensors)
            finally:
                self._queue.task_done()

    def _write_file(self, block_hash: bytes, tensors: list[torch.Tensor]) -> None:
        path = self._path(block_hash)
        tmp = self.dir / f".{block_hash.hex()}.tmp"
        try:
            tmp.write_bytes(self._encode(block_hash, tensors))
            os.replace(tmp, path)
        except OSError as exc:
            log.warning("KV disk tier: could not write %s (%s); block dropped", path.name, exc)
            tmp.unlink(missing_ok=True)
            with self._mutex:
                self._lost.append(block_hash)
        finally:
            with self._mutex:
                if self._pending.get(block_hash) is tensors:
                    del self._pending[block_hash]
