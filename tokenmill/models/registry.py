"""Maps a checkpoint's `architectures` name to the class that implements it."""

from __future__ import annotations

from tokenmill.models.bamba import BambaForCausalLM
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.mamba2 import Mamba2ForCausalLM

MODEL_CLASSES: dict[str, type] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Mamba2ForCausalLM": Mamba2ForCausalLM,
    "BambaForCausalLM": BambaForCausalLM,
}


def model_class(architecture: str) -> type:
    try:
        return MODEL_CLASSES[architecture]
    except KeyError:
        raise ValueError(
            f"architecture {architecture!r} is not supported; supported: {sorted(MODEL_CLASSES)}"
        ) from None
