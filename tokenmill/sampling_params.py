"""SamplingParams: how one request's tokens are chosen, vLLM-compatible, validated on creation.

Invalid values raise `ValueError` naming the field and its allowed range, so the server can turn
them into a 400 that names the parameter. No torch here; the sampler reads these fields.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes
INT32_MAX = 2**31 - 1  # counts and ids the kernels hold in int32
MAX_N = 128  # completions per prompt (OpenAI's limit)
POOLING = ("last", "mean")
INT_FIELDS = ("n", "top_k", "max_tokens", "min_tokens", "logprobs", "prompt_logprobs", "seed")
FLOAT_FIELDS = (
    "temperature",
    "top_p",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
)


STRUCTURED_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Constrain the output to a language (vLLM's StructuredOutputsParams): exactly one of a JSON
    schema, any JSON object, a regular expression, a choice of strings, or a grammar (Lark or
    GBNF/EBNF). Enforced token by token by a grammar engine (tokenmill/structured/): a token
    that would leave the language is never sampled, and the request ends when it is complete.

    JSON is compact by default (", " and ": " between items and keys, no other whitespace): a
    small model allowed any whitespace can spend its max_tokens on newlines. `any_whitespace`
    (vLLM's disable_any_whitespace=False) allows JSON's whitespace anywhere it is legal.
    `source` names the request field it came from, for error messages."""

    json: str | dict | None = None  # a JSON schema (a dict, or its JSON text)
    json_object: bool = False  # any JSON object
    regex: str | None = None
    choice: tuple[str, ...] | list[str] | None = None
    grammar: str | None = None  # Lark (llguidance's dialect) or GBNF/EBNF (llama.cpp's)
    any_whitespace: bool = False
    source: str = field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        given = [k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise ValueError(
                f"{self.source} takes exactly one of {', '.join(STRUCTURED_KINDS)}; "
                f"got {given or 'none'}"
            )
        if isinstance(self.json, dict):  # key order kept: it orders the output's properties
            object.__setattr__(self, "json", json.dumps(self.json, ensure_ascii=False))
        elif self.json is not None and not isinstance(self.json, str):
            raise ValueError(f"{self.source}: a JSON schema must be an object, got {self.json!r}")
        if self.choice is not None:
            if not self.choice or not all(isinstance(c, str) and c for c in self.choice):
                raise ValueError(f"{self.source}: choice must be a list of non-empty strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ValueError(f"{self.source}: {name} must be a non-empty string")

    @property
    def kind(self) -> str:
        return next(k for k in STRUCTURED_KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple:
        """What identifies the compiled grammar (the cache key)."""
        return (self.kind, self.json, self.regex, self.choice, self.grammar, self.any_whitespace)


@dataclass
class SamplingParams:
    n: int = 1  # completions per prompt; they share the prompt's KV blocks
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    # the same draws whatever else is in the batch; the same tokens too with batch_invariant
    # (without it, logits differ in their last bits with the batch, and a near tie may flip)
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] | str | None = None  # never emitted, even when split across tokens
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to max_model_len
    min_tokens: int = 0
    logprobs: int | None = None  # top-k logprobs per generated token (plus the sampled one)
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None  # token id -> added to its logit, in [-100, 100]
    # An embedding request: the prompt's final hidden states pooled ("last" token or "mean"),
    # returned as RequestOutput.embedding; it runs as a one-token request (max_tokens 1)
    pooling: str | None = None
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output must match
    stop_strings: list[str] = field(init=False, repr=False)  # normalized `stop`

    def __post_init__(self) -> None:
        if self.top_k == -1:
            self.top_k = 0
        self.stop_strings = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._validate()

    def _validate(self) -> None:
        for name in INT_FIELDS:  # bool is an int in Python, never a valid count here
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                raise ValueError(f"{name} must be an integer, got {value!r}")
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value!r}")
        checks = [
            (self.n <= MAX_N, "n", f"must be <= {MAX_N}", self.n),
            (
                self.seed is None or SEED_MIN <= self.seed <= SEED_MAX,
                "seed",
                "must be a 64-bit integer",
                self.seed,
            ),
            (self.top_k <= INT32_MAX, "top_k", f"must be <= {INT32_MAX}", self.top_k),
            (
                self.max_tokens is None or self.max_tokens <= INT32_MAX,
                "max_tokens",
                f"must be <= {INT32_MAX}",
                self.max_tokens,
            ),
            (self.n >= 1, "n", "must be >= 1", self.n),
            (self.temperature >= 0.0, "temperature", "must be >= 0", self.temperature),
            (0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]", self.top_p),
            (self.top_k >= 0, "top_k", "must be -1, 0 (off) or >= 1", self.top_k),
            (0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]", self.min_p),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                "presence_penalty",
                "must be in [-2, 2]",
                self.presence_penalty,
            ),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                "frequency_penalty",
                "must be in [-2, 2]",
                self.frequency_penalty,
            ),
            (
                0.0 < self.repetition_penalty <= 10.0,
                "repetition_penalty",
                "must be in (0, 10]",
                self.repetition_penalty,
            ),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                "max_tokens",
                "must be >= 1",
                self.max_tokens,
            ),
            (self.min_tokens >= 0, "min_tokens", "must be >= 0", self.min_tokens),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens",
                "must be <= max_tokens",
                self.min_tokens,
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= 20,
                "logprobs",
                "must be in [0, 20]",
                self.logprobs,
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                "prompt_logprobs",
                "must be in [0, 20]",
                self.prompt_logprobs,
            ),
            (
                all(isinstance(s, str) and s for s in self.stop_strings),
                "stop",
                "must be non-empty strings",
                self.stop,
            ),
            (
                all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t <= INT32_MAX
                    for t in self.stop_token_ids or []
                ),
                "stop_token_ids",
                f"must be token ids in [0, {INT32_MAX}]",
                self.stop_token_ids,
            ),
        ]
        for ok, name, rule, value in checks:
            if not ok:
                raise ValueError(f"{name} {rule}, got {value!r}")
        if self.pooling is not None:
            if self.pooling not in POOLING:
                raise ValueError(f"pooling must be one of {POOLING}, got {self.pooling!r}")
            if self.n != 1 or self.max_tokens != 1:
                raise ValueError("pooling requests take n 1 and max_tokens 1")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise ValueError("structured_outputs must be a StructuredOutputsParams")
            if self.pooling is not None:
                raise ValueError("structured_outputs do not apply to pooling requests")
        for token, bias in (self.logit_bias or {}).items():
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token <= INT32_MAX:
                raise ValueError(f"logit_bias keys must be token ids, got {token!r}")
            if isinstance(bias, bool) or not isinstance(bias, int | float):
                raise ValueError(f"logit_bias values must be numbers, got {bias!r}")
            if not -100.0 <= bias <= 100.0:  # also refuses NaN
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def has_penalties(self) -> bool:
        return (
            self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
            or self.repetition_penalty != 1.0
        )

    def for_child(self, index: int) -> SamplingParams:
        """Params of the index-th of n completions: n=1, and a distinct derived seed."""
        seed = None if self.seed is None else (self.seed + index) % (SEED_MAX + 1)
        return SamplingParams(
            **{
                k: getattr(self, k)
                for k in self.__dataclass_fields__
                if k not in ("n", "seed", "stop_strings")
            },
            n=1,
            seed=seed,
        )
