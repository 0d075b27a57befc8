"""Roofline arithmetic against known inputs."""

import pytest

from tokenmill.bench.roofline import Ceilings, limits


def test_limits_from_ceilings():
    c = Ceilings(
        copy_gbs=20.0,
        read_gbs=30.0,
        fp32_gflops=200.0,
        bf16_gflops=50.0,
        int8_gops=700.0,
        device="cpu",
        method="test",
    )
    lim = limits(num_params=100_000_000, dtype_bytes=4, c=c)
    assert lim.decode_tokens_per_s == pytest.approx(20e9 / 400e6)  # 50 tok/s
    assert lim.prefill_tokens_per_s == pytest.approx(200e9 / 200e6)  # 1000 tok/s
    half = limits(100_000_000, 2, c, dtype="bfloat16")
    assert half.decode_tokens_per_s == pytest.approx(100.0)
    assert half.prefill_tokens_per_s == pytest.approx(250.0)
