"""Flattening one scheduled step into tensors: the packed model input and the sampling batch.

Layout: single-token requests (decodes) first, one row each, then each multi-token chunk as a
contiguous span. Slot mapping, per-request key slots and masks are built here once per step, in
numpy, and shared by every layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tokenmill.engine.request import Request
from tokenmill.engine.scheduler import ScheduledRequest, SchedulerOutput
from tokenmill.layers.attention import AttentionMetadata, PrefillSpan
from tokenmill.layers.sampler import SamplingBatch

TOP_K_OFF = 1 << 30


@dataclass(frozen=True)
class ModelInput:
    input_ids: torch.Tensor  # [num_tokens]
    positions: torch.Tensor  # [num_tokens]
    attn: AttentionMetadata  # read by every attention layer
    logits_indices: torch.Tensor  # [num_sample] packed index of each sampling request's last token
    sample_requests: list[Request]  # row order of logits_indices
    prompt_logprob_spans: list[tuple[Request, int, int, int]]  # (req, start, end, first position)


def _slots(table: list[int], start: int, end: int, block_size: int) -> np.ndarray:
    """Cache slots of positions [start, end) of a sequence with block table `table`."""
    pos = np.arange(start, end)
    return np.asarray(table, dtype=np.int64)[pos // block_size] * block_size + pos % block_size


def build_model_input(
    out: SchedulerOutput, block_size: int, pad_slot: int, device: torch.device
) -> ModelInput:
    decodes = [s for s in out.scheduled if s.num_new_tokens == 1]
    chunks = [s for s in out.scheduled if s.num_new_tokens > 1]
    ordered = decodes + chunks
    ids: list[int] = []
    positions: list[np.ndarray] = []
    slot_mapping: list[np.ndarray] = []
    for s in ordered:
        c, n = s.num_computed_tokens, s.num_new_tokens
        ids.extend(s.request.all_token_ids[c : c + n])
        positions.append(np.arange(c, c + n))
        slot_mapping.append(_slots(s.block_table, c, c + n, block_size))

    def tensor(a: np.ndarray | list[int]) -> torch.Tensor:
        return torch.as_tensor(np.asarray(a, dtype=np.int64)).to(device)

    decode_tables, decode_mask, decode_lens = _decode_keys(decodes, block_size, pad_slot, device)
    spans, sample_idx, sample_reqs, lp_spans = [], [], [], []
    start = 0
    for i, s in enumerate(ordered):
        n = s.num_new_tokens
        if i >= len(decodes):
            spans.append(_prefill_span(s, start, block_size, device))
        if s.samples:
            sample_idx.append(start + n - 1)
            sample_reqs.append(s.request)
        lp = _prompt_logprob_span(s, start)
        if lp is not None:
            lp_spans.append(lp)
        start += n
    attn = AttentionMetadata(
        slot_mapping=tensor(np.concatenate(slot_mapping)),
        num_decode_tokens=len(decodes),
        block_size=block_size,
        decode_block_tables=decode_tables,
        decode_mask=decode_mask,
        decode_lens=decode_lens,
        prefills=spans,
    )
    return ModelInput(
        input_ids=tensor(ids),
        positions=tensor(np.concatenate(positions)),
        attn=attn,
        logits_indices=tensor(sample_idx),
        sample_requests=sample_reqs,
        prompt_logprob_spans=lp_spans,
    )


def _decode_keys(
    decodes: list[ScheduledRequest], block_size: int, pad_slot: int, device: torch.device
):
    """Block tables of the decodes, padded with the zeroed pad block, the key mask and the
    number of keys of each."""
    if not decodes:
        return None, None, None
    lens = [s.num_computed_tokens + 1 for s in decodes]
    max_blocks = -(-max(lens) // block_size)
    tables = np.full((len(decodes), max_blocks), pad_slot // block_size, dtype=np.int64)
    for row, (s, n) in enumerate(zip(decodes, lens)):
        used = -(-n // block_size)
        tables[row, :used] = s.block_table[:used]
    mask = np.arange(max_blocks * block_size)[None, :] < np.asarray(lens)[:, None]
    return (
        torch.from_numpy(tables).to(device),
        torch.from_numpy(mask[:, None, None, :]).to(device),
        torch.tensor(lens, dtype=torch.int32, device=device),
    )


def _prefill_span(s: ScheduledRequest, start: int, block_size: int, device) -> PrefillSpan:
    c, n = s.num_computed_tokens, s.num_new_tokens
    if c == 0:
        return PrefillSpan(start, start + n, 0, None, None)
    slots = torch.from_numpy(_slots(s.block_table, 0, c + n, block_size)).to(device)
    mask = np.arange(c + n)[None, :] <= (c + np.arange(n))[:, None]  # [n, c + n]
    return PrefillSpan(start, start + n, c, slots, torch.from_numpy(mask).to(device))


def _prompt_logprob_span(s: ScheduledRequest, start: int) -> tuple[Request, int, int, int] | None:
    req, c, n = s.request, s.num_computed_tokens, s.num_new_tokens
    have = len(req.prompt_logprobs)
    if req.params.prompt_logprobs is None or have >= req.num_prompt_tokens:
        return None
    if have != (c + 1 if c else 0) or c >= req.num_prompt_tokens:
        return None
    return req, start, start + min(n, req.num_prompt_tokens - c), c


def build_sampling_batch(
    reqs: list[Request], generators: dict[str, torch.Generator], device: torch.device
) -> SamplingBatch:
    params = [r.params for r in reqs]
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
    for row, (req, p) in enumerate(zip(reqs, params)):
        if p.seed is not None and not p.is_greedy:
            if req.request_id not in generators:
                generators[req.request_id] = torch.Generator(device=device).manual_seed(p.seed)
            gens[row] = generators[req.request_id]
    pen = [row for row, p in enumerate(params) if p.has_penalties]
    banned = [
        (row, sorted(_stop_ids(req)))
        for row, req in enumerate(reqs)
        if req.num_output_tokens < req.params.min_tokens
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
        output_ids=[reqs[r].output_token_ids for r in pen],
        prompt_ids=[reqs[r].prompt_token_ids for r in pen],
        banned=[(row, ids) for row, ids in banned if ids],
        num_logprobs=[p.logprobs for p in params],
    )


def _stop_ids(req: Request) -> set[int]:
    ids = set(req.params.stop_token_ids or [])
    return ids if req.params.ignore_eos else ids | set(req.eos_token_ids)
