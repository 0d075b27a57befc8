"""The bottom of the loading stack: resolve dtype, device and length, build a model with
empty weights (each linear layer with its quant method), fill and check its weights, and the
`LoadedModel` record. Readers of checkpoint formats (models/hf.py, models/gguf.py) sit above it;
models/loader.py picks a reader. No reader is imported here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from tokenmill.layers.factory import LayerFactory
from tokenmill.layers.linear import Linear
from tokenmill.models.arch import ModelArch
from tokenmill.models.registry import model_class
from tokenmill.models.tokenizer import Tokenizer

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    arch: ModelArch
    tokenizer: Tokenizer
    eos_token_ids: frozenset[int]
    dtype: torch.dtype
    device: torch.device
    name: str  # what /v1/models calls it by default
    max_model_len: int  # longest sequence served: the user's limit, the model's, the window's
    load_s: float = 0.0
    quantization: str | None = None  # the quant method of the linear layers, None if none


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            "device 'cuda' was asked for, but torch sees no CUDA device; use --device cpu"
        )
    return torch.device(device)


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run at 2x+ the fp32 rate (BENCHMARKS.md, roofline)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str, arch: ModelArch, device: torch.device) -> torch.dtype:
    """'auto': bfloat16 on GPUs and on CPUs with native bf16 matmuls, else float32."""
    if dtype != "auto":
        return TORCH_DTYPES[dtype]
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    ckpt = TORCH_DTYPES.get(arch.torch_dtype, torch.bfloat16)
    return torch.bfloat16 if ckpt == torch.float32 else ckpt


def resolve_max_model_len(arch: ModelArch, wanted: int | None) -> int:
    limit = arch.max_position_embeddings
    if arch.sliding_window is not None and arch.sliding_window < limit:
        limit = arch.sliding_window  # no sliding-window attention yet: stay inside the window
    if wanted is not None and wanted > limit:
        raise ValueError(
            f"max_model_len {wanted} exceeds what this model supports ({limit}); lower it"
        )
    if wanted is None and arch.ssm is not None:
        from tokenmill.models.arch import SSM_MAX_LEN

        return min(limit, SSM_MAX_LEN)
    return wanted or limit


def build_model(
    arch: ModelArch,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    quantization: str | None = None,
    options: dict | None = None,
    quantize_embedding: bool = False,
) -> torch.nn.Module:
    """The model with empty weights; with `quantization`, each linear layer is built with its own
    quant method (the head and embeddings stay in `dtype`, as vLLM does by default;
    `quantize_embedding` quantizes them too)."""
    from tokenmill.quant.methods import make_method

    def method_for(prefix: str):
        if quantization is None or (prefix == "lm_head" and not quantize_embedding):
            return None
        return make_method(quantization, **(options or {}))

    cls = model_class(arch.architecture)
    with torch.device(device):
        model = cls(arch, LayerFactory(dtype, method_for), max_positions)
        if quantization is not None and quantize_embedding:
            model.quantize_embedding(method_for("lm_head"))
    return model.eval().requires_grad_(False)


def linear_layer_names(model: torch.nn.Module) -> set[str]:
    """Module names of the linear layers that quantization applies to (all but the LM head,
    unless the embedding is quantized too)."""
    head = "" if getattr(model, "embedding_source", None) else "lm_head"
    return {n for n, m in model.named_modules() if isinstance(m, Linear) and n != head}


def calibration_hook(
    tokenizer: Tokenizer, max_len: int, rotation_seeds: tuple[int, ...] | None = None
):
    """What fill_weights runs between loading and quantizing: the rotation, if asked for
    (quant/rotation.py; with several seeds, the one quant/rotation_search.py chooses, kept as
    `model.rotation_seed`), then calibration (quant/calibrate.py)."""

    def run(model) -> None:
        from tokenmill.quant.calibrate import calibrate
        from tokenmill.quant.rotation import rotate_model
        from tokenmill.quant.rotation_search import choose_rotation_seed

        if rotation_seeds:
            seed = rotation_seeds[0]
            if len(rotation_seeds) > 1:
                seed = choose_rotation_seed(model, tokenizer, max_len, rotation_seeds)
            rotate_model(model, seed)
            model.rotation_seed = seed
        calibrate(model, tokenizer, max_len)

    return run


def fill_weights(
    model, weights: Iterator[tuple[str, torch.Tensor]], quantized=None, calibrate=None
) -> None:
    """Load every tensor, then check that no parameter was left unfilled.

    `quantized` (quant/checkpoint.QuantizedWeights) takes a quantized checkpoint's packed
    tensors out of the stream and installs them in their layers; `calibrate(model)` runs on the
    loaded float weights before the quant methods quantize them.
    """
    if quantized is not None:
        weights = quantized.filter(weights)
    loaded = model.load_weights(weights)
    if quantized is not None:
        loaded |= quantized.install(model)
    missing = model.expected_weights() - loaded
    if model.arch.tie_word_embeddings:
        missing.discard("lm_head.weight")
    if getattr(model, "embedding_source", None) == "head" and "lm_head.weight" in loaded:
        missing.discard("model.embed_tokens.weight")  # stored once, as the quantized head
    if missing:
        raise ValueError(f"checkpoint lacks tensors: {sorted(missing)[:8]} ({len(missing)} in all)")
    if calibrate is not None:
        calibrate(model)
    model.process_weights_after_loading()
