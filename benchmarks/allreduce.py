"""Gloo all-reduce on this machine: latency and bandwidth, to calibrate the interconnect model.

    python benchmarks/allreduce.py --ranks 2 --out benchmarks/results-allreduce.json

`--ranks` processes (torch.distributed, Gloo over loopback TCP) all-reduce bf16 tensors of
1 KiB to 64 MiB; per size, `--repeats` trials of a run of back-to-back all-reduces (as a
tensor-parallel step issues them; at least 20 ms a trial), each trial started after a barrier
and timed on rank 0; the per-call time is the median trial's length / its calls. (Single calls
timed between barriers scattered 10x on this 2-core machine: a descheduled rank holds the other.) A least-squares fit of the ring model t = 2 (p-1) a + 2 (p-1)/p x
bytes / b gives the latency a and bandwidth b, printed as a catalogue entry for
tokenmill/bench/scaling.toml's `gloo-loopback` link. On a GPU machine `--backend nccl` measures
NCCL the same way (one rank per GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SIZES = [1 << k for k in range(10, 27, 2)]  # 1 KiB .. 64 MiB


def worker(rank: int, ranks: int, port: int, backend: str, repeats: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    if backend == "nccl":
        torch.cuda.set_device(rank)
    dist.init_process_group(backend, rank=rank, world_size=ranks)
    device = "cuda" if backend == "nccl" else "cpu"
    out = {}
    for size in SIZES:
        x = torch.randn(size // 2, dtype=torch.bfloat16, device=device)
        calls = 1
        while True:  # calls per trial: at least 20 ms (the same count on every rank)
            dist.barrier()
            t = time.perf_counter()
            for _ in range(calls):
                dist.all_reduce(x)
            if device == "cuda":
                torch.cuda.synchronize()
            n = torch.tensor([1 if time.perf_counter() - t < 0.02 else 0])
            dist.all_reduce(n, op=dist.ReduceOp.MAX)
            if not n.item() or calls >= 4096:
                break
            calls *= 2
        times = []
        for _ in range(repeats):
            dist.barrier()
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            for _ in range(calls):
                dist.all_reduce(x)
            if device == "cuda":
                torch.cuda.synchronize()
            times.append((time.perf_counter() - t) / calls)
        out[size] = statistics.median(times)
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def fit(points: dict[int, float], ranks: int) -> tuple[float, float]:
    """(latency s, bandwidth B/s) of t = 2 (p-1) a + 2 (p-1)/p x n / b by least squares on the
    relative error (weights 1/t^2: the small sizes, which set the latency, count as much as the
    large ones, which set the bandwidth)."""
    xs = [2 * (ranks - 1) / ranks * n for n in points]
    ys = list(points.values())
    ws = [1 / y**2 for y in ys]
    sw = sum(ws)
    mx = sum(w * x for w, x in zip(ws, xs)) / sw
    my = sum(w * y for w, y in zip(ws, ys)) / sw
    slope = sum(w * (x - mx) * (y - my) for w, x, y in zip(ws, xs, ys)) / sum(
        w * (x - mx) ** 2 for w, x in zip(ws, xs)
    )
    intercept = my - slope * mx
    return max(intercept, 0.0) / (2 * (ranks - 1)), 1.0 / slope


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    p.add_argument("--repeats", type=int, default=9, help="trials per size (median reported)")
    p.add_argument("--port", type=int, default=29517)
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, args.ranks, args.port, args.backend, args.repeats, queue))
             for r in range(args.ranks)]  # fmt: skip
    for proc in procs:
        proc.start()
    points = queue.get(timeout=600)
    for proc in procs:
        proc.join(60)
    latency, bandwidth = fit(points, args.ranks)
    print(f"{'bytes':>10} {'median us':>10} {'model us':>10}")
    for n, t in points.items():
        model = 2 * (args.ranks - 1) * latency + 2 * (args.ranks - 1) / args.ranks * n / bandwidth
        print(f"{n:>10} {t * 1e6:>10.1f} {model * 1e6:>10.1f}")
    print(f"fit: latency {latency * 1e6:.1f} us, bandwidth {bandwidth / 1e9:.2f} GB/s")
    print(f"[links.{args.backend}-loopback]\nbandwidth = {bandwidth:.3g}\nlatency = {latency:.3g}\ndomain = {args.ranks}")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps({
            "backend": args.backend, "ranks": args.ranks, "median_s": {str(k): v for k, v in points.items()},
            "latency_s": latency, "bandwidth_bytes_per_s": bandwidth,
            "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
        }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
