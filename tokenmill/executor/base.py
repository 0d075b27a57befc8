"""Executor: the seam between the engine core and the workers that run the model.

The core only ever calls these methods, with values; whether the workers live in this process,
in child processes (tensor/pipeline-parallel ranks) or on Ray actors is the executor's business.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

from tokenmill.engine.messages import RunnerOutput, SchedulerOutput, TierInfo, WorkerInfo
from tokenmill.kv.specs import CacheSpec


class ExecutorDeadError(RuntimeError):
    """The workers are gone (a process died): no step can run any more."""


class Executor(ABC):
    @abstractmethod
    def describe(self) -> WorkerInfo:
        """The loaded model's facts (vocabulary, length limit, EOS ids, device)."""

    @abstractmethod
    def cache_specs(self) -> list[CacheSpec]:
        """What each layer caches, one spec per layer."""

    @abstractmethod
    def default_kv_cache_memory(self, max_tokens: int) -> int:
        """Bytes for the KV pool when the user set none (device memory decides)."""

    @abstractmethod
    def initialize_cache(self, num_blocks: int, num_state_slots: int = 0) -> None:
        """Allocate the KV pool of `num_blocks` blocks (and the state-space layers' states for
        `num_state_slots` requests) on every worker."""

    @abstractmethod
    def initialize_tiers(self, host_bytes: int) -> TierInfo:
        """Set up the KV tiers' storage below the pool (after initialize_cache): `host_bytes`
        of host memory per rank and the disk directory of the cache config, scanned for
        blocks; the slots that makes in the tiers' block format (kv_tier_dtype)."""

    @abstractmethod
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step; raises if the model step failed (the core isolates it)."""

    @abstractmethod
    def retry(self, request_ids: tuple[str, ...]) -> RunnerOutput:
        """After `execute` raised: run that step again for these of its requests only."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release workers; idempotent."""


class RankExecutor(Executor):
    """An executor whose workers are reached by one call each (`_call(method, *args)`: every
    rank runs it, one rank's answer returned): the seam's methods are those calls."""

    @abstractmethod
    def _call(self, method: str, *args: Any) -> Any: ...

    def describe(self) -> WorkerInfo:
        return self._call("describe")

    def cache_specs(self) -> list[CacheSpec]:
        return self._call("cache_specs")

    def default_kv_cache_memory(self, max_tokens: int) -> int:
        return self._call("default_kv_cache_memory", max_tokens)

    def initialize_cache(self, num_blocks: int, num_state_slots: int = 0) -> None:
        self._call("initialize_cache", num_blocks, num_state_slots)

    def initialize_tiers(self, host_bytes: int) -> TierInfo:
        return self._call("initialize_tiers", host_bytes)

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        return self._call("execute", out)

    def retry(self, request_ids: tuple[str, ...]) -> RunnerOutput:
        return self._call("retry", request_ids)
