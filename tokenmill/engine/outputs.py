"""What the engine returns: vLLM-shaped RequestOutput / CompletionOutput, plus timing metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.request import Request, TokenLogprobs


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

    @classmethod
    def of(cls, req: Request) -> RequestMetrics:
        t = req.times
        return cls(
            t.arrival,
            t.first_scheduled,
            t.first_token,
            t.last_token,
            t.finished,
            req.num_output_tokens,
        )


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[TokenLogprobs] | None
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[TokenLogprobs | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None  # of the first completion (all share the prompt)
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    child_metrics: list[RequestMetrics] = field(default_factory=list)
