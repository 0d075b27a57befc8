"""What users get: vLLM-shaped RequestOutput / CompletionOutput, plus timing metrics.

Each one is a fresh copy made by the front's output processor: nothing in it changes after it
is handed out, and its text, token ids and logprobs cover the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.messages import RequestMetrics, TokenLogprobs

__all__ = ["CompletionOutput", "RequestMetrics", "RequestOutput"]


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
