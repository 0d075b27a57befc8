"""Engine configuration: one frozen dataclass per subsystem, composed into `EngineConfig`.

Each field carries its documentation in `metadata["help"]`; the CLI builds its `--help` from it.
Validation happens once, in `__post_init__`, with errors that say what to do. This module imports
no torch: sizes that depend on the device (the KV budget on CUDA) are resolved by the runner.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
FORMATS = ("int8", "int4", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "mxfp4", "nvfp4")
QUANTIZATIONS = ("w8a8", "fp8", *FORMATS)  # quant/methods.py METHODS; a test keeps them equal
KV_CACHE_DTYPES = ("auto", "int8", "fp8_e4m3")
ATTENTION_BACKENDS = ("auto", "torch", "native")  # layers/cpu_attention.py BACKENDS
BLOCK_SCALED = ("nvfp4", "mxfp4", "fp6_e3m2", "fp6_e2m3", "int4")  # scale_search.SEARCHABLE


def _help(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class ModelConfig:
    """What to load and how."""

    model: str = _help(
        "A local Hugging Face folder, a .gguf file, or 'default' for the bundled SmolLM2-135M-Instruct.",
        default="default",
    )
    dtype: str = _help(
        "Weight and activation dtype: float32, bfloat16, float16, or auto: the checkpoint's "
        "half type on CUDA; on CPU bfloat16 where it has native bf16 matmuls (AVX512-BF16, AMX), "
        "else float32.",
        default="auto",
    )
    max_model_len: int | None = _help(
        "Longest prompt + completion in tokens; default: the model's max_position_embeddings.",
        default=None,
    )
    seed: int = _help("Seed of the engine's random generator (unseeded sampling).", default=0)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache."""

    block_size: int = _help("Tokens per KV block.", default=16)
    kv_cache_memory: int | None = _help(
        "Bytes for the KV cache; default: enough for max_num_seqs full-length sequences, "
        "at most gpu_memory_utilization of the device less the weights on CUDA, at most "
        "4 GiB on CPU.",
        default=None,
    )
    gpu_memory_utilization: float = _help(
        "Fraction of CUDA device memory that weights + KV cache may take.", default=0.9
    )
    enable_prefix_caching: bool = _help(
        "Reuse KV blocks of identical prompt prefixes across requests.", default=True
    )
    kv_cache_dtype: str = _help(
        "KV cache storage: auto (the model dtype), int8 or fp8_e4m3 (one scale per token and "
        "head; about half the bytes of bf16, so twice the tokens fit). On CPU int8 is the fast one.",
        default="auto",
    )

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two >= 1, got {self.block_size}")
        if self.kv_cache_memory is not None and self.kv_cache_memory <= 0:
            raise ValueError(f"kv_cache_memory must be > 0 bytes, got {self.kv_cache_memory}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {self.kv_cache_dtype!r}"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits."""

    max_num_seqs: int = _help("Most sequences running in one step.", default=64)
    max_num_batched_tokens: int = _help("Most tokens computed in one step.", default=2048)
    enable_chunked_prefill: bool = _help(
        "Split long prompts over several steps, mixed with decodes.", default=True
    )
    max_model_len: int = _help("Set from the model config by the engine.", default=2048)
    max_waiting: int | None = _help(
        "Most requests waiting for admission; beyond it new requests are refused (HTTP 429).",
        default=None,
    )

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                "without chunked prefill, max_num_batched_tokens "
                f"({self.max_num_batched_tokens}) must be >= max_model_len ({self.max_model_len}); "
                "raise it or enable chunked prefill"
            )


@dataclass(frozen=True)
class DeviceConfig:
    """Where the model runs."""

    device: str = _help("cpu, cuda, or auto (cuda when available).", default="auto")
    num_threads: int | None = _help("CPU threads for torch; default: all cores.", default=None)
    compile: bool = _help(
        "Compile each decoder layer's code around attention with torch.compile (inductor: "
        "norms, rotary, activations and activation quantization fused into C++ kernels on CPU). "
        "Faster steps where eager code sat between GEMMs (w8a8; BENCHMARKS.md); a warm-up at "
        "start builds the graphs (about 6-15 s, cached on disk for later starts). Needs a C++ "
        "compiler on CPU.",
        default=False,
    )
    attention_backend: str = _help(
        "Decode attention: native (a C++ kernel that reads K/V in place from the paged pool, "
        "CPU, float32/bfloat16, built on first use), torch (gather + SDPA, every device and "
        "cache dtype), or auto: native where it applies and builds, else torch.",
        default="auto",
    )

    def __post_init__(self) -> None:
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be one of {DEVICES} or cuda:N, got {self.device!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {ATTENTION_BACKENDS}, "
                f"got {self.attention_backend!r}"
            )


@dataclass(frozen=True)
class QuantConfig:
    """Weight and activation precision, quantized at load time from a 16/32-bit checkpoint."""

    quantization: str | None = _help(
        "w8a8 (int8 weights x int8 per-token activations), fp8 (E4M3 weights and activations), "
        "or a format for weight-only: int8, int4, fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, mxfp4, "
        "nvfp4. Default: none, or what a quantized checkpoint says.",
        default=None,
    )
    activation_scaling: str = _help(
        "fp8 activation scales: current (each token's amax, every step) or delayed (one scale "
        "from the amax history of earlier steps, as Transformer Engine does).",
        default="current",
    )
    amax_history_len: int = _help("Steps of amax history for delayed scaling.", default=16)
    group_size: int | None = _help(
        "int4 group size (32, 64 or 128); default 128, or the largest that divides the rows.",
        default=None,
    )
    gptq: bool = _help(
        "Choose weight codes with GPTQ (error-compensating, from the Hessian of each layer's "
        "inputs on a few windows of held-out text) instead of round-to-nearest; same format and "
        "kernels, a slower load.",
        default=False,
    )
    smoothquant_alpha: float = _help(
        "w8a8 and fp8: SmoothQuant migration strength in [0, 1], calibrated at load on a few "
        "windows of text; 0 turns smoothing off.",
        default=0.5,
    )
    smoothquant_search: bool = _help(
        "w8a8 and fp8: choose SmoothQuant's alpha per layer (0 to 0.8) for the least output "
        "error of the quantized layer on sampled calibration tokens, instead of one alpha.",
        default=False,
    )
    scale_search: bool = _help(
        "nvfp4, mxfp4, fp6_*, int4: choose each block's scale (int4: its clipped range) for the "
        "least error, weighted by each input channel's E[x^2] on calibration text (same format; "
        "a slower load).",
        default=False,
    )
    activation_zero_point: bool = _help(
        "w8a8: per-token activation codes with a zero point (asymmetric), so that skewed inputs "
        "use the whole int8 range: lower error, about 10% slower on CPU (BENCHMARKS.md).",
        default=False,
    )
    calibration_windows: int = _help(
        "Windows of 512 tokens of calibration text (Hamlet; evaluation uses another play) that "
        "SmoothQuant, AWQ, GPTQ and the scale search fit on; more fit better, load slower.",
        default=16,
    )
    awq: bool = _help(
        "Weight-only formats: AWQ input-channel scaling (each input channel's weights scaled by "
        "E[x^2]^(alpha/2) from calibration text, alpha searched per layer, the input divided "
        "back at run time); composes with --scale-search and --gptq (a slower load).",
        default=False,
    )

    def __post_init__(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        if self.activation_scaling not in ("current", "delayed"):
            raise ValueError(
                f"activation_scaling must be current or delayed, got {self.activation_scaling!r}"
            )
        if self.amax_history_len < 1:
            raise ValueError(f"amax_history_len must be >= 1, got {self.amax_history_len}")
        if not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError(f"smoothquant_alpha must be in [0, 1], got {self.smoothquant_alpha}")
        if self.group_size not in (None, 32, 64, 128):
            raise ValueError(f"group_size must be 32, 64 or 128, got {self.group_size}")
        if self.scale_search and self.quantization not in BLOCK_SCALED:
            raise ValueError(
                f"scale_search applies to quantization {BLOCK_SCALED}, got {self.quantization!r}"
            )

        if self.smoothquant_search and self.quantization not in ("w8a8", "fp8"):
            raise ValueError(
                f"smoothquant_search applies to w8a8 and fp8, got quantization {self.quantization!r}"
            )
        if self.activation_zero_point and self.quantization != "w8a8":
            raise ValueError(
                f"activation_zero_point applies to w8a8, got quantization {self.quantization!r}"
            )
        if self.calibration_windows < 1:
            raise ValueError(f"calibration_windows must be >= 1, got {self.calibration_windows}")
        if self.awq and self.quantization in (None, "w8a8", "fp8"):
            raise ValueError(
                "awq applies to weight-only quantization (a format such as nvfp4 or int4); "
                f"got {self.quantization!r} (w8a8 and fp8 use smoothquant_alpha)"
            )

    def method_options(self) -> dict[str, Any]:
        """Keyword arguments for quant/methods.make_method."""
        common: dict[str, Any] = {"gptq": True} if self.gptq else {}
        if self.scale_search:
            common["scale_search"] = True
        if self.awq:
            common["awq"] = True
        if self.calibration_windows != 16:
            common["calibration_windows"] = self.calibration_windows
        if self.smoothquant_search:
            common["smoothquant_search"] = True
        if self.quantization == "fp8":
            return {
                "activation_scaling": self.activation_scaling,
                "amax_history_len": self.amax_history_len,
                "smoothquant_alpha": self.smoothquant_alpha,
                **common,
            }
        if self.quantization == "w8a8":
            if self.activation_zero_point:
                common["activation_zero_point"] = True
            return {"smoothquant_alpha": self.smoothquant_alpha, **common}
        if self.quantization == "int4":
            return {"group_size": self.group_size, **common}
        return common


@dataclass(frozen=True)
class EngineConfig:
    """Everything the engine needs, one sub-config per subsystem."""

    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> EngineConfig:
        """Route flat keyword arguments (as `LLM(...)` and the CLI take them) to sub-configs.

        An unknown keyword is an error, never silently dropped.
        """
        parts: dict[str, dict[str, Any]] = {p: {} for p in PARTS}
        owners = {f.name: part for part, sub in PARTS.items() for f in fields(sub)}
        for key, value in kwargs.items():
            if key not in owners:
                raise TypeError(f"unknown engine option {key!r}; known: {sorted(owners)}")
            if key == "max_model_len":
                parts["model"][key] = value
                continue
            parts[owners[key]][key] = value
        return cls(
            model=ModelConfig(**parts["model"]),
            cache=CacheConfig(**parts["cache"]),
            scheduler=SchedulerConfig(**parts["scheduler"]),
            device=DeviceConfig(**parts["device"]),
            quant=QuantConfig(**parts["quant"]),
        )


PARTS: dict[str, type] = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "device": DeviceConfig,
    "quant": QuantConfig,
}


def option_help() -> dict[str, tuple[str, Any, Any]]:
    """Flat option name -> (help, default, type) for the CLI."""
    out: dict[str, tuple[str, Any, Any]] = {}
    for sub in PARTS.values():
        for f in fields(sub):
            if f.name in out:
                continue
            if sub is SchedulerConfig and f.name == "max_model_len":
                continue
            out[f.name] = (f.metadata.get("help", ""), f.default, f.type)
    return out
