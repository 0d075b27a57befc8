"""Quant methods: what a `Linear` does with its weight, behind the quant-method seam; this is
their registry (`make_method`), each method in its own file here, the interface in base.py.

Every method creates a plain weight for the loader to fill from a 16/32-bit checkpoint and
quantizes it in `process_weights_after_loading`; `install` takes an already quantized weight
(a checkpoint written by `tokenmill quantize`), so both paths end in the same state. Methods know
nothing of models; formats (formats.py) know nothing of layers.

Fast paths, each measured in BENCHMARKS.md, and where none exists the method says so in `kernel`:
  w8a8        int8 weights per channel x int8 activations per token (dynamic; symmetric, or
              with a zero point per token corrected exactly in int32): torch._int_mm (AVX-512
              VNNI on CPU, IMMA on CUDA), int32 accumulators, one fp32 rescale
  fp8         E4M3 weights per channel x E4M3 activations, "current" scaling (each token's amax)
              or "delayed" (one scale from the amax history of earlier steps, as Transformer Engine
              does): torch._scaled_mm on CUDA; on CPU, whose _scaled_mm is a slow reference
              (2.7 ms vs 0.03 ms bf16 for 576x1536), the same FP8 values go through bf16/fp32
              GEMMs: exact FP8 numerics, fp32 accumulation, no FP8 memory saving
  gguf        (gguf.py) a GGUF file's own blocks: native decode-GEMV and decode + GEMM
  weight-only (weight_only.py): int8, nvfp4, mxfp4 the native kernels of gguf.py on CPU; fp8
              fp4_cpu.py's; int4 _weight_int4pack_mm_for_cpu (bf16 on CPU); fp6 and dtypes
              dequantize on the fly, then the GEMM
"""

from __future__ import annotations

from tokenmill.config_quant import QUANTIZATIONS
from tokenmill.quant.formats import FORMATS
from tokenmill.quant.methods.base import CalibrationStats, LinearKernel, QuantMethod
from tokenmill.quant.methods.fp8 import FP8Method
from tokenmill.quant.methods.w8a8 import W8A8Method
from tokenmill.quant.methods.weight_only import WeightOnlyMethod
from tokenmill.quant.smoothquant import SmoothQuantMixin

__all__ = [
    "CalibrationStats",
    "FP8Method",
    "LinearKernel",
    "METHODS",
    "QuantMethod",
    "W8A8Method",
    "WeightOnlyMethod",
    "make_method",
]

METHODS = QUANTIZATIONS  # a bare format name means weight-only in that format


def make_method(name: str, **options) -> QuantMethod:
    """'w8a8' | 'fp8' | a format name (weight-only), with method options."""
    windows = options.pop("calibration_windows", None)
    search = options.pop("smoothquant_search", False)
    method = _make(name, **options)
    if windows is not None:
        method.calibration_windows = int(windows)
    if search:
        if not isinstance(method, SmoothQuantMixin):
            raise ValueError(f"smoothquant_search applies to w8a8 and fp8, not {name!r}")
        method.smoothquant_search = True
    return method


def _make(name: str, **options) -> QuantMethod:
    if name == "w8a8":
        return W8A8Method(**options)
    if name == "fp8":
        return FP8Method(**options)
    if name in FORMATS:
        return WeightOnlyMethod(name, **options)
    if name == "gguf":
        from tokenmill.quant.methods.gguf import GGUFMethod

        return GGUFMethod(**options)
    raise ValueError(f"unknown quantization {name!r}; known: {METHODS}")
