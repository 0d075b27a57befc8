"""A decoder layer's two halves around attention at decode sizes, one native call each
(`csrc/skinny_linear.cpp`): `QKVBlock` is residual add + RMSNorm, qkv_proj and rotary on q and
k (`tm_decode_qkv_*`); `MLPBlock` is o_proj, residual add + RMSNorm, gate_up, SiLU(gate) * up and
down (`tm_decode_mlp_*`).

At batch 1 the five layers' Python, dispatch and thread wake-ups cost about as much as their
GEMVs' arithmetic; one call with barriers between the stages keeps the threads in one parallel
region. The stages are the very kernels the layers call one by one (the skinny GEMV, the native
row ops), so the output is the same bits. Built only where every part is plain: packed fp32/bf16
weights the skinny kernel reads, a plain RMSNorm with native row kernels, plain SiLU * up, rotary
with native kernels and no q/k norm. More than MAX_ROWS rows, or anything else, and the caller
runs the layers as before. `GGUFQKVBlock` and `GGUFMLPBlock` are the same halves over a GGUF
file's codes (quantization='gguf': `tm_gguf_decode_*` in csrc/gguf.cpp, its decode GEMVs);
the int8, nvfp4 and mxfp4 weight-only layers take them too (their codes are such rows); `build_inputs` /
`build_outputs` pick whichever applies.
"""

from __future__ import annotations

import ctypes

import torch

from tokenmill.layers import skinny
from tokenmill.layers.activation import SiluAndMul
from tokenmill.layers.linear import Linear, UnquantizedMethod
from tokenmill.layers.norm import RMSNorm

_MLP_FIELDS = 13  # int64 fields of the C struct MlpBlock
_QKV_FIELDS = 8  # and of QkvBlock


def _readable(layer: Linear) -> bool:
    method = layer.quant_method
    return type(method) is UnquantizedMethod and method.packed is not None and method.block_cols > 0


def _still_packed(held: list[tuple[Linear, torch.Tensor]]) -> bool:
    """Whether each layer still applies the packed weight a block was built over (batch-invariant
    mode, for one, repacks them later: the block then steps aside)."""
    return all(layer.quant_method.packed is p and layer.quant_method.block_cols for layer, p in held)  # fmt: skip


Watched = tuple[list[tuple[object, str, object]], list[tuple[object, str, object]]]


def _watch_packed(held: list[tuple[Linear, torch.Tensor]]) -> Watched:
    """What `_still_packed` checks, as (object, attribute, value) triples: the same objects,
    and equal block columns (what the native descriptors were built with)."""
    same: list[tuple[object, str, object]] = []
    equal: list[tuple[object, str, object]] = []
    for layer, packed in held:
        method = layer.quant_method
        same += [(layer, "quant_method", method), (method, "packed", packed)]
        equal.append((method, "block_cols", method.block_cols))
    return same, equal


def _linear_fields(layer: Linear) -> list[int]:
    bias = layer.bias.data_ptr() if layer.bias is not None else 0
    return [torch.ops.mkldnn.data_ptr(layer.quant_method.packed), bias, layer.quant_method.block_cols]  # fmt: skip


def _function(name: str, dtype: torch.dtype, args: int):
    """`name`_bf16 or _f32 of the skinny library: (rows, `args` pointers, eps, threads)."""
    lib = skinny._library()
    assert lib is not None
    fn = getattr(lib, f"{name}_{'bf16' if dtype == torch.bfloat16 else 'f32'}")
    fn.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * args, ctypes.c_float, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def _address(fn) -> int:
    """A ctypes function's entry point, for native callers."""
    address = ctypes.cast(fn, ctypes.c_void_p).value
    assert address is not None
    return address


