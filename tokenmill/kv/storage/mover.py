"""The worker's side of the KV tiers: does each step's `TierOps` and reports loads done.

Per step, before the block copies and forward: host slots going to disk are copied out (their
slots may be refilled in this same step), evicted files dropped, evicted device blocks saved to
host slots (or written to files when there is no host tier); then the step's loads start on a
background thread, so the forward of other requests runs meanwhile. Loads write only device
blocks that no scheduled request reads (the requests waiting for them are not scheduled until
`harvest` has reported them), so the two never race. On CUDA the loads run on their own stream
(from pinned memory: DMAs beside the forward's kernels, not queued behind them) and a job is
done when that stream has finished it. With several ranks, loads finish inside the step
instead: every rank must hold a block before any rank's request reads it. Saves (device ->
host) stay on the compute stream, synchronous: the pool reuses those blocks in this same step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import torch

from tokenmill.kv.moves import BlockLoad, TierOps
from tokenmill.kv.storage.disk import DiskBlocks
from tokenmill.kv.storage.host import BlockCodec, BlockViews, HostBlocks

log = logging.getLogger(__name__)


@dataclass
class _Reports:
    done: list[int] = field(default_factory=list)  # load job ids
    failed: list[bytes] = field(default_factory=list)  # hashes a load could not read


class TierStorage:
    def __init__(
        self,
        device_blocks: BlockViews,
        host_blocks: int,
        disk: DiskBlocks | None,
        inline_loads: bool = False,
        codec: BlockCodec | None = None,
    ) -> None:
        self.device_blocks = device_blocks
        self.codec = codec or BlockCodec(device_blocks.block_shapes())
        self.host = HostBlocks(device_blocks, host_blocks, self.codec) if host_blocks else None
        self.disk = disk
        self.inline_loads = inline_loads
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="kv-load")
        self._in_flight: list[tuple[tuple[int, ...], Future]] = []
        self._reports = _Reports()
        self._mutex = threading.Lock()
        device = device_blocks.device
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def apply(self, ops: TierOps | None) -> None:
        if ops is None:
            return
        for slot, block_hash in ops.host_to_disk:
            self._disk().write(block_hash, self._host().block(slot))
        for block_hash in ops.disk_drops:
            self._disk().drop(block_hash)
        if ops.device_to_host:
            blocks, slots = zip(*ops.device_to_host, strict=True)
            self._host().save(blocks, slots)
        if ops.device_to_disk:
            blocks, hashes = zip(*ops.device_to_disk, strict=True)
            data = self.codec.encode(self.device_blocks.gather(blocks))
            for i, block_hash in enumerate(hashes):
                self._disk().write(block_hash, [d[i].clone() for d in data])
        if not ops.loads:
            return
        ids = tuple(load.job_id for load in ops.loads)
        if self.inline_loads:
            self._report(ids, self._safe_load(ops.loads))
            return
        self._in_flight.append((ids, self._loader.submit(self._safe_load, ops.loads)))

    def harvest(self, block: bool) -> tuple[tuple[int, ...], tuple[bytes, ...], tuple[bytes, ...]]:
        """(load jobs done, hashes they could not read, hashes disk writes lost) since the
        last harvest; `block`: wait for one job first if any is in flight (an idle step)."""
        if block and self._in_flight:
            wait([f for _, f in self._in_flight], timeout=0.1, return_when=FIRST_COMPLETED)
        still = []
        for ids, future in self._in_flight:
            if future.done():
                self._report(ids, future.result())
            else:
                still.append((ids, future))
        self._in_flight = still
        with self._mutex:
            reports, self._reports = self._reports, _Reports()
        lost = tuple(self.disk.take_lost()) if self.disk is not None else ()
        return tuple(reports.done), tuple(reports.failed), lost

    def close(self) -> None:
        self._loader.shutdown(wait=True)
        if self.disk is not None:
            self.disk.close()

    # ---- loads -------------------------------------------------------------------------------
    def _report(self, ids: tuple[int, ...], failed: list[bytes]) -> None:
        with self._mutex:
            self._reports.done.extend(ids)
            self._reports.failed.extend(failed)

    def _safe_load(self, loads: tuple[BlockLoad, ...]) -> list[bytes]:
        """A load that raises fails its blocks (recomputed), never the engine."""
        try:
            return self._load(loads)
        except Exception:
            log.exception("KV tier load failed; its blocks are recomputed")
            return [h for load in loads for h in (*(e[2] for e in load.host), *(e[0] for e in load.disk))]  # fmt: skip

    @torch.inference_mode()
    def _load(self, loads: tuple[BlockLoad, ...]) -> list[bytes]:
        stream = self._copy_stream
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            failed = self._copy_in(loads)
        if stream is not None:
            stream.synchronize()  # this job's copies only: the forward's stream runs on
        return failed

    def _copy_in(self, loads: tuple[BlockLoad, ...]) -> list[bytes]:
        failed: list[bytes] = []
        host = [entry for load in loads for entry in load.host]
        if host:
            slots, blocks, _ = zip(*host, strict=True)
            self._host().restore(slots, blocks)
        read: list[tuple[int, list[torch.Tensor]]] = []
        for load in loads:
            for block_hash, block in load.disk:
                data = self._disk().read(block_hash)
                if data is None:
                    failed.append(block_hash)
                else:
                    read.append((block, data))
        if read:
            per_tensor = [torch.stack([d[k] for _, d in read]) for k in range(len(read[0][1]))]
            on_device = self.device_blocks.upload(per_tensor)
            self.device_blocks.scatter([b for b, _ in read], self.codec.decode(on_device))
        return failed

    def _host(self) -> HostBlocks:
        if self.host is None:
            raise RuntimeError("the tier policy moved a block to a host tier that is off")
        return self.host

    def _disk(self) -> DiskBlocks:
        if self.disk is None:
            raise RuntimeError("the tier policy moved a block to a disk tier that is off")
        return self.disk
