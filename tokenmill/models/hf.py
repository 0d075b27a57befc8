"""Hugging Face folders: config.json + safetensors (never pickles), plain or quantized by
`tokenmill quantize` (quant/checkpoint.py), into a `LoadedModel`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from tokenmill.config import QuantConfig
from tokenmill.models.arch import arch_from_hf_config
from tokenmill.models.build import (
    LoadedModel,
    build_model,
    calibration_hook,
    fill_weights,
    resolve_dtype,
    resolve_max_model_len,
)
from tokenmill.models.tokenizer import Tokenizer
from tokenmill.quant.checkpoint import QuantizedWeights, checkpoint_quantization


def load_hf_folder(
    folder: Path, dtype: str, device: torch.device, max_model_len: int | None, quant: QuantConfig
) -> LoadedModel:
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
    weights = read_safetensors(folder, device, f"loading {folder.name}")
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


def read_safetensors(
    folder: Path, device: torch.device, desc: str
) -> Iterator[tuple[str, torch.Tensor]]:
    handles = [safe_open(str(f), framework="pt", device="cpu") for f in safetensor_files(folder)]
    names = [(h, k) for h in handles for k in h.keys()]  # noqa: SIM118 (safe_open has no iterator)
    for handle, name in tqdm(
        names, desc=desc, unit="tensor", leave=False, disable=len(names) < 100
    ):
        yield name, handle.get_tensor(name).to(device)
