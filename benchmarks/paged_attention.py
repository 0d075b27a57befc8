"""Decode attention alone: the torch backend (block gather + SDPA) against the native CPU kernel,
over as many layers' worth of separate KV pools as the model has (so that the pools do not sit in
cache), blocks scattered at random as a long-running server leaves them.

    python benchmarks/paged_attention.py [--seqs 64] [--keys 136] [--heads 9] [--kv-heads 3]
        [--head-dim 64] [--layers 30] [--dtype float32|bfloat16] [--repeats 15]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--keys", type=int, default=136, help="cached keys per sequence")
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--kv-heads", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()

    from tokenmill.bench.offline import machine
    from tokenmill.layers.attention import AttentionMetadata, TorchAttention
    from tokenmill.layers.cpu_attention import NativeCpuAttention

    dtype = getattr(torch, args.dtype)
    bs, seqs, keys = args.block_size, args.seqs, args.keys
    per_seq = -(-keys // bs)
    blocks = seqs * per_seq + 8
    gen = torch.Generator().manual_seed(0)
    shape = (2, args.kv_heads, (blocks + 1) * bs, args.head_dim)
    pools = [torch.randn(shape, generator=gen).to(dtype) for _ in range(args.layers)]
    tables = torch.randperm(blocks, generator=gen)[: seqs * per_seq].view(seqs, per_seq)
    mask = torch.arange(per_seq * bs) < keys
    meta = AttentionMetadata(
        slot_mapping=torch.zeros(0, dtype=torch.int64),
        num_decode_tokens=seqs,
        block_size=bs,
        decode_block_tables=tables.contiguous(),
        decode_mask=mask.expand(seqs, 1, 1, -1),
        decode_lens=torch.full((seqs,), keys, dtype=torch.int32),
    )
    q = torch.randn(seqs, args.heads, args.head_dim, generator=gen).to(dtype)
    scale = args.head_dim**-0.5
    backends = {"torch (gather + SDPA)": TorchAttention(scale), "native": NativeCpuAttention(scale)}
    times: dict[str, list[float]] = {name: [] for name in backends}
    for _ in range(args.repeats):  # interleaved, so drift hits both alike
        for name, backend in backends.items():
            t = time.perf_counter()
            for pool in pools:
                backend._decode(q, pool, meta)
            times[name].append(time.perf_counter() - t)
    kv_bytes = 2 * seqs * args.kv_heads * keys * args.head_dim * dtype.itemsize * args.layers
    read = []
    for _ in range(5):
        t = time.perf_counter()
        for pool in pools:
            pool.sum()
        read.append(sum(p.numel() * p.element_size() for p in pools) / (time.perf_counter() - t))
    print(
        f"\n{machine()}, {args.dtype}, {args.layers} layers x {seqs} seqs x {keys} keys, "
        f"{args.heads}/{args.kv_heads} heads, head_dim {args.head_dim}, block {bs}; "
        f"torch.sum reads {statistics.median(read) / 1e9:.1f} GB/s"
    )
    print("| backend | ms, median | K/V read GB/s | x torch |")
    print("|---|---:|---:|---:|")
    base = statistics.median(times["torch (gather + SDPA)"])
    for name, values in times.items():
        med = statistics.median(values)
        print(f"| {name} | {med * 1e3:.2f} | {kv_bytes / med / 1e9:.1f} | {base / med:.2f}x |")


if __name__ == "__main__":
    main()
