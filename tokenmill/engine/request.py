"""Request: one sequence's state as the scheduler and engine see it. Pure Python.

A request is scheduled by tokens, not phases: `num_computed_tokens` of `num_tokens` have K/V in
the cache; the scheduler hands out more until they are equal, then a token is sampled and
appended. Preemption sets `num_computed_tokens` back to 0; the generated tokens stay and are
recomputed with the prompt.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

from tokenmill.engine.messages import TokenLogprobs
from tokenmill.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def is_finished(self) -> bool:
        return self in _FINISHED

    @property
    def finish_reason(self) -> str | None:
        return self.value if self.is_finished else None


_FINISHED = {
    RequestStatus.FINISHED_STOPPED,
    RequestStatus.FINISHED_LENGTH,
    RequestStatus.FINISHED_ABORTED,
    RequestStatus.FINISHED_ERROR,
}


@dataclass
class RequestTimes:
    """Wall-clock instants (time.monotonic seconds) that the metrics and the server read."""

    arrival: float = field(default_factory=time.monotonic)
    first_scheduled: float | None = None
    first_token: float | None = None
    last_token: float | None = None
    finished: float | None = None

    @property
    def queue_s(self) -> float | None:
        return None if self.first_scheduled is None else self.first_scheduled - self.arrival

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival


class Request:
    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        max_model_len: int = 2048,
        arrival: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.eos_token_ids = eos_token_ids
        self.all_token_ids = list(prompt_token_ids)  # prompt + output, grows by one per step
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        limit = max_model_len - len(prompt_token_ids)
        self.max_tokens = limit if params.max_tokens is None else min(params.max_tokens, limit)
        self.times = RequestTimes() if arrival is None else RequestTimes(arrival=arrival)
        self.logprobs: list[TokenLogprobs] = []  # one per output token, when asked for
        self.pooled: tuple[float, ...] | None = None  # an embedding request's vector
        self.prompt_logprobs: list[TokenLogprobs | None] = []  # None for the first prompt token
        self.prompt_ranks: list[int | None] = []  # each prompt token's rank at its position
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache
        self.fork_children: list[Request] = []  # n > 1: siblings forked after this one's prefill

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_token(self, token_id: int, now: float) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
        if self.times.first_token is None:
            self.times.first_token = now
        self.times.last_token = now

    def check_token_stop(self) -> RequestStatus | None:
        """Stop conditions decided by token ids alone (stop strings need text: the engine)."""
        if not self.output_token_ids:
            return None
        last = self.output_token_ids[-1]
        if self.num_output_tokens >= self.params.min_tokens:
            if not self.params.ignore_eos and last in self.eos_token_ids:
                self.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if last in (self.params.stop_token_ids or ()):
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= self.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, {self.status.value}, "
            f"{self.num_computed_tokens}/{self.num_tokens} computed)"
        )
