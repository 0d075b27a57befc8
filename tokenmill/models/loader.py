"""The top of the loading stack: picks the reader for `model` ('default', a .gguf file or a
Hugging Face folder) and loads it onto one device (models/build.py underneath, models/hf.py and
models/gguf.py the readers). Weights are read only from safetensors or GGUF, never from pickles.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from tokenmill.config import QuantConfig
from tokenmill.models.build import LoadedModel, resolve_device
from tokenmill.models.gguf import GGUFFile, is_gguf, load_gguf, resolve_default_model
from tokenmill.models.gguf_tokenizer import tokenizer_from_gguf
from tokenmill.models.hf import load_hf_folder
from tokenmill.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

__all__ = ["LoadedModel", "load_model", "load_tokenizer"]


def load_model(
    model: str,
    dtype: str = "auto",
    device: str = "auto",
    max_model_len: int | None = None,
    quant: QuantConfig | None = None,
) -> LoadedModel:
    """Resolve `model` ('default', a .gguf file or an HF folder) and load it, quantized as
    `quant` (or its checkpoint) says."""
    start = time.perf_counter()
    path = Path(resolve_default_model() if model == "default" else model)
    dev = resolve_device(device)
    if is_gguf(path):
        loaded = load_gguf(path, dtype, dev, max_model_len, quant or QuantConfig())
    elif quant is not None and quant.quantization == "gguf":
        raise ValueError(
            f"quantization gguf serves a .gguf file's own codes; {path} is not one (give a "
            ".gguf model, or a quantization such as int8 or nvfp4 for this checkpoint)"
        )
    else:
        loaded = load_hf_folder(path, dtype, dev, max_model_len, quant or QuantConfig())
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
    path = Path(resolve_default_model() if model == "default" else model)
    if is_gguf(path):
        return tokenizer_from_gguf(GGUFFile(path).metadata)
    return Tokenizer.from_folder(path)
