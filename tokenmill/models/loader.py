"""Loads a model for serving: an HF folder (safetensors only) or a GGUF file, onto one device.

This is the one place where checkpoint tensors meet model parameters; later, tensor-parallel
sharding and load-time quantization hook in here. Weights are read only from safetensors (or
GGUF, which is a plain tensor container), never from pickles.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from tokenmill.config import QuantConfig
from tokenmill.layers.linear import Linear
from tokenmill.models.arch import ModelArch, arch_from_hf_config
from tokenmill.models.registry import model_class
from tokenmill.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

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
    return wanted or limit


def load_model(
    model: str,
    dtype: str = "auto",
    device: str = "auto",
    max_model_len: int | None = None,
    quant: QuantConfig | None = None,
) -> LoadedModel:
    """Resolve `model` ('default', a .gguf file or an HF folder) and load it, quantized as
    `quant` (or its checkpoint) says."""
    from tokenmill.models.gguf import is_gguf, load_gguf, resolve_default_model

    start = time.perf_counter()
    path = Path(resolve_default_model() if model == "default" else model)
    dev = resolve_device(device)
    if is_gguf(path):
        loaded = load_gguf(path, dtype, dev, max_model_len, quant or QuantConfig())
    else:
        loaded = _load_hf_folder(path, dtype, dev, max_model_len, quant or QuantConfig())
    loaded.load_s = time.perf_counter() - start
    log.info(
        "loaded %s (%s, %.1fM params, %s%s on %s) in %.2f s",
        loaded.name,
        loaded.arch.architecture,
        loaded.arch.num_params / 1e6,
        str(loaded.dtype).removeprefix("torch."),
        f", linear layers {loaded.quantization}" if loaded.quantization else "",
        loaded.device,
        loaded.load_s,
    )
    return loaded


def load_tokenizer(model: str) -> Tokenizer:
    """The tokenizer alone (no weights): what a front process needs to serve `model`."""
    from tokenmill.models.gguf import GGUFFile, is_gguf, resolve_default_model
    from tokenmill.models.gguf_tokenizer import tokenizer_from_gguf

    path = Path(resolve_default_model() if model == "default" else model)
    if is_gguf(path):
        return tokenizer_from_gguf(GGUFFile(path).metadata)
    return Tokenizer.from_folder(path)


def _load_hf_folder(
    folder: Path, dtype: str, device: torch.device, max_model_len: int | None, quant: QuantConfig
) -> LoadedModel:
    from tokenmill.quant.checkpoint import QuantizedWeights, checkpoint_quantization

    if not (folder / "config.json").exists():
        raise FileNotFoundError(
            f"{folder} is not a Hugging Face model folder (no config.json); pass a folder saved "
            "with save_pretrained, a .gguf file, or 'default'"
        )
    config = json.loads((folder / "config.json").read_text())
    arch = arch_from_hf_config(config)
    torch_dtype = resolve_dtype(dtype, arch, device)
    max_len = resolve_max_model_len(arch, max_model_len)
    qcfg = checkpoint_quantization(config)
    method, options = quant.quantization, quant.method_options()
    if qcfg is not None:
        if method not in (None, qcfg["method"]):
            raise ValueError(
                f"{folder} is quantized with {qcfg['method']}; drop --quantization {method} or "
                "start from the unquantized checkpoint"
            )
        method = qcfg["method"]
        options = {k: qcfg[k] for k in ("activation_scaling", "amax_history_len") if k in qcfg}
    embedding = bool(qcfg.get("quantize_embedding")) if qcfg else quant.quantize_embedding
    model = build_model(arch, torch_dtype, device, max_len, method, options, embedding)
    tokenizer = Tokenizer.from_folder(folder)
    weights = _safetensors(folder, device, f"loading {folder.name}")
    if qcfg is not None and "rotation_seed" in qcfg:
        from tokenmill.quant.rotation import install_online_rotation

        install_online_rotation(model)  # its weights are rotated already
    calibrate = None if qcfg else calibration_hook(tokenizer, max_len, quant.rotation_seeds)
    fill_weights(model, weights, QuantizedWeights(qcfg) if qcfg else None, calibrate)
    arch = model.arch  # a rotated model has its own head
    eos = set(arch.eos_token_ids)
    gen = folder / "generation_config.json"
    if gen.exists():
        value = json.loads(gen.read_text()).get("eos_token_id")
        eos.update(value if isinstance(value, list) else [] if value is None else [value])
    if not eos and tokenizer.token_id("eos_token") is not None:
        eos.add(tokenizer.token_id("eos_token"))  # type: ignore[arg-type]
    return LoadedModel(
        model,
        arch,
        tokenizer,
        frozenset(eos),
        torch_dtype,
        device,
        folder.name,
        max_len,
        quantization=method,
    )


def build_model(
    arch: ModelArch,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    quantization: str | None = None,
    options: dict | None = None,
    quantize_embedding: bool = False,
) -> torch.nn.Module:
    """The model with empty weights; with `quantization`, each linear layer but the LM head gets
    its own quant method (the head and embeddings stay in `dtype`, as vLLM does by default;
    `quantize_embedding` quantizes them too)."""
    from tokenmill.quant.methods import make_method

    cls = model_class(arch.architecture)
    with torch.device(device):
        model = cls(arch, dtype, max_positions)
        if quantization is not None:
            for name in linear_layer_names(model):
                model.get_submodule(name).quant_method = make_method(
                    quantization, **(options or {})
                )
            if quantize_embedding:
                model.quantize_embedding(make_method(quantization, **(options or {})))
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


def safetensor_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (folder / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        bins = list(folder.glob("*.bin")) + list(folder.glob("*.pt"))
        hint = " (found pickle checkpoints, which are not loaded for safety)" if bins else ""
        raise FileNotFoundError(
            f"{folder} has no model.safetensors{hint}; convert it to safetensors"
        )
    return [folder / f for f in files]


def _safetensors(
    folder: Path, device: torch.device, desc: str
) -> Iterator[tuple[str, torch.Tensor]]:
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in safetensor_files(folder)]
    names = [(h, k) for h in handles for k in h.keys()]  # noqa: SIM118 (safe_open has no iterator)
    for handle, name in tqdm(
        names, desc=desc, unit="tensor", leave=False, disable=len(names) < 100
    ):
        yield name, handle.get_tensor(name).to(device)
