"""The roofline: this machine's measured ceilings, and how close the engine comes to them.

Ceilings (measured, then cached per machine in ~/.cache/tokenmill/):
- memory bandwidth: copy of a 512 MB buffer (read + write bytes) and a read-only sum;
- matrix multiply: fp32 and bf16 [2048 x 2048] @ [2048 x 2048] through torch, and int8
  `torch._int_mm` where the build has it (GOP/s).
Limits a model run is held to:
- decode at batch 1 reads every weight once per token: tokens/s <= bandwidth / weight bytes;
- prefill does 2 FLOPs per parameter per token: tokens/s <= matmul rate / (2 x parameters).
"""

from __future__ import annotations

import json
import platform
import socket
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

CACHE_DIR = Path.home() / ".cache" / "tokenmill"


@dataclass(frozen=True)
class Ceilings:
    copy_gbs: float  # bytes read + written per second / 1e9
    read_gbs: float
    fp32_gflops: float
    bf16_gflops: float
    int8_gops: float | None  # None where torch has no int8 matmul here
    device: str
    method: str


@dataclass(frozen=True)
class Limits:
    decode_tokens_per_s: float  # batch-1 ceiling from bandwidth (copy convention)
    prefill_tokens_per_s: float  # ceiling from the fp32/bf16 matmul rate


def limits(num_params: int, dtype_bytes: int, c: Ceilings, dtype: str = "float32") -> Limits:
    rate = c.bf16_gflops if dtype == "bfloat16" else c.fp32_gflops
    return Limits(
        decode_tokens_per_s=c.copy_gbs * 1e9 / (num_params * dtype_bytes),
        prefill_tokens_per_s=rate * 1e9 / (2 * num_params),
    )


def _median_rate(fn, work: float, repeats: int = 5) -> float:
    fn()
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        rates.append(work / (time.perf_counter() - t))
    return statistics.median(rates)


def measure(device: str = "cpu") -> Ceilings:
    dev = torch.device(device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    a = torch.ones(128 << 20, device=dev)  # 512 MB of fp32
    b = torch.empty_like(a)

    def copy():
        b.copy_(a)
        sync()

    def read():
        a.sum()
        sync()

    n = 2048
    x = torch.randn(n, n, device=dev)
    y = torch.randn(n, n, device=dev)
    xb, yb = x.bfloat16(), y.bfloat16()

    def mm(p, q):
        def run():
            torch.mm(p, q)
            sync()

        return run

    int8 = None
    if hasattr(torch, "_int_mm"):
        xi = torch.randint(-64, 64, (n, n), dtype=torch.int8, device=dev)
        yi = torch.randint(-64, 64, (n, n), dtype=torch.int8, device=dev)

        def imm():
            torch._int_mm(xi, yi)
            sync()

        try:
            int8 = _median_rate(imm, 2 * n**3) / 1e9
        except RuntimeError:
            int8 = None
    return Ceilings(
        copy_gbs=_median_rate(copy, 2 * a.numel() * 4) / 1e9,
        read_gbs=_median_rate(read, a.numel() * 4) / 1e9,
        fp32_gflops=_median_rate(mm(x, y), 2 * n**3) / 1e9,
        bf16_gflops=_median_rate(mm(xb, yb), 2 * n**3, repeats=3) / 1e9,
        int8_gops=int8,
        device=f"{dev.type} {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads",
        method="median of 5: copy_/sum of 512 MB fp32; mm of 2048^3 (fp32, bf16, int8 _int_mm)",
    )


def cached(device: str = "cpu", refresh: bool = False) -> Ceilings:
    path = CACHE_DIR / f"roofline-{socket.gethostname()}-{device.replace(':', '')}.json"
    if path.exists() and not refresh:
        return Ceilings(**json.loads(path.read_text()))
    c = measure(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(c), indent=2))
    return c
