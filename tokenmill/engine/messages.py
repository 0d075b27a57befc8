"""The values that cross a layer or a process: scheduler -> executor, executor -> core, core ->
front. Every one is a frozen dataclass of plain data (ints, strings, tuples, dicts of those,
SamplingParams), so it pickles as is and the receiver can never see a sender's object change.

What this module does not do: encode or transport (engine/core_client.py, executor/), or hold
any logic beyond derived properties. Pure Python; no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.kv.moves import BlockLoad, TierInfo, TierOps, TierStats
from tokenmill.sampling_params import SamplingParams

__all__ = ["BlockLoad", "TierInfo", "TierOps", "TierStats"]  # the KV tiers' values, re-exported

# A token's logprob entry: the chosen token's logprob first, then the top-k alternatives.
TokenLogprobs = dict[int, float]


# ---- scheduler -> executor (workers) ----------------------------------------------------------
@dataclass(frozen=True)
class NewRequestData:
    """Sent once, when a request is scheduled for the first time (or again after preemption)."""

    request_id: str
    token_ids: tuple[int, ...]  # prompt + outputs so far (a resumed request has outputs)
    num_prompt_tokens: int  # the runner tells prompt from output tokens (penalties, logprobs)
    params: SamplingParams  # the runner's sampler reads it; never mutated after admission
    block_ids: tuple[int, ...]  # the whole block table
    num_computed_tokens: int  # tokens whose K/V is cached before this step
    num_prompt_logprobs: int  # prompt logprob entries already computed (n > 1 children share)
    state_slot: int = -1  # its slot in the state-space layers' caches (-1: the model has none)


@dataclass(frozen=True)
class CachedRequestData:
    """Per step, for a request the workers already know: only what changed."""

    request_id: str
    new_token_ids: tuple[int, ...]  # tokens appended since the workers last saw the request
    block_table_start: int  # the worker sets table[block_table_start:] = new_block_ids
    new_block_ids: tuple[int, ...]  # appended blocks, and a copy-on-write replacement if any
    num_computed_tokens: int  # tokens whose K/V is cached before this step


@dataclass(frozen=True)
class GrammarBitmask:
    """Allowed next tokens of the structured-output rows that sample this step."""

    request_ids: tuple[str, ...]  # one row each, in this order
    words: int  # int32 words per row: ceil(vocab / 32)
    data: bytes  # rows x words int32 (native order); bit t % 32 of word t // 32: token t allowed


@dataclass(frozen=True)
class SchedulerOutput:
    num_scheduled_tokens: dict[str, int]  # request id -> tokens computed this step, in order
    new_requests: tuple[NewRequestData, ...] = ()
    cached_requests: tuple[CachedRequestData, ...] = ()
    block_copies: tuple[tuple[int, int], ...] = ()  # (src, dst) copy-on-write, before the forward
    state_copies: tuple[tuple[int, int], ...] = ()  # (src, dst) state slots an n > 1 fork copies
    finished_request_ids: tuple[str, ...] = ()  # workers drop their state of these
    preempted_request_ids: tuple[str, ...] = ()  # their blocks are gone; they return as new
    grammar_bitmask: GrammarBitmask | None = None  # set by the core for constrained rows
    tier_ops: TierOps | None = None  # KV tier moves; set (maybe empty) while loads are in flight

    @property
    def num_tokens(self) -> int:
        return sum(self.num_scheduled_tokens.values())

    @property
    def is_empty(self) -> bool:
        """Nothing to run (there may still be finished ids for the workers to forget)."""
        return not self.num_scheduled_tokens

    @property
    def is_idle(self) -> bool:
        """Nothing for the workers at all: no tokens, no ids to forget, no tier work."""
        return self.is_empty and not self.finished_request_ids and self.tier_ops is None

    @property
    def num_preempted(self) -> int:
        return len(self.preempted_request_ids)


# ---- executor -> core ---------------------------------------------------------------------------
@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprobs: TokenLogprobs | None = None  # the chosen token and top-k, when asked for


@dataclass(frozen=True)
class RunnerOutput:
    sampled: dict[str, SampledToken] = field(default_factory=dict)  # requests that sampled
    prompt_logprobs: dict[str, list[TokenLogprobs | None]] = field(default_factory=dict)
    pooled: dict[str, tuple[float, ...]] = field(default_factory=dict)  # embedding requests
    prompt_ranks: dict[str, list[int | None]] = field(default_factory=dict)  # per prompt entry
    loads_done: tuple[int, ...] = ()  # tier load jobs whose blocks are all in (or failed)
    loads_failed: tuple[bytes, ...] = ()  # block hashes a load could not read (corrupt, gone)
    stores_failed: tuple[bytes, ...] = ()  # block hashes a disk write lost (disk full, I/O)


# ---- front -> core ------------------------------------------------------------------------------
@dataclass(frozen=True)
class EngineCoreRequest:
    request_id: str  # the user request; n > 1 sequences are "{request_id}#{index}" in the core
    prompt_token_ids: tuple[int, ...]  # validated by the front: non-empty, inside the vocabulary
    params: SamplingParams
    arrival_time: float  # time.monotonic(): one clock for every process on the machine


@dataclass(frozen=True)
class AbortRequests:
    request_ids: tuple[str, ...]  # user requests (all their sequences) or single sequences


@dataclass(frozen=True)
class Shutdown:
    pass


# ---- core -> front ------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestMetrics:
    arrival_time: float  # time.monotonic() seconds
    first_scheduled_time: float | None
    first_token_time: float | None
    last_token_time: float | None
    finished_time: float | None
    num_output_tokens: int

    @property
    def time_in_queue(self) -> float | None:
        if self.first_scheduled_time is None:
            return None
        return self.first_scheduled_time - self.arrival_time

    @property
    def ttft(self) -> float | None:
        """Time to first token, seconds."""
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first, seconds."""
        if self.num_output_tokens < 2 or self.first_token_time is None:
            return None
        assert self.last_token_time is not None
        return (self.last_token_time - self.first_token_time) / (self.num_output_tokens - 1)

    @property
    def e2e(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@dataclass(frozen=True)
class EngineCoreOutput:
    """What one sequence gained in one step."""

    request_id: str  # the user request
    index: int  # which of its n sequences
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[TokenLogprobs, ...] | None  # one per new token, when asked for
    new_prompt_logprobs: tuple[TokenLogprobs | None, ...] | None  # entries new this step
    finish_reason: str | None  # "stop", "length", "abort", "error"; None while running
    stop_reason: int | str | None  # the stop token id that ended it
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    metrics: RequestMetrics
    pooled: tuple[float, ...] | None = None  # an embedding request's vector, when it is done
    new_prompt_ranks: tuple[int | None, ...] | None = None  # each new prompt entry's token rank


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    num_used_blocks: int
    num_blocks: int
    kv_usage: float  # fraction of blocks in use
    prefix_cache_hit_rate: float  # of blocks looked up
    num_preemptions: int  # since start
    prefix_cache_queries: int = 0  # prompt tokens looked up in the prefix cache, since start
    prefix_cache_hits: int = 0  # of those, found cached
    kv_tiers: tuple[TierStats, ...] = ()  # the host and disk tiers that are on
    num_loading: int = 0  # requests waiting for their blocks to come back from a tier


@dataclass(frozen=True)
class EngineCoreOutputs:
    outputs: tuple[EngineCoreOutput, ...]
    stats: EngineStats  # after the step
    step_s: float = 0.0  # wall seconds of the step (utilization for modeled power)
    num_tokens: int = 0  # tokens the step computed (prompt and generated)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reports of the model it loaded (executor -> core, once)."""

    vocab_size: int
    max_model_len: int  # the user's limit, the model's or its window's, whichever is least
    eos_token_ids: frozenset[int]
    device_type: str  # "cpu" or "cuda"
    device_name: str  # the GPU's name on CUDA, else ""


@dataclass(frozen=True)
class ModelInfo:
    """What the front needs to know about the model the core serves, sent once at start."""

    vocab_size: int
    max_model_len: int
    eos_token_ids: frozenset[int]
    device_type: str  # "cpu" or "cuda": meters and hardware choice
    device_name: str  # the GPU's name on CUDA, else ""
    num_blocks: int
    block_size: int
    kv_cache_dtype: str = "auto"
    enable_prefix_caching: bool = True
    max_num_seqs: int = 0  # most sequences one step runs


@dataclass(frozen=True)
class CoreReady:
    info: ModelInfo


@dataclass(frozen=True)
class CoreFailed:
    message: str  # why the core could not start or had to stop
    kind: str = "RuntimeError"  # the exception's type name: ValueError means bad options
