"""Executor: the seam between the engine core and the workers that run the model.

The core only ever calls these methods, with values; whether the workers live in this process,
in child processes (tensor/pipeline-parallel ranks) or on Ray actors is the executor's business.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
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
    """An executor whose workers are reached by one call each (`_call_all(method, *args)`:
    every rank runs it and answers): the seam's methods are those calls, answered by the rank
    that samples (`_output_rank`) except where every rank's answer counts (the KV tiers)."""

    _output_rank: int = 0

    @abstractmethod
    def _call_all(self, method: str, *args: Any) -> list[Any]:
        """Every rank's answer, in rank order."""

    def _call(self, method: str, *args: Any) -> Any:
        return self._call_all(method, *args)[self._output_rank]

    def describe(self) -> WorkerInfo:
        return self._call("describe")

    def cache_specs(self) -> list[CacheSpec]:
        return self._call("cache_specs")

    def default_kv_cache_memory(self, max_tokens: int) -> int:
        return self._call("default_kv_cache_memory", max_tokens)

    def initialize_cache(self, num_blocks: int, num_state_slots: int = 0) -> None:
        self._call("initialize_cache", num_blocks, num_state_slots)

    def initialize_tiers(self, host_bytes: int) -> TierInfo:
        return TierInfo.merge(self._call_all("initialize_tiers", host_bytes))

    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        answers = self._call_all("execute", out)
        result = answers[self._output_rank]
        if len(answers) == 1 or not any(a.loads_failed or a.stores_failed for a in answers):
            return result
        # a block one rank could not read or write is unusable on all of them (each holds a
        # shard): recomputed, and dropped everywhere
        failed = {h for a in answers for h in a.loads_failed}
        lost = {h for a in answers for h in a.stores_failed}
        return replace(result, loads_failed=tuple(sorted(failed)), stores_failed=tuple(sorted(lost)))  # fmt: skip

    def retry(self, request_ids: tuple[str, ...]) -> RunnerOutput:
        return self._call("retry", request_ids)
