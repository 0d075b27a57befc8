"""Quantization methods side by side: weight bytes, decode and prefill speed, quality.

Every configuration is loaded fresh, warmed up, then measured on the same random-token prompts:
decode tokens/s at batch 1 and at batch 32 (from the engine's per-request TPOT: batch / median
TPOT), prefill tokens/s (8 prompts x 256 tokens, one output token), and, on a real model, the
paired comparison of quant/eval.py against the unquantized model in the same dtype.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass

import torch

from tokenmill.bench.offline import Workload, touch_kv_cache
from tokenmill.layers.embedding import QuantizedEmbedding
from tokenmill.layers.linear import Linear
from tokenmill.quant.methods.base import quantized_tensors
from tokenmill.sampling_params import SamplingParams


@dataclass
class Row:
    name: str  # method (+ kv cache dtype)
    dtype: str
    kernel: str  # the path the MLP down projection takes
    weight_mib: float  # resident bytes of every model tensor
    decode_b1_tps: float
    decode_b32_tps: float
    prefill_tps: float
    ppl: float | None = None
    ppl_change_pct: float | None = None
    ci_low: float | None = None
    ci_high: float | None = None
    significant: bool | None = None
    kl: float | None = None
    top1: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def model_bytes(model: torch.nn.Module) -> int:
    """Every tensor the model holds: parameters, packed weights, quantized codes and scales."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors = [t for t in vars(module).values() if isinstance(t, torch.Tensor)]
        tensors += list(module._parameters.values()) + list(module._buffers.values())
        if isinstance(module, Linear):  # the weight in its quant method's layouts
            tensors += module.quant_method.tensors()
        elif isinstance(module, QuantizedEmbedding):
            tensors += quantized_tensors(module.qweight)
        for t in tensors:
            if t is None or t.numel() == 0:
                continue
            try:
                key = t.untyped_storage().data_ptr()  # views share their storage
            except RuntimeError:  # opaque (oneDNN) layouts
                key = id(t)
            if key not in seen:
                seen.add(key)
                total += t.numel() * t.element_size()
    return total


def decode_tps(
    llm, batch: int, output_len: int, vocab: int, seed: int | None = None, prompt_len: int = 16
) -> float:
    seed = batch if seed is None else seed
    prompts = Workload(batch, prompt_len, output_len, seed=seed).prompts(vocab)
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return batch / statistics.median(o.metrics.tpot for o in outs)


def prefill_tps(llm, vocab: int, seed: int = 7) -> float:
    prompts = Workload(8, 256, 1, seed=seed).prompts(vocab)
    params = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return 8 * 256 / (time.perf_counter() - t)


def measure(
    model: str,
    dtype: str,
    method: str | None,
    kv: str,
    output_len: int,
    touch_kv: bool = False,
    compile: bool = False,
) -> tuple:
    """One configuration's row. `touch_kv` writes the KV pool once first, so decode figures are
    those of a warm server rather than include first-touch page faults of fresh KV blocks.
    `compile`: torch.compile'd layers, warmed up on every shape class measured (batch 1, batch
    32, prefill) so that no figure includes compile time. `method` may end in "+embedding"
    (the embedding and LM head quantized too)."""
    from tokenmill import LLM

    base, _, extra = (method or "").partition("+")  # "nvfp4+embedding": --quantize-embedding
    if extra not in ("", "embedding"):
        raise ValueError(f"unknown method suffix {extra!r} in {method!r}; known: +embedding")
    llm = LLM(
        model,
        dtype=dtype,
        quantization=base or None,
        quantize_embedding=bool(extra),
        kv_cache_dtype=kv,
        max_model_len=2048,
        compile=compile,
    )
    if touch_kv:
        touch_kv_cache(llm)
    loaded = llm.engine.loaded
    vocab = loaded.arch.vocab_size
    decode_tps(llm, 2, 4, vocab)  # warm-up
    if compile:
        decode_tps(llm, 1, 4, vocab, seed=1001)
        decode_tps(llm, 32, 4, vocab, seed=1032)
        prefill_tps(llm, vocab, seed=1007)
    layer = loaded.model.model.layers[0].mlp.down_proj
    plain = "oneDNN packed GEMM" if hasattr(layer, "packed_weight") else "F.linear"
    kernel = getattr(layer.quant_method, "kernel", "") or plain
    row = Row(
        name=(method or "none")
        + ("" if kv == "auto" else f" + kv {kv}")
        + (" (compiled)" if compile else ""),
        dtype=dtype,
        kernel=kernel,
        weight_mib=model_bytes(loaded.model) / 2**20,
        decode_b1_tps=decode_tps(llm, 1, output_len, vocab),
        decode_b32_tps=decode_tps(llm, 32, output_len, vocab),
        prefill_tps=prefill_tps(llm, vocab),
    )
    return llm, row


def add_quality(row: Row, reference, candidate, token_ids: list[int], max_windows: int) -> None:
    from tokenmill.quant.eval import compare

    c = compare(reference, candidate, token_ids, 512, max_windows)
    row.ppl, row.ppl_change_pct = c.perplexity, c.ppl_change_pct
    row.ci_low, row.ci_high, row.significant = c.ci_low, c.ci_high, c.significant
    row.kl, row.top1 = c.kl_divergence, c.top1_agreement


def release(llm) -> None:
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
