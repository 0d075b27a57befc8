"""InputProcessor: the front's side of a new request: prompt -> token ids, checked against the
model (non-empty, inside the vocabulary, short enough) -> an `EngineCoreRequest`.

Raises ValueError naming the field, so the server answers 400 before the core ever sees it.
It runs wherever the caller runs it; the server calls it from a worker thread (tokenizing a long
prompt must not hold the event loop).
"""

from __future__ import annotations

import time
from typing import Any

from tokenmill.engine.messages import EngineCoreRequest
from tokenmill.models.tokenizer import Tokenizer
from tokenmill.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


class InputProcessor:
    def __init__(self, tokenizer: Tokenizer, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            self.tokenizer.check_fits(prompt, self.max_model_len)
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            return self.tokenize(prompt["prompt"])
        return None, list(prompt)

    def process(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams,
        arrival: float | None = None,
    ) -> tuple[str | None, EngineCoreRequest]:
        """(prompt text, the core's request); ValueError for bad input."""
        text, ids = self.tokenize(prompt)
        self.validate(ids if text != "" else [], params)
        arrival = time.monotonic() if arrival is None else arrival
        return text, EngineCoreRequest(request_id, tuple(ids), params, arrival)

    def validate(self, ids: list[int], params: SamplingParams) -> None:
        """Lengths first: an overlong prompt is refused before any per-token work, so no
        check here costs more than max_model_len steps (a 4 MB body of ids holds the GIL for
        seconds otherwise, and with it the event loop)."""
        if not ids:
            raise ValueError("prompt must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens, but max_model_len is {self.max_model_len}; "
                "it must be shorter (context_length_exceeded)"
            )
        if params.max_tokens is not None and len(ids) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds "
                f"max_model_len ({self.max_model_len}); lower max_tokens (context_length_exceeded)"
            )
        vocab = self.vocab_size
        if not all(type(t) is int for t in ids) or min(ids) < 0 or max(ids) >= vocab:
            bad = [t for t in ids if not (type(t) is int and 0 <= t < vocab)]
            raise ValueError(f"prompt token ids must be in [0, {vocab}), got {bad[:5]}")
        if params.stop_token_ids and max(params.stop_token_ids) >= vocab:
            raise ValueError(f"stop_token_ids must be in [0, {vocab})")
        if params.logit_bias and max(params.logit_bias) >= vocab:
            raise ValueError(
                f"logit_bias keys must be token ids in [0, {vocab}), got {max(params.logit_bias)}"
            )
        if params.structured_outputs is not None:  # the grammar engine's checks, cached by spec
            from tokenmill.structured.grammar import validate as validate_structured

            validate_structured(params.structured_outputs)
        if params.top_k > vocab:
            raise ValueError(f"top_k must be <= the vocabulary size ({vocab}), got {params.top_k}")
