"""Sampler: the last logits of each request -> its next token, batched.

Order of processing (as vLLM): logprobs of the raw logits; penalties (repetition on prompt and
output, presence and frequency on output); logit_bias; min_tokens bans of EOS/stop ids; structured outputs' grammar masks; greedy
rows take the argmax; other rows divide by temperature, then min_p, top_k and top_p masks, then
draw with the exponential-race trick argmax(p / E), E ~ Exp(1). A seeded row draws E from its own
generator, so its draws do not depend on what else is in the batch (its tokens neither, given
logits that do not: --batch-invariant).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class SamplingBatch:
    temperature: torch.Tensor  # [n] float; 0 = greedy
    all_greedy: bool  # fast path: argmax only
    top_k: torch.Tensor | None  # [n] long; vocab size where off
    top_p: torch.Tensor | None  # [n] float; 1 where off
    min_p: torch.Tensor | None  # [n] float; 0 where off
    generators: dict[int, torch.Generator]  # row -> the request's seeded generator
    penalty_rows: list[int] = field(default_factory=list)  # rows with any penalty
    presence: torch.Tensor | None = None  # [len(penalty_rows)]
    frequency: torch.Tensor | None = None  # [len(penalty_rows)]
    repetition: torch.Tensor | None = None  # [len(penalty_rows)]
    output_ids: list[list[int]] = field(default_factory=list)  # per penalty row
    prompt_ids: list[list[int]] = field(default_factory=list)  # per penalty row
    banned: list[tuple[int, list[int]]] = field(default_factory=list)  # (row, ids) min_tokens bans
    num_logprobs: list[int | None] = field(default_factory=list)  # per row; None = not asked
    bias: list[tuple[int, torch.Tensor, torch.Tensor]] = field(default_factory=list)  # logit_bias
    # structured outputs: (rows, [len(rows), ceil(vocab / 32)] int32 bitmasks of allowed tokens)
    allowed: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]  # one per row
    logprobs: list[dict[int, float] | None]  # per row: sampled token + top-k, when asked


class Sampler:
    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator  # for unseeded rows

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        logits = logits.float()  # [n, vocab]
        raw = logits if any(k is not None for k in batch.num_logprobs) else None
        if batch.penalty_rows:
            logits = self._apply_penalties(logits.clone(), batch)
        if batch.bias or batch.banned:
            logits = logits if batch.penalty_rows else logits.clone()
            for row, ids, values in batch.bias:
                logits[row, ids] += values
            for row, ids in batch.banned:
                logits[row, ids] = float("-inf")
        if batch.allowed is not None:
            logits = apply_bitmask(
                logits if batch.penalty_rows or batch.bias or batch.banned else logits.clone(),
                *batch.allowed,
            )
        if batch.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample(logits, batch)
        token_list = tokens.tolist()
        return SamplerOutput(token_list, self._logprobs(raw, token_list, batch.num_logprobs))

    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        greedy = batch.temperature == 0
        temp = torch.where(greedy, torch.ones_like(batch.temperature), batch.temperature)
        scaled = logits / temp.unsqueeze(1)
        if batch.min_p is not None:
            probs = scaled.softmax(dim=-1)
            floor = batch.min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
            scaled = scaled.masked_fill(probs < floor, float("-inf"))
        if batch.top_k is not None or batch.top_p is not None:
            scaled = _top_k_top_p(scaled, batch.top_k, batch.top_p)
        probs = scaled.softmax(dim=-1)
        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for row, gen in batch.generators.items():
            noise[row].exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        return torch.where(greedy, logits.argmax(dim=-1), sampled)

    @staticmethod
    def _apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        rows = torch.tensor(batch.penalty_rows, device=logits.device)
        sub = logits[rows]  # [m, vocab]
        counts = torch.zeros_like(sub)
        seen = torch.zeros_like(sub, dtype=torch.bool)
        for i, (out, prompt) in enumerate(zip(batch.output_ids, batch.prompt_ids)):
            if out:
                ids = torch.tensor(out, device=logits.device)
                counts[i].index_add_(0, ids, torch.ones(len(out), device=logits.device))
            seen[i, prompt] = True
        seen |= counts > 0
        rep = batch.repetition.unsqueeze(1)  # type: ignore[union-attr]
        sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
        sub -= batch.frequency.unsqueeze(1) * counts  # type: ignore[union-attr]
        sub -= batch.presence.unsqueeze(1) * (counts > 0)  # type: ignore[union-attr]
        logits[rows] = sub
        return logits

    @staticmethod
    def _logprobs(
        raw: torch.Tensor | None, tokens: list[int], wanted: list[int | None]
    ) -> list[dict[int, float] | None]:
        if raw is None:
            return [None] * len(tokens)
        out: list[dict[int, float] | None] = []
        for row, k in enumerate(wanted):
            if k is None:
                out.append(None)
                continue
            out.append(token_logprobs(raw[row], tokens[row], k))
        return out


_BITS = {}
_NATIVE: list = []


def _native_rows():
    """The native row kernels where they build (once), else None."""
    if not _NATIVE:
        from tokenmill.layers import native
        from tokenmill.layers.native_ops import shared_row_kernels

        try:
            _NATIVE.append(shared_row_kernels())
        except native.NativeUnavailable:
            _NATIVE.append(None)
    return _NATIVE[0]


def apply_bitmask(logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """-inf where a row's bitmask bit is 0 (the grammar forbids the token), in place; columns
    past the mask's width are forbidden too. On CPU one native blend pass
    (layers/csrc/elementwise.cpp), else torch."""
    native = _native_rows()
    if native is not None and native.apply_bitmask(logits, rows, words):
        return logits
    device = logits.device
    bits = _BITS.get(device)
    if bits is None:
        bits = _BITS[device] = torch.arange(32, dtype=torch.int32, device=device)
    allowed = ((words.unsqueeze(-1) >> bits) & 1).bool().flatten(1)  # [m, 32 * words]
    vocab = logits.shape[1]
    if allowed.shape[1] < vocab:
        pad = torch.zeros(len(rows), vocab - allowed.shape[1], dtype=torch.bool, device=device)
        allowed = torch.cat([allowed, pad], dim=1)
    logits[rows] = logits[rows].masked_fill(~allowed[:, :vocab], float("-inf"))
    return logits


def token_logprobs(logits: torch.Tensor, token_id: int, k: int) -> dict[int, float]:
    """{chosen token: logprob, then the top-k tokens: logprob}, from one row of raw logits."""
    lp = logits.float().log_softmax(dim=-1)
    entry = {token_id: lp[token_id].item()}
    if k:
        values, ids = lp.topk(k)
        for i, v in zip(ids.tolist(), values.tolist()):
            entry.setdefault(i, v)
    return entry


def _top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device).unsqueeze(0)
    drop = torch.zeros_like(sorted_logits, dtype=torch.bool)
    if top_k is not None:
        drop |= ranks >= top_k.unsqueeze(1)
    if top_p is not None:
        probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass of strictly better tokens
        drop |= before >= top_p.unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)
