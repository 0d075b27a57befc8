"""Executor: the seam between the engine core and the workers that run the model.

The core only ever calls these methods, with values; whether the workers live in this process,
in child processes (tensor/pipeline-parallel ranks) or on Ray actors is the executor's business.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from tokenmill.engine.messages import RunnerOutput, SchedulerOutput, WorkerInfo
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
    def initialize_cache(self, num_blocks: int) -> None:
        """Allocate the KV pool of `num_blocks` blocks on every worker."""

    @abstractmethod
    def execute(self, out: SchedulerOutput) -> RunnerOutput:
        """Run one step; raises if the model step failed (the core isolates it)."""

    @abstractmethod
    def retry(self, request_ids: tuple[str, ...]) -> RunnerOutput:
        """After `execute` raised: run that step again for these of its requests only."""

    @abstractmethod
    def shutdown(self) -> None:
        """Release workers; idempotent."""
