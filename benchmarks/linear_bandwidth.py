"""Where a decode step's matmul time goes (issue #18): every linear shape of the model, as many
distinct weights as the model has of it (so each call reads from memory, as in decode), timed
at 1 to 16 rows through the engine's path (oneDNN-packed weights), torch's plain F.linear, and
a prototype skinny GEMM over the plain layout with software prefetch
(benchmarks/csrc/skinny_gemm.cpp); GB/s of weight streamed, next to the machine's bandwidth.

    python benchmarks/linear_bandwidth.py [--dtype bfloat16] [--rows 1 4 8 16]
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "skinny_gemm.cpp"


def build_prototype() -> ctypes.CDLL:
    target = Path(tempfile.mkdtemp()) / "skinny_gemm.so"
    include = Path(__file__).parent.parent / "tokenmill" / "layers" / "csrc"  # vec_math.h
    cmd = ["g++", "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17",
           f"-I{include}", str(SOURCE), "-o", str(target)]  # fmt: skip
    subprocess.run(cmd, check=True)
    lib = ctypes.CDLL(str(target))  # torch is loaded: it binds to torch's libgomp
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.tm_skinny_gemm.argtypes = [p, p, p, i, i, i, ctypes.c_int, ctypes.c_int]
    return lib


def timed(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 16])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    from tokenmill import LLM
    from tokenmill.bench.ab import emit
    from tokenmill.bench.offline import commit, machine, memory_bandwidth_gbs
    from tokenmill.layers.linear import Linear, pack_for_cpu, packed_linear

    dtype = getattr(torch, args.dtype)
    llm = LLM(dtype=args.dtype, max_model_len=512, kv_cache_memory=64 << 20)
    model = llm.engine.core.executor.worker.runner.model
    shapes = Counter(
        (m.out_features, m.in_features) for m in model.modules() if isinstance(m, Linear)
    )
    if model.lm_head is None:  # tied: the embedding table is the head
        shapes[tuple(model.model.embed_tokens.weight.shape)] += 1
    del llm
    lib = build_prototype()
    gen = torch.Generator().manual_seed(0)
    rows_out = []
    totals: dict[int, dict[str, float]] = {m: Counter() for m in args.rows}
    for (n, k), count in sorted(shapes.items()):
        weights = [torch.randn(n, k, generator=gen).to(dtype) for _ in range(count)]
        packed = [pack_for_cpu(w) for w in weights]
        gb = n * k * weights[0].element_size() / 1e9
        for m in args.rows:
            x = torch.randn(m, k, generator=gen).to(dtype)
            y = torch.empty(m, n, dtype=dtype)
            code = 1 if dtype == torch.bfloat16 else 0

            def skinny(x=x, y=y, m=m, k=k, n=n, code=code, weights=weights):
                threads = torch.get_num_threads()
                for w in weights:
                    lib.tm_skinny_gemm(x.data_ptr(), w.data_ptr(), y.data_ptr(), m, k, n, code,
                                       threads)  # fmt: skip

            paths = {
                "packed": lambda x=x, packed=packed: [packed_linear(x, p, None) for p in packed],
                "plain": lambda x=x, ws=weights: [torch.nn.functional.linear(x, w) for w in ws],
                "skinny": skinny,
            }
            row = {"shape": f"{n}x{k}", "count": count, "rows": m}
            for name, fn in paths.items():
                per_call = timed(fn, args.reps) / count
                row[f"{name}_us"] = round(per_call * 1e6, 1)
                row[f"{name}_gbs"] = round(gb / per_call, 1)
                totals[m][name] += per_call * count
            rows_out.append(row)
    emit(
        {
            "machine": machine(),
            "commit": commit(),
            "date": time.strftime("%Y-%m-%d"),
            "dtype": args.dtype,
            "memory_gbs": memory_bandwidth_gbs(),
            "shapes": rows_out,
            "per_step_ms": {
                m: {k: round(v * 1e3, 2) for k, v in t.items()} for m, t in totals.items()
            },
        },
        args.json_out,
    )


if __name__ == "__main__":
    main()
