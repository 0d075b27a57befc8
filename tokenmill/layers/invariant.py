"""Batch-invariant matmuls on CPU (config `batch_invariant`, `csrc/invariant_gemm.cpp`).

`InvariantLinear` holds a weight packed for the kernel, whose every output element is one fixed
chain of multiply-adds over the input dimension, so a row's result is the same bits whatever
else the batch holds. Used by `ModelRunner.make_batch_invariant` for every linear layer and the
LM head.
"""

from __future__ import annotations

import ctypes

import torch

from tokenmill.layers import native

_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
DTYPES = {torch.float32: 0, torch.bfloat16: 1}
PANEL = 16  # output columns per packed panel (the kernel's kCols)


def _lib():
    lib = native.load("invariant_gemm")
    lib.tm_invariant_pack.argtypes = [_PTR, _PTR, _I64, _I64, ctypes.c_int]
    lib.tm_invariant_gemm.argtypes = [_PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, ctypes.c_int,
                                      ctypes.c_int]  # fmt: skip
    lib.tm_invariant_pack.restype = lib.tm_invariant_gemm.restype = ctypes.c_int
    return lib


class InvariantLinear:
    """y = x W^T (+ b), batch-invariant; W [out, in] float32 or bfloat16 on CPU."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        if weight.device.type != "cpu" or weight.dtype not in DTYPES:
            raise ValueError(
                f"batch-invariant matmuls take float32 or bfloat16 CPU weights, not "
                f"{weight.dtype} on {weight.device.type}"
            )
        self.lib = _lib()
        self.dtype = weight.dtype
        self.out_features, self.in_features = weight.shape
        w = weight.detach().contiguous()
        panels = -(-self.out_features // PANEL)
        self.packed = torch.empty(panels * self.in_features * PANEL, dtype=w.dtype)
        rc = self.lib.tm_invariant_pack(w.data_ptr(), self.packed.data_ptr(), self.out_features,
                                        self.in_features, DTYPES[w.dtype])  # fmt: skip
        if rc:
            raise RuntimeError(f"invariant pack rejected its arguments (code {rc})")
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1]).to(self.dtype).contiguous()
        y = torch.empty(x2.shape[0], self.out_features, dtype=self.dtype)
        rc = self.lib.tm_invariant_gemm(
            x2.data_ptr(),
            self.packed.data_ptr(),
            None if self.bias is None else self.bias.data_ptr(),
            y.data_ptr(),
            x2.shape[0],
            self.in_features,
            self.out_features,
            DTYPES[self.dtype],
            torch.get_num_threads(),
        )
        if rc:
            raise RuntimeError(f"invariant GEMM rejected its arguments (code {rc})")
        return y.view(*x.shape[:-1], self.out_features)
