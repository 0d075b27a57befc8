"""What users get: vLLM-shaped RequestOutput / CompletionOutput, plus timing metrics.

Each one is a fresh copy made by the front's output processor: nothing in it changes after it
is handed out, and its text, token ids and logprobs cover the same tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from tokenmill.engine.messages import RequestMetrics, TokenLogprobs

__all__ = ["CompletionOutput", "RequestMetrics", "RequestOutput", "pooled_vector"]


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
    embedding: list[float] | None = None  # a pooling request's vector (SamplingParams.pooling)
    prompt_logprob_ranks: list[int | None] | None = None  # rank of each prompt token (1: top)


def pooled_vector(out: RequestOutput, normalize: bool = True) -> list[float]:
    """An embedding request's vector from its output, L2-normalized if asked."""
    if out.embedding is None:
        reason = out.outputs[0].finish_reason if out.outputs else None
        raise RuntimeError(f"request {out.request_id} ended without its embedding ({reason})")
    if not normalize:
        return list(out.embedding)
    norm = math.sqrt(sum(x * x for x in out.embedding)) or 1.0
    return [x / norm for x in out.embedding]
