"""OutputProcessor: the front's side of outputs: core deltas -> text -> user-facing copies.

Per request it keeps each sequence's tokens, logprobs and incremental detokenizer, applies stop
strings (a hit ends the sequence here and asks the core to abort it, as vLLM v1 does), and makes
a fresh `RequestOutput` per change whose text, token ids and logprobs cover the same tokens.
It does not talk to the core: `process` returns the sequence ids to abort and the caller sends
them. Not thread-safe: one thread (or the caller's lock) at a time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.messages import EngineCoreOutput, RequestMetrics, TokenLogprobs
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.models.tokenizer import Tokenizer
from tokenmill.sampling_params import SamplingParams


@dataclass
class _SequenceState:
    detok: IncrementalDetokenizer
    metrics: RequestMetrics
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[_SequenceState]
    prompt_logprobs: list[TokenLogprobs | None] | None
    num_cached_tokens: int = 0
    prompt_ranks: list[int | None] = field(default_factory=list)
    embedding: tuple[float, ...] | None = None  # a pooling request's, when done

    @property
    def finished(self) -> bool:
        return all(s.finish_reason is not None for s in self.seqs)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}

    def add(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int] | tuple[int, ...],
        params: SamplingParams,
        arrival: float,
    ) -> None:
        ids = list(prompt_token_ids)
        metrics = RequestMetrics(arrival, None, None, None, None, 0)
        seqs = [
            _SequenceState(
                IncrementalDetokenizer(
                    self.tokenizer,
                    ids,
                    params.stop_strings,
                    params.skip_special_tokens,
                    params.include_stop_str_in_output,
                ),
                metrics,
                logprobs=[] if params.logprobs is not None else None,
            )
            for _ in range(params.n)
        ]
        plp: list[TokenLogprobs | None] | None = [] if params.prompt_logprobs is not None else None
        self.requests[request_id] = _RequestState(request_id, prompt, ids, params, seqs, plp)

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def process(
        self, outputs: tuple[EngineCoreOutput, ...]
    ) -> tuple[list[RequestOutput], list[str]]:
        """(one RequestOutput per request that changed, sequence ids the core must abort)."""
        changed: dict[str, _RequestState] = {}
        to_abort: list[str] = []
        for out in outputs:
            state = self.requests.get(out.request_id)
            if state is None:
                continue  # finished or aborted here already
            seq = state.seqs[out.index]
            if seq.finish_reason is not None:
                continue
            if self._apply(state, seq, out):
                to_abort.append(
                    out.request_id if state.params.n == 1 else f"{out.request_id}#{out.index}"
                )
            changed[out.request_id] = state
        return [self._output(s) for s in changed.values()], to_abort

    def _apply(self, state: _RequestState, seq: _SequenceState, out: EngineCoreOutput) -> bool:
        """Fold one delta in; True when a stop string ended the sequence here."""
        seq.metrics = out.metrics
        state.num_cached_tokens = (
            out.num_cached_tokens if out.index == 0 else state.num_cached_tokens
        )
        if out.pooled is not None:
            state.embedding = out.pooled
        if out.new_prompt_logprobs is not None and state.prompt_logprobs is not None:
            state.prompt_logprobs.extend(out.new_prompt_logprobs)
            state.prompt_ranks.extend(out.new_prompt_ranks or ())
        new_tokens = () if state.params.pooling is not None else out.new_token_ids
        for i, token_id in enumerate(new_tokens):  # an embedding request shows no token
            seq.token_ids.append(token_id)
            if seq.logprobs is not None and out.new_logprobs is not None:
                seq.logprobs.append(out.new_logprobs[i])
            stop = seq.detok.add(token_id)
            if stop is not None:
                seq.finish_reason, seq.stop_reason = "stop", stop
                seq.metrics = replace(out.metrics, finished_time=time.monotonic())
                return out.finish_reason is None  # the core still runs it
        seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
        return False

    def abort(self, request_id: str, reason: str = "abort") -> RequestOutput | None:
        """End a request here (client gone, core lost): its final output, None if unknown."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        now = time.monotonic()
        for seq in state.seqs:
            if seq.finish_reason is None:
                seq.finish_reason = reason
                seq.metrics = replace(seq.metrics, finished_time=now)
        return self._output(state)

    def _output(self, state: _RequestState) -> RequestOutput:
        outputs = []
        finished = state.finished
        for i, seq in enumerate(state.seqs):
            done = seq.finish_reason is not None
            text, n = seq.detok.visible(done)
            lps = list(seq.logprobs[:n]) if seq.logprobs is not None else None
            ids = seq.token_ids[:n]
            cumulative = sum(lp[t] for lp, t in zip(lps, ids)) if lps else None
            outputs.append(
                CompletionOutput(
                    index=i,
                    text=text,
                    token_ids=ids,
                    cumulative_logprob=cumulative,
                    logprobs=lps,
                    finish_reason=seq.finish_reason,
                    stop_reason=seq.stop_reason,
                )
            )
        if finished:
            self.requests.pop(state.request_id, None)
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=list(state.prompt_token_ids),
            prompt_logprobs=list(state.prompt_logprobs)
            if state.prompt_logprobs is not None
            else None,
            outputs=outputs,
            finished=finished,
            metrics=state.seqs[0].metrics,
            num_cached_tokens=state.num_cached_tokens,
            child_metrics=[s.metrics for s in state.seqs],
            embedding=list(state.embedding) if state.embedding is not None else None,
            prompt_logprob_ranks=list(state.prompt_ranks)
            if state.prompt_logprobs is not None
            else None,
        )
