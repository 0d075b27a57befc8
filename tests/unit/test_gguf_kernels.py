"""quantization='gguf' kernels (layers/csrc/gguf.cpp) against the torch dequantization
(quant/gguf_quants.py, itself checked against the `gguf` package): the dense matrix bit for bit,
the decode GEMV within fp32 summation order, for every GGML type the kernel reads."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers import native
from tokenmill.quant.formats import dequantize_fast, quantize
from tokenmill.quant.gguf_quants import GGML_TYPES
from tokenmill.quant.methods.gguf import (
    ACTIVATION_QUANTIZED,
    E4M3_ROWS,
    E5M2_ROWS,
    INT4_ROWS,
    INT8_ROWS,
    KERNEL_TYPES,
    KINDS,
    MXFP4_ROWS,
    NVFP4_ROWS,
    GGUFWeight,
    shared_kernels,
)

# byte offsets of each block's f16 scale fields (d, m / dmin), which random bytes would make NaN
F16_FIELDS = {2: (0,), 3: (0, 2), 6: (0,), 7: (0, 2), 8: (0,), 12: (0, 2), 13: (0, 2), 14: (208,)}


def random_codes(kind: int, rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    """Raw GGML bytes [rows, row bytes] of a valid random tensor of type `kind`."""
    _, block, block_bytes = GGML_TYPES[kind]
    if block == 1:  # plain rows
        dtype = {0: torch.float32, 1: torch.float16, 30: torch.bfloat16}[kind]
        values = torch.randn(rows, cols, generator=gen).to(dtype)
        return values.view(torch.uint8).reshape(rows, -1)
    blocks = torch.randint(0, 256, (rows * cols // block, block_bytes), generator=gen)
    blocks = blocks.to(torch.uint8)
    for offset in F16_FIELDS[kind]:
        scale = (torch.rand(blocks.shape[0], generator=gen) * 0.02 + 1e-3).to(torch.float16)
        blocks[:, offset : offset + 2] = scale.view(torch.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def make_weight(kind: int, rows: int, cols: int, gen: torch.Generator):
    """A valid random weight of type `kind` and its exact fp32 values: GGML types from random
    blocks (their values from quant/gguf_quants.py), tokenmill's int8 / int4 / nvfp4 / mxfp4 /
    fp8 from quant/formats.py (their values from dequantize_fast)."""
    if kind == INT8_ROWS:
        codes = torch.randint(-127, 128, (rows, cols), generator=gen).to(torch.int8)
        w = GGUFWeight.int8_rows(codes, torch.rand(rows, generator=gen) * 0.01 + 1e-3)
        return w, w.dequantize(torch.float32)
    if kind in (E4M3_ROWS, E5M2_ROWS):  # values spanning the subnormal codes too
        values = torch.randn(rows, cols, generator=gen) * torch.logspace(-4, 0, cols)
        q = quantize(values, "fp8_e4m3" if kind == E4M3_ROWS else "fp8_e5m2")
        w = GGUFWeight.fp8_rows(q)
        assert torch.equal(w.dequantize(torch.float32), dequantize_fast(q, torch.float32))
        return w, dequantize_fast(q, torch.float32)
    if kind == INT4_ROWS:  # asymmetric, groups of 32 (the sizes below: 96, 160, 512 columns)
        q = quantize(torch.randn(rows, cols, generator=gen), "int4", group_size=32)
        w = GGUFWeight.int4_rows(q)
        assert torch.equal(w.dequantize(torch.float32), dequantize_fast(q, torch.float32))
        return w, dequantize_fast(q, torch.float32)
    if kind in (NVFP4_ROWS, MXFP4_ROWS):
        q = quantize(
            torch.randn(rows, cols, generator=gen), "nvfp4" if kind == NVFP4_ROWS else "mxfp4"
        )
        w = GGUFWeight.fp4_rows(q)
        assert torch.equal(w.dequantize(torch.float32), dequantize_fast(q, torch.float32))
        return w, dequantize_fast(q, torch.float32)
    w = GGUFWeight([(kind, random_codes(kind, rows, cols, gen))], cols)
    return w, w.dequantize(torch.float32)


@pytest.fixture(scope="module")
def kernels():
    """Skipped only where the kernels cannot exist (no compiler, no AVX-512); a build error
    fails."""
    if native.compiler() is None or "avx512bw" not in native._cpu_flags():
        pytest.skip("no C++ compiler or no AVX-512 here: the torch path serves gguf")
    return shared_kernels()


TYPES = sorted(KERNEL_TYPES - ACTIVATION_QUANTIZED)  # these quantize x too: own tests


@pytest.mark.parametrize("kind", TYPES, ids=[KINDS[k][0] for k in TYPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dense_equals_torch_dequantization(kernels, kind, dtype):
    gen = torch.Generator().manual_seed(kind)
    cols = 512 if KINDS[kind][1] == 256 else 96
    w, exact = make_weight(kind, 37, cols, gen)
    reference = exact.to(dtype)
    assert torch.equal(kernels.dense(w, dtype), reference)


@pytest.mark.parametrize("kind", TYPES, ids=[KINDS[k][0] for k in TYPES])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 2, 3, 5, 8])
def test_gemv_matches_reference(kernels, kind, dtype, m):
    gen = torch.Generator().manual_seed(100 + kind)
    cols = 512 if KINDS[kind][1] == 256 else 160
    rows = 67  # not a multiple of any row tile
    w, exact = make_weight(kind, rows, cols, gen)
    x = torch.randn(m, cols, generator=gen).to(dtype)
    # the file's weights exactly (bf16 x: the scale factored out of the bf16 dot products, or x
    # in fp32), products and sums in float64
    reference = x.double() @ exact.double().T
    y = kernels.matmul(x, w)
    assert y.dtype == torch.float32 and y.shape == (m, rows)
    scale = (x.double().abs() @ exact.double().abs().T).max()
    assert (y.double() - reference).abs().max() <= 1e-5 * scale


def test_mixed_segments_and_threads(kernels):
    """A merged layer whose shards have different types (llama.cpp's Q4_K_M mixes), in one
    call, equals each shard alone; large enough to run on every thread."""
    gen = torch.Generator().manual_seed(7)
    cols = 1024
    parts = [
        GGUFWeight([(k, random_codes(k, r, cols, gen))], cols)
        for k, r in ((12, 300), (14, 200), (12, 100))
    ]
    merged = GGUFWeight.stack(parts)
    assert [k for k, _ in merged.segments] == [12, 14, 12]
    x = torch.randn(3, cols, generator=gen)
    alone = torch.cat([kernels.matmul(x, p) for p in parts], dim=1)
    torch.testing.assert_close(kernels.matmul(x, merged), alone, rtol=0, atol=0)
    assert torch.equal(kernels.dense(merged, torch.float32), merged.dequantize(torch.float32))


def test_stack_joins_runs_of_one_type():
    gen = torch.Generator().manual_seed(3)
    parts = [GGUFWeight([(3, random_codes(3, r, 64, gen))], 64) for r in (4, 2, 2)]
    merged = GGUFWeight.stack(parts)
    assert len(merged.segments) == 1 and merged.shape == (8, 64)
    expected = torch.cat([p.dequantize(torch.float32) for p in parts])
    assert torch.equal(merged.dequantize(torch.float32), expected)


def test_rows_that_do_not_match_their_bytes_are_refused():
    with pytest.raises(ValueError, match="do not match their bytes"):
        GGUFWeight([(3, torch.zeros(4, 21, dtype=torch.uint8))], 32)
    with pytest.raises(
        ValueError, match="scale per row goes with int8, int4, nvfp4, fp8 and w8a8 rows"
    ):
        GGUFWeight([(INT8_ROWS, torch.zeros(4, 32, dtype=torch.uint8))], 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothed", [False, True])
def test_w8a8_gemv_is_int_mm_bit_for_bit(kernels, dtype, smoothed):
    """w8a8 rows: x quantized per row inside the GEMV (times the smoothing factors), exact
    int32 sums, the same fp32 rescales: the same bits as Int8MMKernel (torch._int_mm), at 1-8
    rows, shapes with partial row tiles; bf16 rows hit rounding ties (x = amax * j / 254)."""
    from tokenmill.quant.methods.w8a8 import Int8MMKernel, NativeW8A8Kernel
    from tokenmill.quant.smoothquant import smooth_input

    gen = torch.Generator().manual_seed(11)
    for rows, cols in ((67, 160), (40, 32), (300, 576)):
        q = quantize(torch.randn(rows, cols, generator=gen), "int8", granularity="channel")
        ref = Int8MMKernel(q, activation_zero_point=False)
        smooth = torch.rand(cols, generator=gen) + 0.5 if smoothed else None
        w = GGUFWeight.w8a8_rows(ref.weight_t.t(), ref.weight_scale, smooth)
        native_kernel = NativeW8A8Kernel(kernels, w, ref)
        assert w.segments[0][1].data_ptr() == ref.weight_t.data_ptr()  # one copy of the codes
        for m in range(1, 9):
            for _ in range(4):
                x = (torch.randn(m, cols, generator=gen) * 3).to(dtype)
                want = ref(smooth_input(smooth, x))
                assert torch.equal(native_kernel.gemv(x), want)


@pytest.mark.parametrize("fmt", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_rows_decode_every_finite_code(kernels, fmt):
    """Every finite E4M3 / E5M2 code (both signs, subnormals, zero) decoded by the kernels as
    formats.py decodes it: the dense matrix bit for bit, the GEMV against float64."""
    from tokenmill.quant import elements as el
    from tokenmill.quant.formats import QuantizedTensor

    spec = el.E4M3 if fmt == "fp8_e4m3" else el.E5M2
    table = el.decode_table(spec)
    codes = torch.tensor([c for c in range(256) if torch.isfinite(table[c])], dtype=torch.uint8)
    cols = codes.numel() // 32 * 32
    rows = torch.stack([codes[:cols].roll(i) for i in range(8)])  # [8, cols]
    scale = torch.rand(8) + 0.5
    q = QuantizedTensor(
        fmt,
        (8, cols),
        rows.view(torch.float8_e4m3fn if fmt == "fp8_e4m3" else torch.float8_e5m2),
        scale,
        None,
    )
    w = GGUFWeight.fp8_rows(q)
    exact = dequantize_fast(q, torch.float32)
    assert torch.equal(kernels.dense(w, torch.float32), exact)
    x = torch.randn(3, cols, generator=torch.Generator().manual_seed(5))
    reference = x.double() @ exact.double().T
    scale_of = (x.double().abs() @ exact.double().abs().T).max()
    assert (kernels.matmul(x, w).double() - reference).abs().max() <= 1e-5 * scale_of


@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_groups(kernels, group, symmetric, dtype):
    """int4 at every group size, with zero points or symmetric: the dense matrix is
    dequantize_fast's bit for bit, the GEMV at 1-8 rows multiplies those fp32 weights (within
    fp32 summation order), rows not a multiple of any tile."""
    gen = torch.Generator().manual_seed(group + symmetric)
    rows, cols = 45, 384
    values = torch.randn(rows, cols, generator=gen) * torch.logspace(-2, 0, cols)
    q = quantize(values, "int4", group_size=group, symmetric=symmetric)
    assert (q.zero_point is None) == symmetric
    w = GGUFWeight.int4_rows(q)
    assert w is not None and w.table[0, 6] == cols // group
    assert w.table[0, 5] == (0 if symmetric else q.zero_point.data_ptr())  # the codes, not copies
    assert w.segments[0][1].data_ptr() == q.data.data_ptr()
    assert torch.equal(kernels.dense(w, dtype), dequantize_fast(q, dtype))
    exact = dequantize_fast(q, torch.float64)
    for m in range(1, 9):
        x = torch.randn(m, cols, generator=gen).to(dtype)
        reference = x.double() @ exact.T
        scale = (x.double().abs() @ exact.abs().T).max()
        assert (kernels.matmul(x, w).double() - reference).abs().max() <= 1e-5 * scale


def test_int4_rows_refuse_what_they_cannot_read():
    q = quantize(torch.randn(8, 64), "int4", group_size=32)
    assert GGUFWeight.int4_rows(quantize(torch.randn(8, 64), "int8")) is None
    with pytest.raises(ValueError, match="fp32 scale per group"):
        GGUFWeight([(INT4_ROWS, q.data)], 64, [q.scale[:, 0].contiguous()], [q.zero_point])
    with pytest.raises(ValueError, match="uint8"):
        GGUFWeight([(INT4_ROWS, q.data)], 64, [q.scale], [q.zero_point.float()])
    with pytest.raises(ValueError, match="whole blocks of 32"):
        GGUFWeight([(INT4_ROWS, q.data)], 64, [torch.ones(8, 4)], [None])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("smoothed", [False, True])
def test_fp8_activations_are_quantized_as_fp8kernel(kernels, dtype, smoothed):
    """fp8 rows (E4M3A8): x quantized per row inside the GEMV exactly as Fp8Kernel quantizes it
    (amax / 448, true divisions, E4M3 round-to-nearest-even incl. subnormals and ties), read
    through an identity weight so each output is one product: the same bits; with random
    weights, Fp8Kernel's values within fp32 summation order, at 1-8 rows."""
    from tokenmill.quant import elements as el
    from tokenmill.quant.formats import QuantizedTensor
    from tokenmill.quant.methods.fp8 import EmulatedFp8Kernel, FP8Method, NativeFp8Kernel
    from tokenmill.quant.smoothquant import smooth_input

    gen = torch.Generator().manual_seed(13)
    method = FP8Method()
    cols = 256
    one = torch.full((cols,), 0x38, dtype=torch.uint8)  # E4M3 1.0
    eye = torch.diag_embed(one.float()).to(torch.uint8).view(torch.float8_e4m3fn)
    identity = QuantizedTensor("fp8_e4m3", (cols, cols), eye, torch.ones(cols), None)
    smooth = torch.rand(cols, generator=gen) + 0.5 if smoothed else None
    w = GGUFWeight.fp8a8_rows(identity.data, torch.ones(cols), smooth)
    native_kernel = NativeFp8Kernel(kernels, w, method.activation_scale, dtype)
    for m in range(1, 9):
        # a wide range (subnormal E4M3 codes after scaling), and in the last row exact ties:
        # amax 448 (a scale of 1), then midpoints of E4M3 neighbours, normal and subnormal
        x = torch.randn(m, cols, generator=gen) * torch.logspace(-5, 1, cols)
        grid = el.decode_table(el.E4M3)[:127].double()  # the non-negative finite codes
        mids = (grid[1:] + grid[:-1]) / 2
        x[-1, 0], x[-1, 1 : 1 + mids.numel()] = 448.0, mids.float()
        x = x.to(dtype)
        if smooth is None:  # the ties survive only unsmoothed (the scale is exactly 1)
            assert torch.equal(x[-1, 1 : 1 + mids.numel()].double(), mids)
        x2 = smooth_input(smooth, x)
        scale = method.activation_scale(x2)
        xq = (x2 / scale).clamp(-el.E4M3.max_value, el.E4M3.max_value).to(torch.float8_e4m3fn)
        want = (xq.float() * scale) * 1.0
        assert torch.equal(native_kernel.gemv(x), want)
    q = quantize(torch.randn(67, 160, generator=gen), "fp8_e4m3", granularity="channel")
    ref = EmulatedFp8Kernel(q, method.activation_scale, dtype)
    w = GGUFWeight.fp8a8_rows(q.data, ref.weight_scale, None)
    native_kernel = NativeFp8Kernel(kernels, w, method.activation_scale, dtype)
    assert w.segments[0][1].data_ptr() == q.data.data_ptr()  # the codes, not a copy
    for m in range(1, 9):
        x = torch.randn(m, 160, generator=gen).to(dtype)
        x2 = smooth_input(None, x)
        scale = method.activation_scale(x2)
        xq = (x2 / scale).clamp(-448, 448).to(torch.float8_e4m3fn).double()
        exact = el.decode(q.data.view(torch.uint8), el.E4M3, torch.float64)
        want = (xq @ exact.T) * scale.double() * ref.weight_scale.double()
        bound = ((xq.abs() @ exact.abs().T) * scale.double() * ref.weight_scale.double()).max()
        assert (native_kernel.gemv(x).double() - want).abs().max() <= 1e-5 * bound


