"""Writing quantized checkpoints (`tokenmill quantize`): the layout of quant/checkpoint.py.

It sits above the model loaders (it builds and calibrates the model as a load would), so that
reading a checkpoint (quant/checkpoint.py, used by models/hf.py) never imports a loader.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from tokenmill.models.arch import arch_from_hf_config
from tokenmill.models.build import (
    build_model,
    calibration_hook,
    linear_layer_names,
    resolve_max_model_len,
)
from tokenmill.models.hf import safetensor_files
from tokenmill.models.tokenizer import Tokenizer
from tokenmill.quant.checkpoint import QUANT_METHOD, to_state
from tokenmill.quant.formats import QuantizedTensor
from tokenmill.quant.methods import make_method


def model_tensor(model, name: str) -> torch.Tensor:
    """The model's current value of checkpoint tensor `name` (its rows of a merged layer)."""
    target, shard = model.resolve_name(name)
    param = model.get_parameter(target).data
    if shard is None:
        return param
    module = model.get_submodule(target.rsplit(".", 1)[0])
    start = sum(module.output_sizes[:shard])
    return param.narrow(0, start, module.output_sizes[shard])


def quantize_checkpoint(
    src: Path,
    dst: Path,
    method: str,
    options: dict,
    rotation_seeds: tuple[int, ...] | None = None,
    quantize_embedding: bool = False,
) -> dict:
    """Write `src` (an HF folder, 16/32-bit safetensors) quantized with `method` to `dst`.

    The weights go through the same model and quant methods as quantize-on-load (in float32,
    with the same calibration), so a checkpoint loads bit-identical to `--quantization`. With
    `rotation_seeds` the model is rotated first (quant/rotation.py; the best of several seeds,
    quant/rotation_search.py) and every tensor is written rotated, a tied head untied; loading
    makes only the run-time rotation again. With `quantize_embedding` the LM head is written
    quantized (`lm_head.*`), and the embedding as `model.embed_tokens.*` unless it is the tied
    head's table, which is stored once."""
    config = json.loads((src / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{src} is already quantized")
    arch = arch_from_hf_config(config)
    max_len = resolve_max_model_len(arch, None)
    model = build_model(
        arch, torch.float32, torch.device("cpu"), max_len, method, options, quantize_embedding
    )
    files = safetensor_files(src)
    model.load_weights(_read(files, "reading"))
    calibration_hook(Tokenizer.from_folder(src), max_len, rotation_seeds)(model)
    rotation_seed = getattr(model, "rotation_seed", None)
    quantizable = linear_layer_names(model)
    shards: dict[str, list[QuantizedTensor]] = {}
    state: dict[str, torch.Tensor] = {}
    for name, tensor in _read(files, "quantizing"):
        target, shard = model.resolve_name(name)
        module_name = target.rsplit(".", 1)[0]
        if model.embedding_source and name in ("model.embed_tokens.weight", "lm_head.weight"):
            continue  # written quantized below
        if not (name.endswith(".weight") and module_name in quantizable):
            if rotation_seed is not None and "rotary_emb" not in name:
                tensor = model_tensor(model, name).to(tensor.dtype)
            state[name] = tensor.contiguous()
            continue
        layer = model.get_submodule(module_name)
        if module_name not in shards:
            shards[module_name] = layer.quant_method.quantize_shards(layer)
        prefix = name.removesuffix(".weight")
        state.update(to_state(prefix, shards[module_name][shard or 0]))
        if layer.quant_method.input_smooth is not None:  # one copy per name
            state[f"{prefix}.input_smooth"] = layer.quant_method.input_smooth.clone()
    if model.embedding_source:
        state.update(_quantized_embedding(model))
    elif rotation_seed is not None:
        state["lm_head.weight"] = model.lm_head.weight.data.to(
            state["model.embed_tokens.weight"].dtype
        )
    if config.get("tie_word_embeddings") and not model.arch.tie_word_embeddings:
        config["tie_word_embeddings"] = False  # rotated: the head has its own matrix
    dst.mkdir(parents=True, exist_ok=True)
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for item in src.iterdir():
        if item.is_file() and not item.name.startswith("model") and item.name != "config.json":
            shutil.copy2(item, dst / item.name)
    quant = make_method(method, **options)
    qcfg = {"quant_method": QUANT_METHOD, "method": method, "format": quant.format, **options}
    if rotation_seed is not None:
        qcfg["rotation_seed"] = rotation_seed
    if model.embedding_source:
        qcfg["quantize_embedding"] = True
    config["quantization_config"] = qcfg
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return qcfg


def _quantized_embedding(model) -> dict[str, torch.Tensor]:
    """The LM head's quantized parts, and the embedding's where it has its own table."""
    head = model.lm_head
    state = to_state("lm_head", head.quant_method.quantize_shards(head)[0])
    if head.quant_method.input_smooth is not None:
        state["lm_head.input_smooth"] = head.quant_method.input_smooth.clone()
    if model.embedding_source == "own":
        table = head.quant_method.quantize_weight(model.model.embed_tokens.weight.data.float())
        state.update(to_state("model.embed_tokens", table))
    return state


def _read(files: list[Path], desc: str) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in tqdm(list(f.keys()), desc=f"{desc} {path.name}", leave=False):
                yield name, f.get_tensor(name)
