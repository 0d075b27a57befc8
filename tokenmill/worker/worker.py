"""Worker: one rank's device, model, KV tensors and runner, behind calls that take and return
values (so an executor can drive it in this process or in another one).

Life: load the model -> report `describe()` and `cache_specs()` -> `initialize_cache(num_blocks)`
(the core sized the pool from the specs) -> `execute(scheduler_output)` per step.
"""

from __future__ import annotations

import logging

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.messages import RunnerOutput, SchedulerOutput, WorkerInfo
from tokenmill.kv.specs import CacheSpec, bytes_per_token
from tokenmill.models.loader import LoadedModel, load_model
from tokenmill.worker.runner import ModelRunner, cache_specs, default_kv_cache_memory

log = logging.getLogger(__name__)


class Worker:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        m = config.model
        self.config = config
        self.loaded = loaded or load_model(
            m.model, m.dtype, config.device.device, m.max_model_len, config.quant
        )
        self._runner: ModelRunner | None = None

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

    def initialize_cache(self, num_blocks: int) -> None:
        device = self.config.device
        self._runner = ModelRunner(
            self.loaded,
            self.config.cache,
            num_blocks,
            self.config.model.seed,
            device.num_threads,
            device.cpu_kernels,
        )
        if device.batch_invariant:
            self._runner.make_batch_invariant()
        if device.compile:
            self._runner.compile_model()

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(out)

    def retry(self, request_ids: tuple[str, ...]) -> RunnerOutput:
        return self.runner.retry(request_ids)