@pytest.mark.parametrize("kind", [INT4_ROWS, NVFP4_ROWS, INT8_ROWS])
def test_linear_in_blocks_of_rows_equals_one_gemm(kernels, kind, monkeypatch):
    """Above 8 rows the weight is expanded a block of rows at a time into a reused buffer:
    the same result as one GEMM over the whole dense matrix, for every block size (blocks
    that split segments and row scales too), and the buffer is reused across calls."""
    from tokenmill.quant.methods import gguf

    gen = torch.Generator().manual_seed(kind)
    parts = [make_weight(kind, r, 128, gen)[0] for r in (50, 37)]
    merged = GGUFWeight(
        [s for p in parts for s in p.segments], 128,
        [s for p in parts for s in p.scales], [a for p in parts for a in p.aux],
    )  # fmt: skip
    x = torch.randn(24, 128, generator=gen).to(torch.bfloat16)
    want = torch.nn.functional.linear(x, kernels.dense(merged, torch.bfloat16))
    for block in (16, 40, 64, 4096):
        monkeypatch.setattr(gguf, "GEMM_BLOCK_ROWS", block)
        assert torch.equal(kernels.linear(x, merged), want)
        assert torch.equal(kernels.matmul(x, merged), want)
    buffer = kernels._buffers.by_dtype[torch.bfloat16]
    kernels.linear(x, merged)
    assert kernels._buffers.by_dtype[torch.bfloat16] is buffer
