"""Worker: one rank's device, model, KV tensors and runner, behind calls that take and return
values (so an executor can drive it in this process or in another one).

Life: load the model -> report `describe()` and `cache_specs()` -> `initialize_cache(num_blocks)`
(the core sized the pool from the specs) -> `execute(scheduler_output)` per step.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.messages import RunnerOutput, SchedulerOutput, TierInfo, WorkerInfo
from tokenmill.kv.specs import CacheSpec, bytes_per_token
from tokenmill.models.loader import LoadedModel, load_model
from tokenmill.worker.runner import ModelRunner, cache_specs, default_kv_cache_memory

log = logging.getLogger(__name__)


class Worker:
    def __init__(
        self,
        config: EngineConfig,
        loaded: LoadedModel | None = None,
        rank: int = 0,
        init_method: str | None = None,
    ) -> None:
        """`rank` of `config.parallel.world_size` ranks, meeting at `init_method`
        (tcp://host:port) before the model is built: its layers are this rank's shards (tensor
        parallelism) or its stage's layers (pipeline parallelism)."""
        m = config.model
        self.config = config
        self.rank = rank
        size = config.parallel.world_size
        if size > 1:
            self._join(rank, size, init_method)
        self.loaded = loaded or load_model(
            m.model, m.dtype, config.device.device, m.max_model_len, config.quant
        )
        self._runner: ModelRunner | None = None
        self._tiers = None  # kv.storage.mover.TierStorage, when the KV tiers are on

    def _join(self, rank: int, size: int, init_method: str | None) -> None:
        from tokenmill.parallel.group import init_group, set_current

        d = self.config.device
        if d.compile or d.batch_invariant:
            raise ValueError("tensor or pipeline parallelism does not take compile or batch_invariant yet")  # fmt: skip
        if init_method is None:
            raise ValueError("a parallel rank needs the group's init_method")
        if d.num_threads is None:  # the machine's cores shared out between the ranks
            torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // size))
        p = self.config.parallel
        tp, pp = p.tensor_parallel_size, p.pipeline_parallel_size
        if pp == 1:
            set_current(init_group(rank, size, init_method))
            log.info("rank %d of %d joined its tensor-parallel group", rank, size)
            return
        import torch.distributed as dist

        from tokenmill.parallel.group import Stage, TPGroup, init_world, set_stage

        init_world(rank, size, init_method)
        stage, tp_rank = divmod(rank, tp)
        if tp > 1:  # a group per stage, made by every rank in the same order
            groups = [dist.new_group(list(range(s * tp, (s + 1) * tp))) for s in range(pp)]
            set_current(TPGroup(tp_rank, tp, groups[stage]))
        set_stage(Stage(stage, pp, rank, tp))
        log.info("rank %d: pipeline stage %d of %d, tensor-parallel rank %d of %d", rank, stage, pp, tp_rank, tp)  # fmt: skip

    @property
    def runner(self) -> ModelRunner:
        if self._runner is None:
            raise RuntimeError("the worker has no KV cache yet; call initialize_cache first")
        return self._runner

    def describe(self) -> WorkerInfo:
        device = self.loaded.device
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
        return WorkerInfo(
            vocab_size=self.loaded.arch.vocab_size,
            max_model_len=self.loaded.max_model_len,
            eos_token_ids=self.loaded.eos_token_ids,
            device_type=device.type,
            device_name=name,
        )

    def cache_specs(self) -> list[CacheSpec]:
        return list(cache_specs(self.loaded, self.config.cache.kv_cache_dtype))

    def default_kv_cache_memory(self, max_tokens: int) -> int:
        per_token = bytes_per_token(self.cache_specs())
        return default_kv_cache_memory(self.loaded, self.config.cache, per_token, max_tokens)

    def initialize_cache(self, num_blocks: int, num_state_slots: int = 0) -> None:
        device = self.config.device
        # the native fused decode runs a layer's halves as one call, past the all-reduces: a
        # sharded model runs torch's ops
        sharded = self.config.parallel.world_size > 1
        self._runner = ModelRunner(
            self.loaded,
            self.config.cache,
            num_blocks,
            self.config.model.seed,
            device.num_threads,
            "torch" if sharded else device.cpu_kernels,
            num_state_slots,
        )
        if device.batch_invariant:
            self._runner.make_batch_invariant()
        if device.compile:
            self._runner.compile_model()

    def initialize_tiers(self, host_bytes: int) -> TierInfo:
        from tokenmill.kv.storage.host import BlockCodec, BlockViews
        from tokenmill.kv.storage.mover import TierStorage

        cache, size = self.config.cache, self.config.parallel.world_size
        views = BlockViews(self.runner.kv_caches, cache.block_size)
        codec = BlockCodec(views.block_shapes(), cache.kv_tier_dtype)
        host_blocks = host_bytes // codec.bytes_per_block
        self._check_host_memory(host_blocks * codec.bytes_per_block)
        disk = None
        if cache.kv_disk_dir:
            from tokenmill.kv.storage.disk import DiskBlocks, model_identity
            from tokenmill.models.loader import resolve_default_model

            model = self.config.model.model
            identity = {
                "model": model_identity(resolve_default_model() if model == "default" else model),
                "dtype": str(self.loaded.dtype),
                "quantization": self.loaded.quantization,
                "kv_cache_dtype": cache.kv_cache_dtype,
                "block_size": cache.block_size,
                "tensors": [[list(s), str(d)] for s, d in codec.shapes()],
            }
            if not codec.is_exact:  # (absent for exact blocks: older directories stay valid)
                identity["kv_tier_dtype"] = cache.kv_tier_dtype
            directory = cache.kv_disk_dir
            if size > 1:  # each rank its own shard of every block, in its own directory
                p = self.config.parallel
                layout = f"rank{self.rank}-tp{p.tensor_parallel_size}-pp{p.pipeline_parallel_size}"
                identity["layout"] = layout
                directory = os.path.join(directory, layout)
            disk = DiskBlocks(directory, cache.kv_disk_memory, identity, codec.shapes(), size)
        self._tiers = TierStorage(views, host_blocks, disk, size > 1, codec)
        if disk is None:
            return TierInfo(host_blocks, codec.bytes_per_block, 0)
        return TierInfo(host_blocks, codec.bytes_per_block, disk.num_blocks, tuple(disk.scan()))

    @staticmethod
    def _check_host_memory(num_bytes: int) -> None:
        """A host tier larger than the memory the machine has free would be killed later."""
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        try:  # MemAvailable counts the page cache the kernel would give back
            with open("/proc/meminfo") as f:
                line = next(x for x in f if x.startswith("MemAvailable:"))
            available = int(line.split()[1]) * 1024
        except (OSError, StopIteration, ValueError):
            pass
        if num_bytes > available:
            raise ValueError(
                f"kv_host_memory asks for {num_bytes / 2**30:.2f} GiB of host memory per rank, "
                f"the machine has {available / 2**30:.2f} GiB available; lower kv_host_memory"
            )

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        if self._tiers is None:
            return self.runner.execute(out)
        self._tiers.apply(out.tier_ops)  # offloads before anything overwrites their blocks
        result = self.runner.execute(out)
        done, failed, lost = self._tiers.harvest(block=out.is_empty)
        if done or lost:
            result = replace(result, loads_done=done, loads_failed=failed, stores_failed=lost)
        return result

    def close(self) -> None:
        if self._tiers is not None:
            self._tiers.close()
            self._tiers = None

    def retry(self, request_ids: tuple[str, ...]) -> RunnerOutput:
        return self.runner.retry(request_ids)
