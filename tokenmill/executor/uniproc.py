"""UniprocExecutor: one worker in the engine core's own process (the default)."""

from __future__ import annotations

from tokenmill.config import EngineConfig
from tokenmill.engine.messages import RunnerOutput, SchedulerOutput, TierInfo, WorkerInfo
from tokenmill.executor.base import Executor
from tokenmill.kv.specs import CacheSpec
from tokenmill.models.build import LoadedModel
from tokenmill.worker.worker import Worker


class UniprocExecutor(Executor):
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.worker = Worker(config, loaded)

    def describe(self) -> WorkerInfo:
        return self.worker.describe()

    def cache_specs(self) -> list[CacheSpec]:
        return self.worker.cache_specs()

    def default_kv_cache_memory(self, max_tokens: int) -> int:
        return self.worker.default_kv_cache_memory(max_tokens)

    def initialize_cache(self, num_blocks: int, num_state_slots: int = 0) -> None:
        self.worker.initialize_cache(num_blocks, num_state_slots)

    def initialize_tiers(self, host_bytes: int) -> TierInfo:
        return self.worker.initialize_tiers(host_bytes)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        return self.worker.execute(out)

    def retry(self, request_ids: tuple[str, ...]) -> RunnerOutput:
        return self.worker.retry(request_ids)

    def shutdown(self) -> None:
        self.worker.close()  # the KV tiers' files and lock; the model ends with this process
