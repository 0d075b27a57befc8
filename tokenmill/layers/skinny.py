"""Small-batch linear layers over oneDNN's packed weights (`csrc/skinny_linear.cpp`).

At 1-8 rows a linear layer is a stream over its weight, and oneDNN's GEMM reads that stream at
12-17 GB/s here, well under what the cores can pull. `linear` reads the same bytes that
`linear.pack_for_cpu` made for oneDNN, so decode gets a kernel at the memory limit and prefill
keeps oneDNN's GEMM without a second copy of any weight.

oneDNN's blocked layout is not a public contract: it depends on the library version, the CPU and
the shape. So a kernel is attached only after the packed bytes have been compared, exactly, with
the plain weight read in the layout the kernel reads (`match_block_cols`);
anything else keeps oneDNN for every batch size. Other precisions' methods own their kernels.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from tokenmill.layers import native

log = logging.getLogger(__name__)

MAX_ROWS = 8  # the kernel's register blocking; above it oneDNN's GEMM is as fast or faster
_BLOCK_COLS = (32, 64, 16)  # the column blocks oneDNN uses on AVX-512 (bf16: 32; fp32: 64)
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


_FUNCTIONS: dict[torch.dtype, ctypes._CFuncPtr] = {}  # filled by _library()


@functools.cache
def _library() -> ctypes.CDLL | None:
    try:
        lib = native.load("skinny_linear")
    except native.NativeUnavailable as e:
        log.info("no skinny linear kernels: %s", e)
        return None
    lib.tm_skinny_available.restype = ctypes.c_int
    for dtype, name in ((torch.float32, "tm_skinny_linear_f32"), (torch.bfloat16, "tm_skinny_linear_bf16")):  # fmt: skip
        fn = getattr(lib, name)
        fn.argtypes = [_I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, ctypes.c_int]
        fn.restype = ctypes.c_int
        _FUNCTIONS[dtype] = fn
    return lib


def packed_bytes(packed: torch.Tensor) -> torch.Tensor:
    """A uint8 view of an opaque oneDNN tensor's memory (no copy; valid while `packed` lives)."""
    nbytes = torch.ops.mkldnn._nbytes(packed)
    buffer = (ctypes.c_uint8 * nbytes).from_address(torch.ops.mkldnn.data_ptr(packed))
    return torch.frombuffer(buffer, dtype=torch.uint8, count=nbytes)


def match_block_cols(packed: torch.Tensor, weight: torch.Tensor) -> int:
    """The column block of `packed` if it is `weight` in the kernel's layout and the kernel for
    its dtype is here; 0 (oneDNN for every size) otherwise.

    The kernel's layout, [N / block_cols, K / pair, block_cols, pair] with pair = 2 for bf16
    (VNNI pairs along K) and 1 for fp32, is [N / block_cols, K / pair, block_cols] in 32-bit
    lanes (a bf16 pair is one lane): the comparison reads the plain weight through that
    transposed view, lane by lane, without a rearranged copy (about 0.1 s for a 135M bf16 model).
    """
    if not available(weight.dtype):
        return 0
    n, k = weight.shape
    pair = 2 if weight.dtype == torch.bfloat16 else 1
    raw = packed_bytes(packed)
    if raw.numel() != weight.numel() * weight.element_size() or k % pair:
        return 0  # padded (a shape that is not a multiple of the block): not this layout
    lanes = weight.contiguous().view(torch.int32)  # [N, K / pair]
    packed_lanes = raw.view(torch.int32)
    for cols in _BLOCK_COLS:
        if n % cols == 0 and torch.equal(
            packed_lanes.view(n // cols, -1, cols), lanes.view(n // cols, cols, -1).transpose(1, 2)
        ):
            return cols
    log.debug("oneDNN packed %s %s in another layout: GEMM only", weight.dtype, tuple(weight.shape))  # fmt: skip
    return 0


def available(dtype: torch.dtype) -> bool:
    """Whether this build and CPU have the kernel for `dtype` (fp32: AVX-512F; bf16: BF16)."""
    lib = _library()
    need = {torch.float32: 1, torch.bfloat16: 2}.get(dtype, 0)
    return lib is not None and bool(lib.tm_skinny_available() & need)


def linear(
    x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, block_cols: int
) -> torch.Tensor | None:
    """x [rows, K] @ W^T (+ bias) from `packed`, oneDNN's copy of W [N, K] that
    `match_block_cols` read as `block_cols`; None where the call is not the kernel's (more
    than MAX_ROWS rows, another dtype, a layout of x it does not read)."""
    rows, k = x.shape
    dtype = x.dtype
    if not 0 < rows <= MAX_ROWS or x.stride(1) != 1 or dtype != packed.dtype:
        return None
    if dtype == torch.bfloat16 and (x.stride(0) % 2 or x.data_ptr() % 4):
        return None  # the kernel reads x as 32-bit pairs
    if bias is not None and (bias.dtype != dtype or not bias.is_contiguous()):
        return None
    n = packed.shape[0]
    y = torch.empty(rows, n, dtype=dtype)
    fn = _FUNCTIONS[dtype]
    done = fn(
        rows,
        x.data_ptr(),
        x.stride(0),
        torch.ops.mkldnn.data_ptr(packed),
        bias.data_ptr() if bias is not None else None,
        y.data_ptr(),
        n,
        n,
        k,
        block_cols,
        torch.get_num_threads(),
    )
    return y if done else None
