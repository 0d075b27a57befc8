"""Quantized formats against an independent float64 (numpy) reference of each definition."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tokenmill.quant import FORMATS, quantize
from tokenmill.quant import elements as el
from tokenmill.quant.formats import cat_rows

SPECS = {  # name: (exponent bits, mantissa bits, bias, max finite, has NaN)
    "e4m3": (el.E4M3, 4, 3, 7, 448.0),
    "e5m2": (el.E5M2, 5, 2, 15, 57344.0),
    "e3m2": (el.E3M2, 3, 2, 3, 28.0),
    "e2m3": (el.E2M3, 2, 3, 1, 7.5),
    "e2m1": (el.E2M1, 2, 1, 1, 6.0),
}


def ref_grid(ebits: int, mbits: int, bias: int, max_value: float) -> np.ndarray:
    """Non-negative finite values by code, from the IEEE-style definition."""
    values = []
    for e in range(2**ebits):
        for f in range(2**mbits):
            v = (
                (f / 2**mbits) * 2.0 ** (1 - bias)
                if e == 0
                else (1 + f / 2**mbits) * 2.0 ** (e - bias)
            )
            if v <= max_value:
                values.append(v)
    return np.array(values)


def ref_encode(x: np.ndarray, ebits, mbits, bias, max_value) -> np.ndarray:
    """Nearest grid value, ties to the even code, saturating; sign in the top bit."""
    grid = ref_grid(ebits, mbits, bias, max_value)
    a = np.minimum(np.abs(x), max_value)
    hi = np.clip(np.searchsorted(grid, a), 1, len(grid) - 1)
    lo = hi - 1
    dlo, dhi = a - grid[lo], grid[hi] - a
    code = np.where(dlo < dhi, lo, np.where(dhi < dlo, hi, np.where(lo % 2 == 0, lo, hi)))
    return code | (np.signbit(x).astype(np.int64) << (ebits + mbits))


def test_every_e2m1_code_point():
    values = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    table = el.decode_table(el.E2M1)
    assert table[:8].tolist() == values
    assert table[8:].tolist() == [-v for v in values]
    codes = el.encode(torch.tensor(values + [-v for v in values[1:]]), el.E2M1)
    assert codes.tolist() == list(range(8)) + list(range(9, 16))


def test_e4m3_e5m2_constants_and_torch_agreement():
    assert el.E4M3.max_value == 448 and el.E5M2.max_value == 57344
    assert el.E3M2.max_value == 28 and el.E2M3.max_value == 7.5
    assert el.magnitudes(el.E4M3)[1] == 2.0**-9  # smallest subnormal
    assert el.magnitudes(el.E5M2)[1] == 2.0**-16
    for fmt, dtype in ((el.E4M3, torch.float8_e4m3fn), (el.E5M2, torch.float8_e5m2)):
        codes = torch.arange(256, dtype=torch.uint8)
        ours = el.decode(codes, fmt, torch.float64)
        theirs = codes.view(dtype).double()
        assert torch.equal(torch.isnan(ours), torch.isnan(theirs))
        finite = ~torch.isnan(ours)
        assert torch.equal(ours[finite], theirs[finite])
    assert math.isnan(el.decode(torch.tensor([0x7F]), el.E4M3).item())


@pytest.mark.parametrize("name", list(SPECS))
def test_encode_matches_reference(name):
    fmt, ebits, mbits, bias, max_value = SPECS[name]
    rng = np.random.default_rng(hash(name) % 2**32)
    mags = 2.0 ** rng.uniform(-20, math.log2(max_value) + 2, 20000)
    grid = ref_grid(ebits, mbits, bias, max_value)
    ties = (grid[:-1] + grid[1:]) / 2  # exact midpoints: the round-half-even cases
    x = np.concatenate([mags, ties, grid, [0.0, max_value * 10]])
    x = x * rng.choice([-1.0, 1.0], len(x))
    ours = el.encode(torch.from_numpy(x), fmt).numpy().astype(np.int64)
    np.testing.assert_array_equal(ours, ref_encode(x, ebits, mbits, bias, max_value))


def test_saturation_and_nan():
    big = torch.tensor([1e9, -1e9, float("inf"), -float("inf")])
    assert el.decode(el.encode(big, el.E4M3), el.E4M3).tolist() == [448, -448, 448, -448]
    assert el.decode(el.encode(big, el.E2M1), el.E2M1).tolist() == [6, -6, 6, -6]
    assert torch.isnan(el.decode(el.encode(torch.tensor([float("nan")]), el.E5M2), el.E5M2)).all()
    with pytest.raises(ValueError, match="no NaN"):
        el.encode(torch.tensor([float("nan")]), el.E2M1)


def test_packing_round_trips():
    c4 = torch.randint(0, 16, (5, 64), dtype=torch.uint8)
    c6 = torch.randint(0, 64, (5, 64), dtype=torch.uint8)
    assert el.pack_4bit(c4).shape == (5, 32) and el.pack_6bit(c6).shape == (5, 48)
    assert torch.equal(el.unpack_4bit(el.pack_4bit(c4)), c4)
    assert torch.equal(el.unpack_6bit(el.pack_6bit(c6)), c6)
    assert el.pack_4bit(torch.tensor([1, 2], dtype=torch.uint8)).item() == 0x21


def ref_codes_and_values(x: np.ndarray, fmt: str) -> tuple[np.ndarray, np.ndarray]:
    """Reference (codes, dequantized values) for the default granularity of each format."""
    f32 = lambda v: np.float64(np.float32(v))  # noqa: E731  scales are stored as fp32
    if fmt == "int8":
        s = f32(np.abs(x).max(1) / 127)[:, None]
        q = np.clip(np.rint(x / s), -127, 127)
        return q, q * s
    if fmt == "int4":
        g = x.reshape(x.shape[0], -1, 128)
        lo, hi = np.minimum(g.min(-1), 0), np.maximum(g.max(-1), 0)
        s = f32((hi - lo) / 15)
        z = np.clip(np.rint(-lo / s), 0, 15)
        q = np.clip(np.rint(g / s[..., None]) + z[..., None], 0, 15)
        return q.reshape(x.shape), ((q - z[..., None]) * s[..., None]).reshape(x.shape)
    if fmt.startswith("fp8"):
        spec = SPECS[fmt[-4:]]
        s = f32(np.abs(x).max(1) / spec[4])[:, None]
        codes = ref_encode(x / s, *spec[1:])
        return codes, ref_value(codes, *spec[1:]) * s
    if fmt == "nvfp4":
        gs = f32(np.abs(x).max() / (448 * 6))
        g = x.reshape(x.shape[0], -1, 16)
        bcode = ref_encode(np.abs(g).max(-1) / 6 / gs, *SPECS["e4m3"][1:])
        bval = ref_value(bcode, *SPECS["e4m3"][1:]) * gs
        codes = ref_encode(g / bval[..., None], *SPECS["e2m1"][1:])
        values = ref_value(codes, *SPECS["e2m1"][1:]) * bval[..., None]
        return codes.reshape(x.shape), values.reshape(x.shape)
    spec = SPECS[{"mxfp4": "e2m1", "fp6_e3m2": "e3m2", "fp6_e2m3": "e2m3"}[fmt]]
    emax = math.floor(math.log2(spec[4]))
    g = x.reshape(x.shape[0], -1, 32)
    scale = 2.0 ** (np.floor(np.log2(np.abs(g).max(-1))) - emax)
    codes = ref_encode(g / scale[..., None], *spec[1:])
    return codes.reshape(x.shape), (ref_value(codes, *spec[1:]) * scale[..., None]).reshape(x.shape)


def ref_value(codes: np.ndarray, ebits, mbits, bias, max_value) -> np.ndarray:
    grid = ref_grid(ebits, mbits, bias, max_value)
    sign_bit = 1 << (ebits + mbits)
    return np.where(codes & sign_bit, -1.0, 1.0) * grid[codes & (sign_bit - 1)]


def codes_of(q) -> torch.Tensor:
    if q.format == "int8":
        return q.data.long()
    if q.format.startswith("fp8"):
        return q.data.view(torch.uint8).long()
    if q.format in ("int4", "mxfp4", "nvfp4"):
        return el.unpack_4bit(q.data).long()
    return el.unpack_6bit(q.data).long()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape,magnitude", [((8, 256), 1.0), ((3, 512), 1e-3), ((16, 128), 40.0)])
def test_format_matches_float64_reference(fmt, shape, magnitude):
    gen = torch.Generator().manual_seed(hash((fmt, shape)) % 2**31)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * magnitude
    x[0, :7] *= 50  # outliers inside one block
    q = quantize(x, fmt)
    ref_codes, ref_values = ref_codes_and_values(x.numpy(), fmt)
    np.testing.assert_array_equal(codes_of(q).numpy(), ref_codes.astype(np.int64))
    np.testing.assert_array_equal(q.dequantize(torch.float64).numpy(), ref_values)
    assert q.dequantize().dtype == torch.float32 and q.dequantize().shape == shape


def test_storage_sizes():
    x = torch.randn(64, 256)
    rc = 64 * 256
    expected = {
        "int8": rc + 64 * 4,
        "fp8_e4m3": rc + 64 * 4,
        "int4": rc // 2 + 64 * 2 * (4 + 1),
        "fp6_e3m2": rc * 3 // 4 + rc // 32,
        "mxfp4": rc // 2 + rc // 32,
        "nvfp4": rc // 2 + rc // 16 + 4,
    }
    for fmt, nbytes in expected.items():
        assert quantize(x, fmt).nbytes == nbytes, fmt
    assert 2 * rc / quantize(x, "nvfp4").nbytes >= 3.5  # the target against bf16


def test_granularities_and_symmetric_int4():
    x = torch.randn(4, 128) * torch.tensor([1.0, 10, 100, 1000])[:, None]
    per_tensor = quantize(x, "int8", granularity="tensor")
    assert per_tensor.scale.dim() == 0
    assert quantize(x, "fp8_e4m3", granularity="token").scale.shape == (4,)
    err_row = (quantize(x, "int8").dequantize() - x)[0].abs().max()
    assert err_row < (per_tensor.dequantize() - x)[0].abs().max()  # per-row beats per-tensor
    sym = quantize(x, "int4", symmetric=True, group_size=32)
    assert sym.zero_point is None and sym.scale.shape == (4, 4)
    values = (el.unpack_4bit(sym.data).double() - 8).view(4, 4, 32)
    assert values.min() >= -8 and values.max() <= 7
    torch.testing.assert_close(
        sym.dequantize(torch.float64), (values * sym.scale.double()[..., None]).view(4, 128)
    )


def test_zero_rows_nan_blocks_and_errors():
    x = torch.zeros(2, 128)
    for fmt in FORMATS:
        assert torch.equal(quantize(x, fmt).dequantize(), x), fmt
    y = torch.randn(2, 128)
    y[1, 40] = float("nan")
    q = quantize(y, "mxfp4")
    assert q.scale[1, 1].item() == 0xFF  # NaN block: E8M0 NaN scale
    d = q.dequantize()
    assert torch.isnan(d[1, 32:64]).all() and torch.isnan(d).sum() == 32
    with pytest.raises(ValueError, match="group"):
        quantize(torch.randn(2, 96), "int4")
    with pytest.raises(ValueError, match="unknown format"):
        quantize(y, "int3")
    with pytest.raises(ValueError, match="NaN"):
        quantize(y, "int8")


def test_cat_rows_keeps_each_part_exact():
    a, b = torch.randn(8, 64), torch.randn(4, 64) * 100
    for fmt in ("int8", "nvfp4", "int4"):
        kw = {"group_size": 64} if fmt == "int4" else {}
        qa, qb = quantize(a, fmt, **kw), quantize(b, fmt, **kw)
        merged = cat_rows([qa, qb])
        assert merged.shape == (12, 64)
        expected = torch.cat([qa.dequantize(), qb.dequantize()])
        assert torch.equal(merged.dequantize(), expected)
