"""Flattening one scheduled step into tensors: the packed model input and the sampling batch.

Layout: single-token requests (decodes) first, one row each, then each multi-token chunk as a
contiguous span. The attention metadata (slot mapping, per-request key slots and masks) comes
from the attention backend once per step and is shared by every layer. Reads the worker's own
request states (worker/input_batch.py), never the scheduler's.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from tokenmill.engine.messages import GrammarBitmask
from tokenmill.layers.attention import AttentionBackend, AttentionMetadata, SequenceSlice
from tokenmill.layers.sampler import SamplingBatch
from tokenmill.worker.input_batch import CachedRequestState, ScheduledState

TOP_K_OFF = 1 << 30


@dataclass(frozen=True)
class PromptLogprobSpan:
    state: CachedRequestState
    start: int  # first packed row of the span
    end: int  # one past its last row that is a prompt position
    first_position: int  # sequence position of row `start`


@dataclass(frozen=True)
class PoolSpan:
    """An embedding request's prompt rows in this step."""

    state: CachedRequestState
    start: int  # first packed row
    end: int  # one past the last
    last: bool  # the prompt's last chunk: its vector is done after this step


@dataclass(frozen=True)
class ModelInput:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn: AttentionMetadata  # read by every attention layer
    logits_indices: torch.Tensor  # [num_sample] packed index of each sampling request's last token
    sample_states: list[CachedRequestState]  # row order of logits_indices
    prompt_logprob_spans: list[PromptLogprobSpan]
    pool_spans: list[PoolSpan]


def build_model_input(
    scheduled: list[ScheduledState],
    block_size: int,
    pad_slot: int,
    device: torch.device,
    per_token_attention: bool = False,
) -> ModelInput:
    ordered = [s for s in scheduled if s.num_new_tokens == 1]
    ordered += [s for s in scheduled if s.num_new_tokens > 1]
    ids: list[int] = []
    positions: list[np.ndarray] = []
    sample_idx, sample_states, lp_spans, pool_spans = [], [], [], []
    start = 0
    for s in ordered:
        c, n = s.state.num_computed_tokens, s.num_new_tokens
        ids.extend(s.state.all_token_ids[c : c + n])
        positions.append(np.arange(c, c + n))
        if s.samples:
            sample_idx.append(start + n - 1)
            sample_states.append(s.state)
        lp = _prompt_logprob_span(s, start)
        if lp is not None:
            lp_spans.append(lp)
        if s.state.params.pooling is not None and c < s.state.num_prompt_tokens:
            end = start + min(n, s.state.num_prompt_tokens - c)
            pool_spans.append(PoolSpan(s.state, start, end, s.samples))
        start += n
    seqs = [
        SequenceSlice(s.state.block_ids, s.state.num_computed_tokens, s.num_new_tokens)
        for s in ordered
    ]

    def tensor(a: np.ndarray | list[int]) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.int64)).to(device)

    attn = AttentionBackend.prepare_metadata(seqs, block_size, pad_slot, device, per_token_attention)  # fmt: skip
    if any(s.state.state_slot >= 0 for s in ordered):  # state-space layers: where each state is
        from tokenmill.layers.mamba import SSMBatch

        attn = replace(attn, ssm=SSMBatch.of(list(_ssm_sequences(ordered)), device))
    return ModelInput(
        input_ids=tensor(ids),
        positions=tensor(np.concatenate(positions)),
        attn=attn,
        logits_indices=tensor(sample_idx),
        sample_states=sample_states,
        prompt_logprob_spans=lp_spans,
        pool_spans=pool_spans,
    )


def _ssm_sequences(ordered: list[ScheduledState]):
    from tokenmill.layers.mamba import SSMSequence

    start = 0
    for s in ordered:
        fresh = s.state.num_computed_tokens == 0
        yield SSMSequence(start, s.num_new_tokens, s.state.state_slot, fresh)
        start += s.num_new_tokens


def _prompt_logprob_span(s: ScheduledState, start: int) -> PromptLogprobSpan | None:
    state, n = s.state, s.num_new_tokens
    c, have = state.num_computed_tokens, state.num_prompt_logprobs
    if state.params.prompt_logprobs is None or have >= state.num_prompt_tokens:
        return None
    if have != (c + 1 if c else 0) or c >= state.num_prompt_tokens:
        return None
    return PromptLogprobSpan(state, start, start + min(n, state.num_prompt_tokens - c), c)


def build_sampling_batch(
    states: list[CachedRequestState],
    generators: dict[str, torch.Generator],
    eos_token_ids: frozenset[int],
    device: torch.device,
    bitmask: GrammarBitmask | None = None,
) -> SamplingBatch:
    params = [r.params for r in states]
    allowed = None
    if bitmask is not None:
        row_of = {state.request_id: row for row, state in enumerate(states)}
        pairs = [(row_of[r], i) for i, r in enumerate(bitmask.request_ids) if r in row_of]
        if pairs:  # a retry may run a subset of the step's rows
            words = torch.frombuffer(bytearray(bitmask.data), dtype=torch.int32)
            words = words.view(len(bitmask.request_ids), bitmask.words)
            take = torch.tensor([i for _, i in pairs])
            allowed = (
                torch.tensor([row for row, _ in pairs], device=device),
                words[take].to(device),
            )
    temperature = torch.tensor([p.temperature for p in params], device=device)
    all_greedy = all(p.is_greedy for p in params)
    top_k = top_p = min_p = None
    if any(p.top_k > 0 for p in params):
        top_k = torch.tensor([p.top_k or TOP_K_OFF for p in params], device=device)
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], device=device)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], device=device)
    gens = {}
    for row, (state, p) in enumerate(zip(states, params)):
        if p.seed is not None and not p.is_greedy:
            if state.request_id not in generators:
                generators[state.request_id] = torch.Generator(device=device).manual_seed(p.seed)
            gens[row] = generators[state.request_id]
    pen = [row for row, p in enumerate(params) if p.has_penalties]
    banned = [
        (row, sorted(_stop_ids(state, eos_token_ids)))
        for row, state in enumerate(states)
        if state.num_output_tokens < state.params.min_tokens
    ]
    return SamplingBatch(
        temperature=temperature,
        all_greedy=all_greedy,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
        generators=gens,
        penalty_rows=pen,
        presence=torch.tensor([params[r].presence_penalty for r in pen], device=device),
        frequency=torch.tensor([params[r].frequency_penalty for r in pen], device=device),
        repetition=torch.tensor([params[r].repetition_penalty for r in pen], device=device),
        output_ids=[states[r].output_token_ids for r in pen],
        prompt_ids=[states[r].prompt_token_ids for r in pen],
        banned=[(row, ids) for row, ids in banned if ids],
        num_logprobs=[p.logprobs for p in params],
        allowed=allowed,
        bias=[
            (
                row,
                torch.tensor(list(p.logit_bias), device=device),
                torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=device),
            )
            for row, p in enumerate(params)
            if p.logit_bias
        ],
    )


def _stop_ids(state: CachedRequestState, eos_token_ids: frozenset[int]) -> set[int]:
    ids = set(state.params.stop_token_ids or [])
    return ids if state.params.ignore_eos else ids | set(eos_token_ids)
