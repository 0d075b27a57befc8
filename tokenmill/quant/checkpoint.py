"""Quantized checkpoints: their layout, and loading them without re-quantizing (the writer,
`tokenmill quantize`, is quant/checkpoint_writer.py, above the model loaders).

Layout, named after compressed-tensors where it fits: each quantized linear `P` (a Hugging Face
name such as `model.layers.0.self_attn.q_proj`) is stored as `P.weight_packed` (codes: int8,
float8, or packed uint8), `P.weight_scale`, optionally `P.weight_zero_point` and
`P.weight_global_scale`, `P.weight_shape` (int64 [2]), and for w8a8/fp8 `P.input_smooth` (the
SmoothQuant scale of each input channel, calibrated in fp32). Every other tensor is copied as is.
config.json gains `quantization_config = {"quant_method": "tokenmill", "method": ..., "format":
..., "group_size": ..., ...}`. It is not a compressed-tensors checkpoint: other tools will not
read it, and this loader reads no other quantized layout.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import torch

from tokenmill.quant.formats import QuantizedTensor, cat_rows

QUANT_METHOD = "tokenmill"
PARTS = (
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_global_scale",
    "weight_shape",
    "input_smooth",  # SmoothQuant scales of the input channels (w8a8, fp8)
)


def to_state(prefix: str, q: QuantizedTensor) -> dict[str, torch.Tensor]:
    state = {
        f"{prefix}.weight_packed": q.data,
        f"{prefix}.weight_scale": q.scale,
        f"{prefix}.weight_shape": torch.tensor(q.shape, dtype=torch.int64),
    }
    if q.zero_point is not None:
        state[f"{prefix}.weight_zero_point"] = q.zero_point
    if q.global_scale is not None:
        state[f"{prefix}.weight_global_scale"] = q.global_scale
    return {k: v.contiguous() for k, v in state.items()}


def from_state(parts: dict[str, torch.Tensor], config: dict) -> QuantizedTensor:
    shape = tuple(parts["weight_shape"].tolist())
    scale = parts["weight_scale"]
    group_size = shape[1] // scale.shape[1] if scale.dim() == 2 else None  # per-layer for int4
    return QuantizedTensor(
        config["format"],
        shape,
        parts["weight_packed"],
        scale,
        parts.get("weight_zero_point"),
        parts.get("weight_global_scale"),
        group_size,
    )


def checkpoint_quantization(config_json: dict) -> dict | None:
    """The tokenmill quantization_config of a checkpoint, None for a plain one."""
    qcfg = config_json.get("quantization_config")
    if qcfg is None:
        return None
    if qcfg.get("quant_method") != QUANT_METHOD:
        raise ValueError(
            f"this checkpoint is quantized with {qcfg.get('quant_method')!r}, which tokenmill "
            "does not load; give it the 16/32-bit checkpoint and --quantization instead"
        )
    return qcfg


class QuantizedWeights:
    """Collects a checkpoint's quantized parts while the plain tensors stream to the model."""

    def __init__(self, config: dict) -> None:
        self.config = config
        self.parts: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)

    def filter(self, weights: Iterator[tuple[str, torch.Tensor]]):
        for name, tensor in weights:
            prefix, _, part = name.rpartition(".")
            if part in PARTS:
                self.parts[prefix][part] = tensor
            else:
                yield name, tensor

    def install(self, model) -> set[str]:
        """Give each linear layer its weight (shards of merged layers stacked); loaded names."""
        by_module: dict[str, dict[int, QuantizedTensor]] = defaultdict(dict)
        loaded = set()
        holds = getattr(model, "stage_holds", None)
        for prefix, parts in self.parts.items():
            if holds is not None and not holds(f"{prefix}.weight"):
                continue  # another pipeline stage's layer
            if prefix == "model.embed_tokens":  # its own quantized table (--quantize-embedding)
                from tokenmill.layers.embedding import QuantizedEmbedding

                dtype = model.model.embed_tokens.weight.dtype
                table = from_state(parts, self.config)
                model.model.embed_tokens = QuantizedEmbedding(table, dtype)
                loaded.add(f"{prefix}.weight")
                continue
            target, shard = model.resolve_name(f"{prefix}.weight")
            module_name = target.rsplit(".", 1)[0]
            by_module[module_name][shard or 0] = from_state(parts, self.config)
            if "input_smooth" in parts:  # the same for every shard: they share the input
                model.get_submodule(module_name).quant_method.set_input_smooth(
                    parts["input_smooth"]
                )
            loaded.add(target if shard is None else f"{target}#{shard}")
        for module_name, shards in by_module.items():
            layer = model.get_submodule(module_name)
            parts = [shards[i] for i in sorted(shards)]
            layer.quant_method.install(layer, cat_rows(parts) if len(parts) > 1 else parts[0])
            del layer.weight
        return loaded
