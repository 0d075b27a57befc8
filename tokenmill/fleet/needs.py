"""What an instance needs in memory, for the partition planner: its weights as it will hold
them (the tensors' element counts from the checkpoint's header, at the served width) plus its KV
budget (`kv_cache_memory`). An estimate: activations and the runtime come on top."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from tokenmill.fleet.config import InstanceSpec

# bits per weight of a linear layer's weight under each quantization (codes and scales)
QUANT_BITS = {"int8": 8, "w8a8": 8, "fp8": 8, "fp8_e4m3": 8, "fp8_e5m2": 8, "int4": 4.625,
              "nvfp4": 4.5, "mxfp4": 4.25, "mxfp6_e3m2": 6.25, "mxfp6_e2m3": 6.25}  # fmt: skip
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "auto": 2}
LINEAR_NAMES = ("_proj.", "attn_q.", "attn_k.", "attn_v.", "attn_output.", "ffn_")


def weight_elements(model: str) -> list[tuple[str, int]]:
    """(tensor name, element count) of every tensor of an HF folder's safetensors or a GGUF."""
    path = Path(model)
    if model == "default":
        from tokenmill.models.gguf import resolve_default_model

        path = resolve_default_model()
    if path.is_file() and path.suffix == ".gguf":
        from tokenmill.models.gguf import GGUFFile

        f = GGUFFile(path)
        return [(n, _numel(t.shape)) for n, t in f.tensors.items()]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model}: no .safetensors files and not a .gguf file")
    out = []
    for f in files:
        with f.open("rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
        out += [(n, _numel(v["shape"])) for n, v in header.items() if n != "__metadata__"]
    return out


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def memory_need(spec: InstanceSpec) -> tuple[int, list[str]]:
    """(bytes, notes) one replica of `spec` needs: weights at its served width + its KV budget."""
    notes = []
    dtype = spec.engine.get("dtype", "auto")
    plain = DTYPE_BYTES.get(dtype, 2)
    method = spec.engine.get("quantization")
    if method == "gguf":
        path = Path(spec.model)
        if spec.model == "default":
            from tokenmill.models.gguf import resolve_default_model

            path = resolve_default_model()
        weights = path.stat().st_size  # served from the file's own codes
    else:
        bits = QUANT_BITS.get(method) if method else None
        weights = 0
        for name, n in weight_elements(spec.model):
            linear = bits is not None and any(k in name for k in LINEAR_NAMES)
            weights += int(n * (bits / 8 if linear else plain))  # type: ignore[operator]
    kv = spec.engine.get("kv_cache_memory")
    if kv is None:
        notes.append(f"{spec.name}: no kv_cache_memory: its need counts the weights only")
        kv = 0
    return weights + int(kv), notes


def model_size(model: str):
    """The model's tensors as profiles/choose.ModelSize: linear-layer and other elements, and
    the GGUF file's size when it is one."""
    from tokenmill.profiles.choose import ModelSize

    elements = weight_elements(model)
    linear = sum(n for name, n in elements if any(k in name for k in LINEAR_NAMES))
    path = Path(model)
    if model == "default":
        from tokenmill.models.gguf import resolve_default_model

        path = resolve_default_model()
    gguf = path.stat().st_size if path.is_file() and path.suffix == ".gguf" else None
    return ModelSize(linear, sum(n for _, n in elements) - linear, gguf)
