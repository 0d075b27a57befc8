"""Triton kernels behind `triton_dequant.py`: decoding of every weight-only format in registers
(integer arithmetic and bit casts, no lookup tables) and three ways to use it:

  _matmul_kernel   tiles of x times decoded weight tiles: on the tensor cores (`tl.dot`, fp32
                   accumulation) or, for a handful of rows (decode, GEMV=True), by broadcast
                   multiply-and-sum; K optionally split across programs that add with atomics
  _dequant_kernel  the whole weight decoded into the activation dtype, for cuBLAS to multiply
                   (many rows: prefill), written once per call

Layouts are those of `formats.py` (the module docstring of triton_dequant.py lists them).
"""

import triton
import triton.language as tl


@triton.jit
def _minifloat(code, E: tl.constexpr, M: tl.constexpr, B: tl.constexpr, SUB: tl.constexpr):
    """int32 codes (sign in bit E + M) -> fp32 values of a minifloat without inf/NaN codes."""
    mag = code & ((1 << (E + M)) - 1)
    normal = ((mag << (23 - M)) + ((127 - B) << 23)).to(tl.float32, bitcast=True)
    value = tl.where((mag >> M) == 0, (mag & ((1 << M) - 1)).to(tl.float32) * SUB, normal)
    return tl.where(((code >> (E + M)) & 1) == 1, -value, value)


@triton.jit
def _e8m0(s):
    """uint8 E8M0 exponents (int32) -> 2^(s - 127) in fp32; 0 is 2^-127, 255 NaN."""
    value = (s << 23).to(tl.float32, bitcast=True)
    value = tl.where(s == 0, 5.877471754111438e-39, value)  # 2^-127: an fp32 subnormal
    return tl.where(s == 255, float("nan"), value)


@triton.jit
def _weight_tile(w_ptr, s_ptr, z_ptr, g_ptr, rk, rn, mask, row_bytes, s_row, g_row,
                 FMT: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                 E: tl.constexpr, M: tl.constexpr, B: tl.constexpr, SUB: tl.constexpr):  # fmt: skip
    """[BN, BK] fp32 weight values W[rn, rk], decoded and scaled. Rows of W are contiguous in
    memory, so the tile is loaded row-major (coalesced along K) and transposed for the dot."""
    rn2, rk2 = rn[:, None], rk[None, :]
    if FMT >= 5:  # one code per byte
        code = tl.load(w_ptr + rn2 * row_bytes + rk2, mask=mask, other=0).to(tl.int32)
    elif FMT >= 3:  # 6-bit stream
        bit = rk2 * 6
        row = w_ptr + rn2 * row_bytes + bit // 8
        lo = tl.load(row, mask=mask, other=0).to(tl.int32)
        hi = tl.load(row + 1, mask=mask & (bit % 8 > 2), other=0).to(tl.int32)
        code = ((lo | (hi << 8)) >> (bit % 8)) & 0x3F
    else:  # two codes per byte, element 2i in the low nibble
        byte = tl.load(w_ptr + rn2 * row_bytes + rk2 // 2, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((rk2 & 1) * 4)) & 0xF
    scale_at = s_ptr + rn2 * s_row + rk2 // GROUP
    if FMT == 5:
        return code.to(tl.float32) * tl.load(scale_at, mask=mask, other=0.0)
    if FMT >= 6:
        return _minifloat(code, E, M, B, SUB) * tl.load(scale_at, mask=mask, other=0.0)
    if FMT == 0:
        scale = tl.load(scale_at, mask=mask, other=0.0)
        if HAS_ZERO:
            zero = tl.load(z_ptr + rn2 * s_row + rk2 // GROUP, mask=mask, other=0).to(tl.int32)
        else:
            zero = 8
        return (code - zero).to(tl.float32) * scale
    value = _minifloat(code, E, M, B, SUB)
    s = tl.load(scale_at, mask=mask, other=0).to(tl.int32)
    if FMT == 2:  # E4M3 block scale (never NaN: formats.py encodes finite values) x per-row
        row = tl.load(g_ptr + rn2 * g_row + 0 * rk2, mask=mask, other=0.0)
        scale = _minifloat(s, 4, 3, 7, 0.001953125) * row
    else:
        scale = _e8m0(s)
    return value * scale


@triton.jit
def _matmul_kernel(x_ptr, w_ptr, s_ptr, z_ptr, g_ptr, y_ptr, M, N, K, stride_xm, stride_ym,
                   row_bytes, s_row, g_row,
                   FMT: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                   E: tl.constexpr, MB: tl.constexpr, B: tl.constexpr, SUB: tl.constexpr,
                   BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, K_SPLIT: tl.constexpr,
                   ATOMIC: tl.constexpr, GEMV: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """y = x @ W^T over a (row tile, column tile, K split) grid. GEMV: multiply-and-sum in fp32
    for a few rows (no MMA padding); else `tl.dot` on the tensor cores, fp32 accumulation."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    k_start = pid_k * K_SPLIT
    for k0 in range(0, K_SPLIT, BK):
        rk = k_start + k0 + tl.arange(0, BK)
        x_mask = (rm[:, None] < M) & (rk[None, :] < K)
        x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=x_mask, other=0.0)
        w_mask = (rn[:, None] < N) & (rk[None, :] < K)
        w = _weight_tile(w_ptr, s_ptr, z_ptr, g_ptr, rk, rn, w_mask, row_bytes, s_row, g_row,
                         FMT, GROUP, HAS_ZERO, E, MB, B, SUB)  # fmt: skip
        if GEMV:
            acc += tl.sum(w[None, :, :] * x.to(tl.float32)[:, None, :], axis=2)
        elif IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    y_at = y_ptr + rm[:, None] * stride_ym + rn[None, :]
    y_mask = (rm[:, None] < M) & (rn[None, :] < N)
    if ATOMIC:
        tl.atomic_add(y_at, acc, mask=y_mask)
    else:
        tl.store(y_at, acc.to(y_ptr.dtype.element_ty), mask=y_mask)


@triton.jit
def _dequant_kernel(w_ptr, s_ptr, z_ptr, g_ptr, out_ptr, N, K, row_bytes, s_row, g_row,
                    FMT: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                    E: tl.constexpr, MB: tl.constexpr, B: tl.constexpr, SUB: tl.constexpr,
                    BN: tl.constexpr, BK: tl.constexpr):  # fmt: skip
    """out [N, K] = the decoded weight, in out's dtype."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    mask = (rn[:, None] < N) & (rk[None, :] < K)
    w = _weight_tile(w_ptr, s_ptr, z_ptr, g_ptr, rk, rn, mask, row_bytes, s_row, g_row,
                     FMT, GROUP, HAS_ZERO, E, MB, B, SUB)  # fmt: skip
    tl.store(out_ptr + rn[:, None] * K + rk[None, :], w.to(out_ptr.dtype.element_ty), mask=mask)
