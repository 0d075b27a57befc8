"""One linear layer in every precision, side by side: bf16 (cuBLAS) against FP8 (`_scaled_mm`),
W8A8 (`_int_mm`) and the Triton weight-only kernels, at Llama-class shapes and batch sizes from
decode (M = 1) to prefill (M = 4096). Each variant is first checked against a float64 reference
on that shape, then timed (CUDA events, median of many runs after warm-up).

    python benchmarks/gemm_formats.py [--shapes 4096x4096,14336x4096] [--m 1,16,256,4096]
        [--json-out F]            (needs a CUDA device; --smoke runs tiny shapes on CPU)

Rows: "gemm" variants time the matrix product alone on already-quantized activations; "layer"
variants time the whole quant method (activation scaling and quantization included), which is
what a model step pays.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from tokenmill.layers.linear import Linear
from tokenmill.quant import quantize
from tokenmill.quant.methods import make_method
from tokenmill.quant.methods.weight_only import TritonKernel
from tokenmill.quant.scaled_mm import scaled_mm_form

try:
    from tokenmill.quant.triton_dequant import PATHS, choose_path, dequant_matmul
except ImportError:  # no Triton: the CPU rows still run
    PATHS = ()

WEIGHT_ONLY = ("int4", "nvfp4", "mxfp4", "fp6_e2m3", "int8", "fp8_e4m3")
SWEPT = ("int4", "nvfp4", "fp6_e2m3")  # every Triton path timed on its own, too


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of fn() over `repeats` runs (CUDA events on GPU)."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def layer_for(method: str | None, weight: torch.Tensor, device) -> Linear:
    options = {"smoothquant_alpha": None} if method in ("w8a8", "fp8") else {}
    qm = make_method(method, **options) if method is not None else None
    layer = Linear(weight.shape[1], [weight.shape[0]], params_dtype=torch.bfloat16, quant_method=qm)
    layer.weight.data.copy_(weight)
    layer.to(device)
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def reference(method: str | None, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """float64 product of what each method computes (its quantized weight; activations as the
    method quantizes them)."""
    x64, weight = x.double(), weight.to(x.device)
    if method in WEIGHT_ONLY:
        return x64 @ quantize(weight.bfloat16(), method).dequantize(torch.float64).T
    if method == "w8a8":
        q = quantize(weight.bfloat16(), "int8")
        amax = x64.abs().amax(1, keepdim=True)
        return torch.round(x64 * 127 / amax) @ q.data.double().T * (amax / 127) * q.scale.double()
    if method == "fp8":
        q = quantize(weight.bfloat16(), "fp8_e4m3")
        xq = quantize(x64, "fp8_e4m3", granularity="token")
        return xq.dequantize(torch.float64) @ q.dequantize(torch.float64).T
    return x64 @ weight.bfloat16().double().T


def bench_shape(n: int, k: int, ms: list[int], device, repeats: int) -> list[dict]:
    gen = torch.Generator().manual_seed(n + k)
    weight = torch.randn(n, k, generator=gen) / k**0.5
    rows = []
    for method in (None, "fp8", "w8a8", *WEIGHT_ONLY):
        layer = layer_for(method, weight, device)
        name = method or "bf16"
        kernel = getattr(layer.quant_method, "kernel", "") or "F.linear"
        impl = getattr(layer.quant_method, "impl", None)  # the layer's kernel object
        x = torch.randn(max(ms), k, generator=gen).bfloat16().to(device)
        check = x[:7]
        ref = reference(method, weight, check)
        err = ((layer(check).double() - ref).norm() / ref.norm()).item()
        for m in ms:
            xm = x[:m]
            seconds = timed(lambda layer=layer, xm=xm: layer(xm), device, repeats)
            label = kernel
            if isinstance(impl, TritonKernel):
                label = f"{kernel}: {choose_path(xm, impl.weight)} (measured choice)"
            rows.append(dict(shape=f"{n}x{k}", m=m, variant=f"layer {name}", kernel=label,
                             seconds=seconds, tflops=2 * m * n * k / seconds / 1e12,
                             rel_err=err))  # fmt: skip
        if method in SWEPT and isinstance(impl, TritonKernel):
            rows += _paths(impl.weight, x, ms, name, device, repeats)
        if method == "fp8" and device.type == "cuda":
            rows += _gemm_only_fp8(layer, x, ms, n, k, device, repeats)
        del layer
    return rows


def _paths(tw, x, ms, name, device, repeats) -> list[dict]:
    """Each Triton path forced, where it applies: what the measured choice chose from."""
    rows = []
    for path in PATHS:
        for m in ms:
            if (path == "gemv" and m > 4) or (path == "dot" and m > 256):
                continue
            xm = x[:m]
            seconds = timed(lambda p=path, xm=xm: dequant_matmul(xm, tw, path=p), device, repeats)
            rows.append(dict(shape=f"{tw.n}x{tw.k}", m=m, variant=f"{name} path {path}",
                             kernel=f"triton {path}", seconds=seconds,
                             tflops=2 * m * tw.n * tw.k / seconds / 1e12, rel_err=None))  # fmt: skip
    return rows


def _gemm_only_fp8(layer, x, ms, n, k, device, repeats) -> list[dict]:
    rows = []
    scale = (x.float().abs().amax(1, keepdim=True) / 448).clamp(min=1e-12)
    xq = (x.float() / scale).to(torch.float8_e4m3fn)
    out_dtype, pad = scaled_mm_form(device, torch.bfloat16) or (torch.bfloat16, 1)
    for m in ms:
        rows_m = -(-m // pad) * pad
        a = xq[:rows_m] if rows_m <= xq.shape[0] else xq[:m]
        sa = scale[: a.shape[0]].contiguous()

        def run(a=a, sa=sa):
            return torch._scaled_mm(
                a, layer.quant_method.impl.weight_fp8.t(), scale_a=sa,
                scale_b=layer.quant_method.impl.weight_scale[None, :], out_dtype=out_dtype,
            )  # fmt: skip

        seconds = timed(run, device, repeats)
        rows.append(dict(shape=f"{n}x{k}", m=m, variant="gemm fp8 _scaled_mm",
                         kernel="torch._scaled_mm", seconds=seconds,
                         tflops=2 * m * n * k / seconds / 1e12, rel_err=None))  # fmt: skip
    return rows


def table(rows: list[dict]) -> str:
    base = {(r["shape"], r["m"]): r["seconds"] for r in rows if r["variant"] == "layer bf16"}
    lines = [
        "| N x K | M | variant | kernel | us | TFLOP/s | vs bf16 | rel. error |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = base[(r["shape"], r["m"])] / r["seconds"]
        err = "" if r["rel_err"] is None else f"{r['rel_err']:.1e}"
        lines.append(
            f"| {r['shape']} | {r['m']} | {r['variant']} | {r['kernel']} | "
            f"{r['seconds'] * 1e6:.1f} | {r['tflops']:.1f} | {ratio:.2f}x | {err} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--shapes", default="4096x4096,14336x4096,4096x14336", help="N x K list")
    ap.add_argument("--m", default="1,16,64,256,1024,4096", help="rows (tokens) per product")
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes on CPU (checks the script)")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    device = torch.device("cpu" if args.smoke else "cuda")
    shapes = ["256x128"] if args.smoke else args.shapes.split(",")
    ms = [1, 8] if args.smoke else [int(m) for m in args.m.split(",")]
    rows = []
    for shape in shapes:
        n, k = (int(v) for v in shape.split("x"))
        rows += bench_shape(n, k, ms, device, 3 if args.smoke else args.repeats)
        print(f"{shape} done", flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}, activations bf16\n")
    print(table(rows))
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump({"device": name, "torch": torch.__version__, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
