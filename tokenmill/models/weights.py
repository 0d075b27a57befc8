"""Filling a model's parameters from checkpoint tensors by name: the part every model file
shares (the Llama family adds its pipeline stages on top). A weight goes through its layer's
`weight_loader` where it has one (linear and sharded layers: merged q/k/v and gate/up pieces,
quantized layouts), else it is copied after a shape check. Unknown names are errors naming
them; `expected_names` is what the loader then checks was filled."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from tokenmill.layers.linear import Linear


def load_named(
    model: nn.Module,
    weights: Iterable[tuple[str, torch.Tensor]],
    resolve: Callable[[str], tuple[str, int | None]] = lambda name: (name, None),
    skip: Callable[[str], bool] = lambda name: False,
) -> set[str]:
    """Copy each (name, tensor) into the parameter `resolve(name)` names (with a shard index
    for a merged layer's piece); returns the filled names (`name#i` for pieces)."""
    params = dict(model.named_parameters())
    loaded: set[str] = set()
    for name, tensor in weights:
        if skip(name):
            continue
        target, shard = resolve(name)
        param = params.get(target)
        if param is None:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(model).__name__}")
        module = model.get_submodule(target.rsplit(".", 1)[0])
        loader = getattr(module, "weight_loader", None)
        if loader is not None:
            loader(param, tensor, shard)
        elif param.shape != tensor.shape:
            raise ValueError(f"{name}: expected shape {tuple(param.shape)}, got {tuple(tensor.shape)}")  # fmt: skip
        else:
            param.data.copy_(tensor)
        loaded.add(target if shard is None else f"{target}#{shard}")
    return loaded


def expected_names(model: nn.Module) -> set[str]:
    """Names `load_named` must have filled (a merged layer's pieces as `name#i`)."""
    out = set()
    for name, _ in model.named_parameters():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        if isinstance(module, Linear) and len(module.output_sizes) > 1:
            out.update(f"{name}#{i}" for i in range(len(module.output_sizes)))
        else:
            out.add(name)
    return out


def process_after_loading(model) -> None:
    """Each linear layer's quant method repacks its weights once, then the embedding and head
    (layers/embedding.py)."""
    for module in model.modules():
        if isinstance(module, Linear):
            module.quant_method.process_weights_after_loading(module)
    model.process_embedding_after_loading()


class SingleStageModel:
    """What a model file without pipeline stages (or compiled halves) answers the same way:
    its layers are all its own, nothing to compile, weights loaded by name."""

    model: nn.Module  # has .layers

    def own_layers(self) -> list[nn.Module]:
        return list(self.model.layers)  # type: ignore[arg-type]

    def compile_units(self) -> list[nn.Module]:
        return []

    def process_weights_after_loading(self) -> None:
        process_after_loading(self)

    def expected_weights(self) -> set[str]:
        return expected_names(self)  # type: ignore[arg-type]
