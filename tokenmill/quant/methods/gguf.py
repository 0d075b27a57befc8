"""quantization='gguf': a GGUF file's weights served from its own codes, never re-quantized.

Every 2-D tensor of the file (the linear layers, the embedding, an untied head) stays in memory
as the file stores it: rows of GGML blocks (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q5_K, Q6_K) or
plain F32/F16/BF16 rows, so the model takes the file's size and a decode step reads the file's
bits per weight (4.5-5 for Q4_*), where the default path dequantizes everything to the model
dtype at load (16 bits per weight in bf16). Merged layers (q/k/v, gate/up) keep each shard's type
as segments of rows, since llama.cpp's mixes (Q4_K_M) give shards of one layer different types.

Kernels (layers/csrc/gguf.cpp, quant/methods/gguf.py's `GGUFKernels`): up to 8 rows (decode) a
fused pass that decodes each block in registers and multiplies it into every row; more rows
(prefill) the codes expanded into a dense matrix of the model dtype, then one GEMM. Both use the
weights of the dequantized path exactly (quant/gguf_quants.dequantize in fp32; bf16 models: then
rounded to bf16), so outputs equal the dequantized model's within the order of the sums. Without
the native kernels (no compiler, no AVX-512) the torch dequantization runs before every GEMM.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tokenmill.quant import elements as el
from tokenmill.quant.formats import QuantizedTensor, dequantize_fast
from tokenmill.quant.gguf_quants import GGML_TYPES, dequantize
from tokenmill.quant.methods.base import LinearKernel, QuantMethod, finish, rows

GEMV_ROWS = 8  # csrc/gguf.cpp kMaxRows
# Above GEMV_ROWS the weight is expanded a block of rows at a time into a reused buffer, each
# block multiplied while it is still in cache: a fresh dense tensor per call page-faulted its
# memory in every step (the tied head of the bundled model: 27 ms of a 111 ms batch-48 step)
GEMM_BLOCK_ROWS = 4096
# Not GGML types: tokenmill's own weight-only layouts (quant/formats.py), served by the same kernels
INT8_ROWS = 1000  # int8 rows, a fp32 scale per row
NVFP4_ROWS = 1001  # E2M1 codes [rows, cols / 2]; aux: E4M3 scale codes [rows, cols / 16]; row scale
MXFP4_ROWS = 1002  # E2M1 codes; aux: E8M0 scale codes [rows, cols / 32]
W8A8_ROWS = 1003  # int8 rows, a fp32 scale per row, x quantized per row (quant/methods/w8a8.py)
E4M3_ROWS, E5M2_ROWS = 1004, 1005  # fp8 codes (OCP E4M3 / E5M2), a fp32 scale per row
INT4_ROWS = 1006  # int4 nibbles [rows, cols / 2]; a fp32 scale [rows, groups]; aux: uint8 zeros
E4M3A8_ROWS = 1007  # fp8: E4M3 rows, a fp32 scale per row, x quantized to E4M3 per row (fp8.py)
ACTIVATION_QUANTIZED = {W8A8_ROWS, E4M3A8_ROWS}  # the aux column points at the smoothing factors
KINDS = {  # id -> (name, elements, bytes) per block (of the codes alone where scales are apart)
    **GGML_TYPES,
    INT8_ROWS: ("I8", 32, 32),
    NVFP4_ROWS: ("NVFP4", 32, 16),
    MXFP4_ROWS: ("MXFP4", 32, 16),
    W8A8_ROWS: ("I8A8", 32, 32),
    E4M3_ROWS: ("E4M3", 32, 32),
    E5M2_ROWS: ("E5M2", 32, 32),
    INT4_ROWS: ("I4", 32, 16),
    E4M3A8_ROWS: ("E4M3A8", 32, 32),
}
FP8_ROWS = {"fp8_e4m3": E4M3_ROWS, "fp8_e5m2": E5M2_ROWS}
AUX_BYTES = {NVFP4_ROWS: 2, MXFP4_ROWS: 1}  # block scale bytes per 32 elements, kept apart
# the kinds that need a fp32 scale per row (int4: per group of a row)
ROW_SCALED = {INT8_ROWS, NVFP4_ROWS, W8A8_ROWS, E4M3_ROWS, E5M2_ROWS, INT4_ROWS, E4M3A8_ROWS}
KERNEL_TYPES = frozenset({0, 1, 2, 3, 6, 7, 8, 12, 13, 14, 30, *KINDS.keys() - GGML_TYPES.keys()})
_I64, _PTR, _INT = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int


@dataclass
class GGUFWeight:
    """A [rows, cols] weight as GGUF stores it: segments of rows, each (GGML type id, raw bytes
    uint8 [rows, bytes per row]), stacked along the rows. Type INT8_ROWS (int8 weight-only) also
    holds its fp32 scale per row: `scales` (None for the GGML types, whose scales are in-block)."""

    segments: list[tuple[int, torch.Tensor]]
    cols: int
    scales: list[torch.Tensor | None] | None = None  # per segment: fp32 [rows] or None
    aux: list[torch.Tensor | None] | None = None  # per segment: block scale codes or None
    smooth: torch.Tensor | None = None  # w8a8 rows: fp32 [cols] factors x is multiplied by
    table: torch.Tensor = field(init=False, repr=False)  # int64 [segments, 7] for the kernels

    def __post_init__(self) -> None:
        if self.scales is None:
            self.scales = [None] * len(self.segments)
        if self.aux is None:
            self.aux = [None] * len(self.segments)
        for (kind, raw), scale, aux in zip(self.segments, self.scales, self.aux):
            if kind == INT4_ROWS:
                _check_int4(raw, scale, aux)
                continue
            want = AUX_BYTES.get(kind, 0) * (self.cols // 32)
            if (aux is not None) != (want > 0):
                raise ValueError("block scale codes go with nvfp4/mxfp4 rows, and only with them")
            if aux is not None and (aux.dtype != torch.uint8 or aux.shape != (raw.shape[0], want)):
                raise ValueError(f"block scale codes must be uint8 [{raw.shape[0]}, {want}]")
        for (kind, raw), scale in zip(self.segments, self.scales):
            name, block, block_bytes = KINDS.get(kind, (f"type {kind}", 0, 0))
            if not block:
                raise ValueError(f"GGUF tensor type {name} is not supported")
            row_bytes = self.cols // block * block_bytes
            if self.cols % block or raw.dim() != 2 or raw.shape[1] != row_bytes:
                raise ValueError(f"{name} rows of {self.cols} elements do not match their bytes")
            if (scale is not None) != (kind in ROW_SCALED):
                raise ValueError(
                    "a scale per row goes with int8, int4, nvfp4, fp8 and w8a8 rows, and only with them"
                )
            one = scale is not None and scale.dim() == 0  # one scale for every row (nvfp4)
            if (
                kind != INT4_ROWS
                and scale is not None
                and (scale.dtype != torch.float32 or not (one or scale.shape == raw.shape[:1]))
            ):
                raise ValueError("row-scaled rows need a fp32 scale per row (nvfp4: or one)")
        if self.smooth is not None and (
            self.smooth.dtype != torch.float32
            or self.smooth.shape != (self.cols,)
            or not self.smooth.is_contiguous()
            or any(k not in ACTIVATION_QUANTIZED for k, _ in self.segments)
        ):
            raise ValueError("smoothing factors are fp32 [cols], for w8a8 and fp8 rows only")
        ptr = lambda t: 0 if t is None else t.data_ptr()  # noqa: E731
        self.table = torch.tensor(
            [  # w8a8 and fp8 rows: the aux column points at the smoothing factors
                [
                    k,
                    r.shape[0],
                    r.data_ptr(),
                    r.shape[1],
                    ptr(sc),
                    ptr(self.smooth if k in ACTIVATION_QUANTIZED else a),
                    _stride(sc),
                ]
                for (k, r), sc, a in zip(self.segments, self.scales, self.aux)
            ],
            dtype=torch.int64,
        )

    @property
    def rows(self) -> int:
        return sum(r.shape[0] for _, r in self.segments)

    def row_blocks(self, block: int) -> list[tuple[int, GGUFWeight]]:
        """(first row, the weight's rows first .. first + block) for each block of rows: views
        of the same tensors (cached per block size)."""
        cached = self.__dict__.setdefault("_row_blocks", {})
        if block not in cached:
            cached[block] = [(r0, self._rows(r0, min(r0 + block, self.rows)))
                             for r0 in range(0, self.rows, block)]  # fmt: skip
        return cached[block]

    def _rows(self, start: int, end: int) -> GGUFWeight:
        if (start, end) == (0, self.rows):
            return self
        segments, scales, aux = [], [], []
        first = 0
        for (kind, raw), scale, a in zip(self.segments, self.scales or [], self.aux or []):
            lo, hi = max(start - first, 0), min(end - first, raw.shape[0])
            first += raw.shape[0]
            if lo >= hi:
                continue
            segments.append((kind, raw[lo:hi]))
            per_row = scale is not None and scale.dim() > 0
            scales.append(scale[lo:hi] if per_row else scale)  # type: ignore[index]
            aux.append(None if a is None else a[lo:hi])
        return GGUFWeight(segments, self.cols, scales, aux, self.smooth)

    def take_rows(self, index: torch.Tensor) -> GGUFWeight:
        """Rows `index` (ascending) of the stacked segments, still as codes: a column-parallel
        rank's share (layers/parallel.py)."""
        segments, scales, aux = [], [], []
        first = 0
        for (kind, raw), scale, a in zip(self.segments, self.scales or [], self.aux or []):
            n = raw.shape[0]
            mine = index[(index >= first) & (index < first + n)] - first
            first += n
            if not mine.numel():
                continue
            segments.append((kind, raw.index_select(0, mine)))
            per_row = scale is not None and scale.dim() > 0
            scales.append(scale.index_select(0, mine) if per_row else scale)  # type: ignore[union-attr]
            aux.append(None if a is None else a.index_select(0, mine))
        return GGUFWeight(segments, self.cols, scales, aux, self.smooth)

    def take_cols(self, start: int, length: int) -> GGUFWeight:
        """Columns [start, start + length) as codes (a row-parallel rank's input share): whole
        blocks of every segment's type, else a ValueError naming the block size."""
        segments, aux = [], []
        for (kind, raw), a in zip(self.segments, self.aux or []):
            name, block, block_bytes = KINDS[kind]
            if kind == INT4_ROWS or start % block or length % block:
                raise ValueError(
                    f"{name} blocks of {block} do not divide a shard of {length} of {self.cols} "
                    "input columns; choose a tensor_parallel_size whose shards hold whole blocks"
                )
            lo, n = start // block * block_bytes, length // block * block_bytes
            segments.append((kind, raw[:, lo : lo + n].contiguous()))
            per = AUX_BYTES.get(kind, 0)
            aux.append(None if a is None else a[:, start // 32 * per : (start + length) // 32 * per].contiguous())  # fmt: skip
        smooth = None if self.smooth is None else self.smooth[start : start + length].contiguous()
        return GGUFWeight(segments, length, self.scales, aux, smooth)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.rows, self.cols)

    @property
    def types(self) -> list[str]:
        return [KINDS[k][0] for k, _ in self.segments]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def tensors(self) -> list[torch.Tensor]:
        extra = [*(self.scales or []), *(self.aux or []), self.smooth]
        return [r for _, r in self.segments] + [t for t in extra if t is not None]

    @classmethod
    def int8_rows(cls, codes: torch.Tensor, scale: torch.Tensor) -> GGUFWeight:
        """tokenmill's int8 weight-only weight (int8 [rows, cols], a fp32 scale per row) as one
        segment; the codes are shared, not copied."""
        codes = codes.contiguous()
        return cls(
            [(INT8_ROWS, codes.view(torch.uint8))], codes.shape[1], [scale.float().contiguous()]
        )

    @classmethod
    def fp8_rows(cls, q) -> GGUFWeight | None:
        """tokenmill's fp8 weight-only weight (E4M3 / E5M2 codes, a fp32 scale per row) as one
        segment over the same codes; None for other scalings."""
        kind = FP8_ROWS.get(q.format)
        if kind is None or len(q.shape) != 2 or q.group_size is not None:
            return None
        scale = q.scale.float()
        if scale.numel() not in (1, q.shape[0]):
            return None
        codes = q.data.contiguous().view(torch.uint8)
        return cls([(kind, codes)], q.shape[1], [scale.reshape(-1).expand(q.shape[0]).contiguous()])

    @classmethod
    def w8a8_rows(
        cls, codes: torch.Tensor, scale: torch.Tensor, smooth: torch.Tensor | None
    ) -> GGUFWeight:
        """w8a8's weight (int8 [rows, cols], a fp32 scale per row; `smooth` the fp32 factors x
        is multiplied by before its quantization, or None) as one segment; the codes and
        factors are shared, not copied. The GEMV quantizes x per row as Int8MMKernel does."""
        codes = codes.contiguous()
        scale = scale.float().contiguous()
        return cls([(W8A8_ROWS, codes.view(torch.uint8))], codes.shape[1], [scale], smooth=smooth)

    @classmethod
    def fp8a8_rows(
        cls, codes: torch.Tensor, scale: torch.Tensor, smooth: torch.Tensor | None
    ) -> GGUFWeight:
        """fp8's weight (E4M3 codes [rows, cols], a fp32 scale per row; `smooth` the fp32
        factors x is multiplied by, or None) as one segment over the same codes; the GEMV
        quantizes x per row to E4M3 as quant/methods/fp8.Fp8Kernel does (current scaling)."""
        raw = codes.contiguous().view(torch.uint8)
        return cls([(E4M3A8_ROWS, raw)], raw.shape[1], [scale.float().contiguous()], smooth=smooth)

    @classmethod
    def fp4_rows(cls, q) -> GGUFWeight | None:
        """tokenmill's nvfp4 / mxfp4 weight (quant/formats.py: packed E2M1 codes, block scale
        codes, nvfp4's fp32 scale per tensor or row) as one segment over the same tensors; None
        where the layout does not fit (other block sizes, rows not a multiple of 32)."""
        kind = {"nvfp4": NVFP4_ROWS, "mxfp4": MXFP4_ROWS}.get(q.format)
        if kind is None or len(q.shape) != 2 or q.shape[1] % 32:
            return None
        rows, cols = q.shape
        if q.group_size != (16 if kind == NVFP4_ROWS else 32) or q.data.shape != (rows, cols // 2):
            return None
        scale = None
        if kind == NVFP4_ROWS:  # per tensor (0-d) or per shard's rows: used as it is, no copy
            assert q.global_scale is not None and q.global_scale.dtype == torch.float32
            scale = q.global_scale.contiguous()
        codes = q.data.contiguous()
        aux = q.scale.view(torch.uint8).contiguous()
        return cls([(kind, codes)], cols, [scale], [aux])

    @classmethod
    def int4_rows(cls, q) -> GGUFWeight | None:
        """tokenmill's int4 weight (quant/formats.py: packed nibbles, a fp32 scale and a uint8
        zero point per group of 32, 64 or 128, or symmetric: zero 8) as one segment over the
        same tensors; None where the layout does not fit."""
        if q.format != "int4" or len(q.shape) != 2 or q.group_size not in (32, 64, 128):
            return None
        rows, cols = q.shape
        if cols % q.group_size or q.data.shape != (rows, cols // 2):
            return None
        scale = q.scale.float().contiguous()
        zero = None if q.zero_point is None else q.zero_point.contiguous()
        return cls([(INT4_ROWS, q.data.contiguous())], cols, [scale], [zero])

    @classmethod
    def stack(cls, parts: list[GGUFWeight]) -> GGUFWeight:
        """The shards of a merged layer stacked along the rows; runs of one type become one
        segment (one kernel pass)."""
        cols = parts[0].cols
        if any(p.cols != cols for p in parts):
            raise ValueError("the shards of a merged layer must share their row length")
        if any(t is not None for p in parts for t in [*(p.scales or []), *(p.aux or [])]):
            raise ValueError("stack joins GGUF tensors; tokenmill's own rows come merged already")
        merged: list[tuple[int, list[torch.Tensor]]] = []
        for kind, raw in (s for p in parts for s in p.segments):
            if merged and merged[-1][0] == kind:
                merged[-1][1].append(raw)
            else:
                merged.append((kind, [raw]))
        segments = [(k, rs[0] if len(rs) == 1 else torch.cat(rs)) for k, rs in merged]
        return cls(segments, cols)

    def _int4_tensor(self, codes, scale, zero) -> QuantizedTensor:
        group = self.cols // scale.shape[1]
        return QuantizedTensor("int4", (codes.shape[0], self.cols), codes, scale, zero, None, group)

    def _fp4_tensor(self, kind: int, codes, scale, aux) -> QuantizedTensor:
        """An nvfp4/mxfp4 segment as the QuantizedTensor its tensors came from."""
        shape = (codes.shape[0], self.cols)
        if kind == NVFP4_ROWS:
            block = aux.view(torch.float8_e4m3fn)
            return QuantizedTensor("nvfp4", shape, codes, block, None, scale, 16)
        return QuantizedTensor("mxfp4", shape, codes, aux, None, None, 32)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """The dense [rows, cols] weight through torch (quant/gguf_quants.py, fp32; tokenmill's
        own formats: quant/formats.py) in `dtype`."""
        parts = []
        for (kind, raw), scale, aux in zip(self.segments, self.scales or [], self.aux or []):
            if kind == INT4_ROWS:
                parts.append(dequantize_fast(self._int4_tensor(raw, scale, aux), torch.float32))
                continue
            if kind in AUX_BYTES:  # tokenmill's own E2M1 layouts: formats.py's dequantization
                assert aux is not None
                parts.append(
                    dequantize_fast(self._fp4_tensor(kind, raw, scale, aux), torch.float32)
                )
                continue
            if kind in (INT8_ROWS, W8A8_ROWS):  # w8a8: the weight alone (x is quantized too)
                assert scale is not None
                parts.append(raw.view(torch.int8).float() * scale[:, None])
            elif kind in (E4M3_ROWS, E5M2_ROWS, E4M3A8_ROWS):  # values x scale (fp8: the weight)
                assert scale is not None
                fmt = el.E5M2 if kind == E5M2_ROWS else el.E4M3
                parts.append(el.decode(raw, fmt, torch.float32) * scale[:, None])
            else:
                parts.append(dequantize(raw, kind, (raw.shape[0], self.cols)))
        return (parts[0] if len(parts) == 1 else torch.cat(parts)).to(dtype)


def _stride(scale: torch.Tensor | None) -> int:
    """The row scale's stride for the kernels: 0 where one scale serves every row, a row's
    groups where each group has its own (int4)."""
    if scale is not None and scale.dim() == 2:
        return scale.shape[1]
    return 0 if scale is not None and scale.dim() == 0 else 1


def _check_int4(raw: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None) -> None:
    rows, cols = raw.shape[0], 2 * raw.shape[1]
    if scale is None or scale.dtype != torch.float32 or scale.dim() != 2 or scale.shape[0] != rows:
        raise ValueError("int4 rows need a fp32 scale per group: [rows, groups]")
    if not scale.is_contiguous() or cols % (32 * scale.shape[1]):
        raise ValueError("int4 groups must be contiguous runs of whole blocks of 32 elements")
    if zero is not None and (zero.dtype != torch.uint8 or zero.shape != scale.shape):
        raise ValueError("int4 zero points must be uint8 [rows, groups], or None (symmetric)")


class GGUFKernels:
    """csrc/gguf.cpp through ctypes; one per process (`shared_kernels`)."""

    def __init__(self) -> None:
        from tokenmill.layers import native

        self.lib = lib = native.load("gguf")
        self._gemv = lib.tm_gguf_gemv
        self._gemv.argtypes = [_PTR, _I64, _INT, _PTR, _I64, _I64, _PTR, _INT]
        self._gemv.restype = _INT
        self._dequant = lib.tm_gguf_dequant
        self._dequant.argtypes = [_PTR, _I64, _I64, _PTR, _INT, _INT]
        self._dequant.restype = _INT
        self._buffers = threading.local()  # linear's expansion buffers, one set per thread
        probe = GGUFWeight([(0, torch.zeros(1, 128, dtype=torch.uint8))], 32)
        y, dense = torch.empty(1, 1), torch.empty(1, 32)
        if self._dequant(probe.table.data_ptr(), 1, 32, dense.data_ptr(), 0, 1):
            raise native.NativeUnavailable("gguf.cpp needs AVX-512 (F, BW, VL)")
        x = torch.zeros(1, 32, dtype=torch.bfloat16)
        self.bf16_gemv = not self._gemv(
            x.data_ptr(), 1, 1, probe.table.data_ptr(), 1, 32, y.data_ptr(), 1
        )

    @staticmethod
    def supports(w: GGUFWeight, dtype: torch.dtype) -> bool:
        return (
            dtype in (torch.float32, torch.bfloat16)
            and w.cols % 32 == 0
            and all(k in KERNEL_TYPES for k, _ in w.segments)
        )

    def dense(
        self, w: GGUFWeight, dtype: torch.dtype, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The weight as a dense [rows, cols] fp32 or bf16 matrix (the dequantized path's);
        written into the front of `out` (a flat buffer of that dtype) where given."""
        if out is None:
            out = torch.empty(w.rows, w.cols, dtype=dtype)
        else:
            assert out.dtype == dtype and out.numel() >= w.rows * w.cols and out.is_contiguous()
            out = out[: w.rows * w.cols].view(w.rows, w.cols)
        rc = self._dequant(
            w.table.data_ptr(), len(w.segments), w.cols, out.data_ptr(),
            int(dtype == torch.bfloat16), torch.get_num_threads(),
        )  # fmt: skip
        assert rc == 0, "gguf dequant refused a weight supports() accepted"
        return out

    def linear(self, x2: torch.Tensor, w: GGUFWeight) -> torch.Tensor:
        """x2 [n, cols] @ W^T in x2's dtype, at any n: W expanded to that dtype a block of
        GEMM_BLOCK_ROWS rows at a time into this thread's reused buffer, each block one GEMM
        (the values of `dense`, so the same result)."""
        dtype = x2.dtype
        blocks = w.row_blocks(GEMM_BLOCK_ROWS)
        rows = min(w.rows, GEMM_BLOCK_ROWS)
        buffers = self._buffers.__dict__.setdefault("by_dtype", {})
        buf = buffers.get(dtype)
        if buf is None or buf.numel() < rows * w.cols:
            buf = buffers[dtype] = torch.empty(rows * w.cols, dtype=dtype)
        if len(blocks) == 1:
            return F.linear(x2, self.dense(w, dtype, out=buf))
        y = torch.empty(x2.shape[0], w.rows, dtype=dtype)
        for r0, part in blocks:
            y[:, r0 : r0 + part.rows] = F.linear(x2, self.dense(part, dtype, out=buf))
        return y

    def matmul(self, x2: torch.Tensor, w: GGUFWeight) -> torch.Tensor:
        """x2 [n, cols] (fp32 or bf16) @ W^T -> [n, rows] (fp32 for n <= 8, else x2's dtype)."""
        n = x2.shape[0]
        if not 0 < n <= GEMV_ROWS:
            return self.linear(x2, w)
        bf16 = x2.dtype == torch.bfloat16 and self.bf16_gemv
        xc = x2.contiguous() if bf16 else x2.float().contiguous()
        y = torch.empty(n, w.rows, dtype=torch.float32)
        rc = self._gemv(
            xc.data_ptr(), n, int(bf16), w.table.data_ptr(), len(w.segments), w.cols,
            y.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        assert rc == 0, "gguf gemv refused a weight supports() accepted"
        return y


_SHARED: list[GGUFKernels] = []


def shared_kernels() -> GGUFKernels:
    """One per process, built on first use (native.NativeUnavailable where it cannot be)."""
    if not _SHARED:
        _SHARED.append(GGUFKernels())
    return _SHARED[0]


def kernels_for(w: GGUFWeight, dtype: torch.dtype) -> GGUFKernels | None:
    """The shared kernels where they take `w` in `dtype` and build here; else None (the
    caller keeps its torch path)."""
    from tokenmill.layers.native import NativeUnavailable

    if not GGUFKernels.supports(w, dtype):
        return None
    try:
        return shared_kernels()
    except NativeUnavailable:
        return None


class TorchGGUFKernel(LinearKernel):
    def __init__(self, w: GGUFWeight) -> None:
        self.w = w
        self.name = f"dequantize gguf {'/'.join(w.types)} in torch + GEMM (no native kernel)"

    def __call__(self, x2):
        return F.linear(x2, self.w.dequantize(x2.dtype))

    def tensors(self):
        return self.w.tensors()


class NativeGGUFKernel(LinearKernel):
    def __init__(self, kernels: GGUFKernels, w: GGUFWeight) -> None:
        self.kernels, self.w = kernels, w
        types = "/".join(w.types)
        self.name = f"native gguf {types}: fused decode-GEMV up to 8 rows, else decode + GEMM"

    def __call__(self, x2):
        return self.kernels.matmul(x2, self.w)

    def tensors(self):
        return self.w.tensors()


class GGUFMethod(QuantMethod):
    """A linear layer over a GGUF tensor's own codes (installed by models/gguf.GGUFCodes)."""

    format = "gguf"
    compilable = False  # the native call is opaque to torch.compile
    weight: GGUFWeight | None = None

    def create_weights(self, layer) -> None:
        # a placeholder that takes no memory, so the loader still checks each weight was found
        layer.weight = nn.Parameter(
            torch.empty(layer.out_features, layer.in_features, device="meta"), requires_grad=False
        )

    def quantize_weight(self, weight):
        raise ValueError(
            "quantization 'gguf' serves a GGUF file's own codes and quantizes nothing; give a "
            ".gguf model, or another quantization for a 16/32-bit checkpoint"
        )

    def install(self, layer, qweight) -> None:
        w: GGUFWeight = qweight
        if w.shape != (layer.out_features, layer.in_features):
            raise ValueError(
                f"GGUF weight of shape {w.shape} does not fit a layer of "
                f"{(layer.out_features, layer.in_features)}"
            )
        self.weight = w
        self.impl = TorchGGUFKernel(w)
        if hasattr(layer, "weight"):
            del layer.weight

    def process_weights_after_loading(self, layer) -> None:
        if self.weight is None:
            raise ValueError("a layer of a gguf-quantized model got no weight from the file")

    def attach_native(self, layer) -> bool:
        """The native kernels (csrc/gguf.cpp) where they apply; called by
        layers/native_ops.select_kernels when the runner's cpu_kernels allows."""
        kernels = None if self.weight is None else kernels_for(self.weight, layer.params_dtype)
        if kernels is None:
            return False
        self.impl = NativeGGUFKernel(kernels, self.weight)  # type: ignore[arg-type]
        return True

    def tensors(self) -> list[torch.Tensor]:
        return self.weight.tensors() if self.weight is not None else []

    def apply(self, layer, x):
        assert self.impl is not None, "apply before install"
        return finish(self.impl(rows(x)), x, layer.bias)


class GGUFEmbedding(nn.Module):
    """The token embedding read from a GGUF table's codes: each looked-up row dequantized (a
    tied model's head reads the same bytes, held once)."""

    def __init__(self, table: GGUFWeight, dtype: torch.dtype) -> None:
        super().__init__()
        if len(table.segments) != 1:
            raise ValueError("a GGUF embedding table is one tensor")
        self.kind, self.codes = table.segments[0]
        self.num_embeddings, self.embedding_dim = table.shape
        self.dtype = dtype
        self.kernels: GGUFKernels | None = None  # native row decoding, set by attach_native

    def attach_native(self) -> bool:
        """Decode looked-up rows with csrc/gguf.cpp (layers/native_ops.select_kernels)."""
        from tokenmill.layers.native import NativeUnavailable

        table = GGUFWeight([(self.kind, self.codes[:1])], self.embedding_dim)
        if not GGUFKernels.supports(table, self.dtype):
            return False
        try:
            self.kernels = shared_kernels()
        except NativeUnavailable:
            return False
        return True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # [...] -> [..., hidden]
        raw = self.codes.index_select(0, ids.reshape(-1))
        picked = GGUFWeight([(self.kind, raw)], self.embedding_dim)
        if self.kernels is not None:
            x = self.kernels.dense(picked, self.dtype)
        else:
            x = picked.dequantize(self.dtype)
        return x.view(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, gguf {KINDS[self.kind][0]}"
