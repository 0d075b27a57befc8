"""A decoder layer's output half at decode sizes as one native call (`csrc/skinny_linear.cpp`,
`tm_decode_mlp_*`): o_proj, residual add + RMSNorm, gate_up, SiLU(gate) * up, down.

At batch 1 the five layers' Python, dispatch and thread wake-ups cost about as much as their
GEMVs' arithmetic; one call with barriers between the stages keeps the threads in one parallel
region. The stages are the very kernels the layers call one by one (the skinny GEMV, the native
row ops), so the output is the same bits. Built only where every part is plain: packed fp32/bf16
weights the skinny kernel reads, a plain RMSNorm with native row kernels, plain SiLU * up. More
than MAX_ROWS rows, or anything else, and the caller runs the layers as before.
"""

from __future__ import annotations

import ctypes

import torch

from tokenmill.layers import skinny
from tokenmill.layers.activation import SiluAndMul
from tokenmill.layers.linear import Linear, UnquantizedMethod
from tokenmill.layers.norm import RMSNorm

_FIELDS = 13  # int64 fields of the C struct MlpBlock


def _readable(layer: Linear) -> bool:
    method = layer.quant_method
    return type(method) is UnquantizedMethod and method.packed is not None and method.block_cols > 0


class MLPBlock:
    """(o [rows, in], residual [rows, hidden]) -> (mlp output, o_proj(o) + residual)."""

    def __init__(self, o_proj: Linear, norm: RMSNorm, gate_up: Linear, down: Linear) -> None:
        self.dtype = norm.weight.dtype
        self.hidden, self.eps = o_proj.out_features, float(norm.eps)
        self._keep = [o_proj, norm, gate_up, down]  # the pointers below live as long as these
        fields = []
        for layer in (o_proj, gate_up, down):
            method = layer.quant_method
            bias = layer.bias.data_ptr() if layer.bias is not None else 0
            fields += [torch.ops.mkldnn.data_ptr(method.packed), bias, method.block_cols]
            if layer is o_proj:
                fields.append(o_proj.in_features)
        fields += [norm.weight.data_ptr(), self.hidden, down.in_features]
        assert len(fields) == _FIELDS
        self._desc = (ctypes.c_int64 * _FIELDS)(*fields)
        self._desc_ptr = ctypes.addressof(self._desc)
        lib = skinny._library()
        assert lib is not None
        tag = "bf16" if self.dtype == torch.bfloat16 else "f32"
        self._fn = getattr(lib, f"tm_decode_mlp_{tag}")
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._fn.argtypes = [i64, ptr, i64, ptr, ptr, ptr, ptr, ctypes.c_float, ctypes.c_int]
        self._fn.restype = ctypes.c_int

    @classmethod
    def build(cls, o_proj, norm, gate_up, down, act) -> MLPBlock | None:
        """The fused block over these layers, or None where one of them is not plain."""
        plain = (
            all(isinstance(x, Linear) and _readable(x) for x in (o_proj, gate_up, down))
            and type(norm) is RMSNorm
            and norm.native is not None
            and type(act) is SiluAndMul
            and norm.weight.dtype in (torch.float32, torch.bfloat16)
            and all(x.params_dtype == norm.weight.dtype for x in (o_proj, gate_up, down))
            and gate_up.out_features == 2 * down.in_features
            and down.out_features == o_proj.out_features == norm.weight.shape[0]
        )
        return cls(o_proj, norm, gate_up, down) if plain else None

    def __call__(self, o: torch.Tensor, residual: torch.Tensor):
        rows = o.shape[0]
        if not 0 < rows <= skinny.MAX_ROWS or o.dtype != self.dtype or residual.dtype != o.dtype:
            return None
        if o.stride(-1) != 1 or (
            self.dtype == torch.bfloat16 and (o.stride(0) % 2 or o.data_ptr() % 4)
        ):
            return None
        residual = residual.contiguous()
        out = torch.empty(rows, self.hidden, dtype=self.dtype)
        summed = torch.empty(rows, self.hidden, dtype=self.dtype)
        done = self._fn(
            rows,
            o.data_ptr(),
            o.stride(0),
            residual.data_ptr(),
            out.data_ptr(),
            summed.data_ptr(),
            self._desc_ptr,
            self.eps,
            torch.get_num_threads(),
        )
        return (out, summed) if done else None
