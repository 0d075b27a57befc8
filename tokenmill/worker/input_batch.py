"""The worker's own state of each request it runs, kept across steps and fed by deltas.

The scheduler sends a request whole once (`NewRequestData`), then only what changed
(`CachedRequestData`); `InputBatch.apply` folds each `SchedulerOutput` into these states and
returns the step's requests in schedule order. It never reads the scheduler's objects, so the same
values can come from another process. It does not build tensors (worker/batch.py does).
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenmill.engine.messages import NewRequestData, SchedulerOutput
from tokenmill.sampling_params import SamplingParams


@dataclass
class CachedRequestState:
    request_id: str
    all_token_ids: list[int]  # prompt + outputs, as far as the scheduler has sent them
    num_prompt_tokens: int
    params: SamplingParams
    block_ids: list[int]  # the request's block table
    num_computed_tokens: int  # tokens with cached K/V before the current step
    num_prompt_logprobs: int  # prompt logprob entries computed so far
    pool_sum: object = None  # mean pooling: the sum of the prompt's hidden rows so far
    state_slot: int = -1  # its slot in the state-space layers' caches (-1: none)

    @classmethod
    def of(cls, data: NewRequestData) -> CachedRequestState:
        return cls(
            data.request_id,
            list(data.token_ids),
            data.num_prompt_tokens,
            data.params,
            list(data.block_ids),
            data.num_computed_tokens,
            data.num_prompt_logprobs,
            state_slot=data.state_slot,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.all_token_ids[: self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - self.num_prompt_tokens


@dataclass(frozen=True)
class ScheduledState:
    state: CachedRequestState
    num_new_tokens: int  # tokens computed this step

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence, so a token is sampled."""
        return self.state.num_computed_tokens + self.num_new_tokens == self.state.num_tokens


class InputBatch:
    def __init__(self) -> None:
        self.requests: dict[str, CachedRequestState] = {}

    def apply(self, out: SchedulerOutput) -> list[ScheduledState]:
        """Fold one step's deltas in; the step's requests in schedule order."""
        for request_id in (*out.finished_request_ids, *out.preempted_request_ids):
            self.requests.pop(request_id, None)
        for data in out.new_requests:
            self.requests[data.request_id] = CachedRequestState.of(data)
        for delta in out.cached_requests:
            state = self.requests[delta.request_id]
            state.all_token_ids.extend(delta.new_token_ids)
            state.block_ids[delta.block_table_start :] = delta.new_block_ids
            state.num_computed_tokens = delta.num_computed_tokens
        return [ScheduledState(self.requests[r], n) for r, n in out.num_scheduled_tokens.items()]