def _takes(x: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether x is rows the kernels read: 1..MAX_ROWS contiguous rows of `dtype`."""
    return 0 < x.shape[0] <= skinny.MAX_ROWS and x.dtype == dtype and x.is_contiguous()


def _native_norm(norm) -> bool:
    """A plain RMSNorm in fp32/bf16 with the native row kernels."""
    return (
        type(norm) is RMSNorm
        and norm.native is not None
        and norm.weight.dtype in (torch.float32, torch.bfloat16)
    )


def _plain(norm, *linears) -> bool:
    dtype = norm.weight.dtype
    return _native_norm(norm) and all(
        isinstance(x, Linear) and _readable(x) and x.params_dtype == dtype for x in linears
    )


def _mlp_fits(o_proj, norm, gate_up, down, act) -> bool:
    """Whether the MLP half has the shapes the fused kernels assume: SiLU(gate) * up, and
    o_proj, down and the norm on the hidden size."""
    return (
        type(act) is SiluAndMul
        and gate_up.out_features == 2 * down.in_features
        and down.out_features == o_proj.out_features == norm.weight.shape[0]
    )


class QKVBlock:
    """(cos_sin, x [rows, hidden], residual or None) -> (q, k, v, residual) as
    DecoderLayer.attention_inputs returns them: q, k rotated; v a view of the q/k/v output."""

    takes = staticmethod(_plain)  # whether the kernels read the norm's and layers' weights

    def __init__(self, norm: RMSNorm, qkv: Linear, num_heads: int, num_kv_heads: int, head_dim: int):  # fmt: skip
        self.dtype, self.eps = norm.weight.dtype, float(norm.eps)
        self.hidden, self.n_qkv = qkv.in_features, qkv.out_features
        self.heads, self.kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self._held = [(qkv, qkv.quant_method.packed)]  # keeps what the pointers below point at
        self._norm_weight = norm.weight
        fields = [*_linear_fields(qkv), self.n_qkv, norm.weight.data_ptr(), self.hidden]
        fields += [num_heads + num_kv_heads, head_dim]
        assert len(fields) == _QKV_FIELDS
        self._desc = (ctypes.c_int64 * _QKV_FIELDS)(*fields)
        self.desc_ptr = ctypes.addressof(self._desc)
        self._fn = _function("tm_decode_qkv", self.dtype, 8)
        self.entry = _address(self._fn)  # for layers/decode_layers.py: the C signature above
        self.gguf = False  # whether that signature has the x_bf16 flag (csrc/gguf.cpp)

    def current(self) -> bool:
        """Whether the weights this block was built over are still the layers' (see
        `_still_packed`)."""
        return _still_packed(self._held)

    def watched(self) -> Watched:
        """`current` as attribute triples, for a caller that checks many blocks each step
        (layers/decode_layers.py): (object, name, value) that must stay the same object, and
        those that must stay equal."""
        return _watch_packed(self._held)

    @classmethod
    def build(cls, norm, qkv, rotary, attention) -> QKVBlock | None:
        """The fused half over these modules, or None where one of them is not plain."""
        if attention.q_norm is not None or rotary.native is None or not cls.takes(norm, qkv):
            return None
        h, kvh, d = attention.num_heads, attention.num_kv_heads, attention.head_dim
        if qkv.out_features != (h + 2 * kvh) * d or qkv.in_features != norm.weight.shape[0]:
            return None
        return cls(norm, qkv, h, kvh, d)

    def __call__(self, cos_sin, x: torch.Tensor, residual: torch.Tensor | None):
        cos, sin = cos_sin
        if not _takes(x, self.dtype) or not (cos.is_contiguous() and sin.is_contiguous()):
            return None
        if cos.dtype != self.dtype or cos.shape != (x.shape[0], 1, self.head_dim):
            return None
        if residual is not None and not _takes(residual, self.dtype):
            return None
        if not self.current():
            return None
        rows, h, kvh, d = x.shape[0], self.heads, self.kv_heads, self.head_dim
        summed = torch.empty_like(x) if residual is not None else None
        qkv = torch.empty(rows, self.n_qkv, dtype=self.dtype)
        rotated = torch.empty(rows, h + kvh, d, dtype=self.dtype)
        done = self._fn(
            rows,
            x.data_ptr(),
            residual.data_ptr() if residual is not None else None,
            summed.data_ptr() if summed is not None else None,
            qkv.data_ptr(),
            rotated.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            self.desc_ptr,
            self.eps,
            torch.get_num_threads(),
        )
        if not done:
            return None
        v = qkv.view(rows, h + 2 * kvh, d)[:, h + kvh :]
        return rotated[:, :h], rotated[:, h:], v, x if residual is None else summed


class MLPBlock:
    """(o [rows, in], residual [rows, hidden]) -> (mlp output, o_proj(o) + residual)."""

    takes = staticmethod(_plain)

    def __init__(self, o_proj: Linear, norm: RMSNorm, gate_up: Linear, down: Linear) -> None:
        self.dtype = norm.weight.dtype
        self.hidden, self.eps = o_proj.out_features, float(norm.eps)
        self._held = [(x, x.quant_method.packed) for x in (o_proj, gate_up, down)]  # as QKVBlock
        self._norm_weight = norm.weight
        fields = [*_linear_fields(o_proj), o_proj.in_features, *_linear_fields(gate_up)]
        fields += [*_linear_fields(down), norm.weight.data_ptr(), self.hidden, down.in_features]
        assert len(fields) == _MLP_FIELDS
        self._desc = (ctypes.c_int64 * _MLP_FIELDS)(*fields)
        self.desc_ptr = ctypes.addressof(self._desc)
        self._fn = _function("tm_decode_mlp", self.dtype, 5)
        self.entry, self.gguf = _address(self._fn), False  # as QKVBlock's

    def current(self) -> bool:
        return _still_packed(self._held)

    def watched(self) -> Watched:
        return _watch_packed(self._held)

    @classmethod
    def build(cls, o_proj, norm, gate_up, down, act) -> MLPBlock | None:
        """The fused block over these layers, or None where one of them is not plain."""
        plain = cls.takes(norm, o_proj, gate_up, down) and _mlp_fits(
            o_proj, norm, gate_up, down, act
        )
        return cls(o_proj, norm, gate_up, down) if plain else None

    def __call__(self, o: torch.Tensor, residual: torch.Tensor):
        rows = o.shape[0]
        if not 0 < rows <= skinny.MAX_ROWS or o.dtype != self.dtype or residual.dtype != o.dtype:
            return None
        if not self.current():
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
            residual.data_ptr(),
            out.data_ptr(),
            summed.data_ptr(),
            self.desc_ptr,
            self.eps,
            torch.get_num_threads(),
        )
        return (out, summed) if done else None


def _gguf_readable(layer: Linear, dtype: torch.dtype) -> bool:
    """Whether the layer applies csrc/gguf.cpp's GEMV over segments of rows (a GGUF file's codes,
    int8 / int4 / nvfp4 / mxfp4 / fp8 weight-only rows, w8a8 and fp8 rows) with nothing around it
    (no input smoothing but w8a8's and fp8's, which their kernels apply)."""
    from tokenmill.quant.methods.fp8 import NativeFp8Kernel
    from tokenmill.quant.methods.gguf import NativeGGUFKernel
    from tokenmill.quant.methods.w8a8 import NativeW8A8Kernel
    from tokenmill.quant.methods.weight_only import NativeRowsKernel

    method = layer.quant_method
    impl = getattr(method, "impl", None)
    quantizes_x = NativeW8A8Kernel | NativeFp8Kernel  # their factors are in their tables
    if not isinstance(impl, NativeGGUFKernel | NativeRowsKernel | quantizes_x):
        return False
    if getattr(method, "smooth_inv", None) is not None and not isinstance(impl, quantizes_x):
        return False  # (their GEMVs multiply x by the factors)
    return layer.params_dtype == dtype and (dtype == torch.float32 or impl.kernels.bf16_gemv)


def _gguf_plain(norm, *linears) -> bool:
    dtype = norm.weight.dtype
    return _native_norm(norm) and all(
        isinstance(x, Linear) and _gguf_readable(x, dtype) for x in linears
    )


def _gguf_fields(layer: Linear) -> list[int]:
    w = layer.quant_method.impl.w  # type: ignore[union-attr]
    bias = layer.bias.data_ptr() if layer.bias is not None else 0
    return [w.table.data_ptr(), len(w.segments), w.rows, w.cols, bias]


def _gguf_function(name: str, dtype: torch.dtype, args: int):
    """csrc/gguf.cpp's `name`: (rows, `args` pointers, eps, x_bf16, threads), as the skinny
    halves are called (the x_bf16 flag filled in)."""
    from tokenmill.quant.methods.gguf import shared_kernels

    fn = getattr(shared_kernels().lib, name)
    fn.argtypes = [ctypes.c_int64, *[ctypes.c_void_p] * args, ctypes.c_float, ctypes.c_int, ctypes.c_int]  # fmt: skip
    fn.restype = ctypes.c_int
    flag = int(dtype == torch.bfloat16)
    call = lambda *a: fn(*a[:-1], flag, a[-1])  # noqa: E731
    return call, _address(fn)


def _still_native(held: list[tuple[Linear, object]]) -> bool:
    return all(layer.quant_method.impl is impl for layer, impl in held)


def _watch_native(held: list[tuple[Linear, object]]) -> Watched:
    same: list[tuple[object, str, object]] = []
    for layer, impl in held:
        same += [(layer, "quant_method", layer.quant_method), (layer.quant_method, "impl", impl)]
    return same, []


class GGUFQKVBlock(QKVBlock):
    """QKVBlock over GGUF codes (csrc/gguf.cpp tm_gguf_decode_qkv)."""

    takes = staticmethod(_gguf_plain)

    def __init__(self, norm: RMSNorm, qkv: Linear, num_heads: int, num_kv_heads: int, head_dim: int):  # fmt: skip
        self.dtype, self.eps = norm.weight.dtype, float(norm.eps)
        self.hidden, self.n_qkv = qkv.in_features, qkv.out_features
        self.heads, self.kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self._gguf_held = [(qkv, qkv.quant_method.impl)]  # keeps what the pointers point at
        self._norm_weight = norm.weight
        fields = [*_gguf_fields(qkv), norm.weight.data_ptr(), self.hidden]
        fields += [num_heads + num_kv_heads, head_dim]
        self._desc = (ctypes.c_int64 * len(fields))(*fields)
        self.desc_ptr = ctypes.addressof(self._desc)
        self._fn, self.entry = _gguf_function("tm_gguf_decode_qkv", self.dtype, 8)
        self.gguf = True

    def current(self) -> bool:
        return _still_native(self._gguf_held)

    def watched(self) -> Watched:
        return _watch_native(self._gguf_held)


class GGUFMLPBlock(MLPBlock):
    """MLPBlock over GGUF codes (csrc/gguf.cpp tm_gguf_decode_mlp)."""

    takes = staticmethod(_gguf_plain)

    def __init__(self, o_proj: Linear, norm: RMSNorm, gate_up: Linear, down: Linear) -> None:
        self.dtype = norm.weight.dtype
        self.hidden, self.eps = o_proj.out_features, float(norm.eps)
        self._gguf_held = [(x, x.quant_method.impl) for x in (o_proj, gate_up, down)]
        self._norm_weight = norm.weight
        fields = [*_gguf_fields(o_proj), *_gguf_fields(gate_up), *_gguf_fields(down)]
        fields += [norm.weight.data_ptr(), self.hidden, down.in_features]
        self._desc = (ctypes.c_int64 * len(fields))(*fields)
        self.desc_ptr = ctypes.addressof(self._desc)
        self._fn, self.entry = _gguf_function("tm_gguf_decode_mlp", self.dtype, 5)
        self.gguf = True

    def current(self) -> bool:
        return _still_native(self._gguf_held)

    def watched(self) -> Watched:
        return _watch_native(self._gguf_held)


def build_inputs(norm, qkv, rotary, attention) -> QKVBlock | None:
    """The fused input half over these modules: plain packed weights or GGUF codes; None if
    neither applies."""
    return QKVBlock.build(norm, qkv, rotary, attention) or GGUFQKVBlock.build(
        norm, qkv, rotary, attention
    )


def build_outputs(o_proj, norm, gate_up, down, act) -> MLPBlock | None:
    return MLPBlock.build(o_proj, norm, gate_up, down, act) or GGUFMLPBlock.build(
        o_proj, norm, gate_up, down, act
    )
