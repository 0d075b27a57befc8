"""tokenmill and its peers on the same model and the same tokens, one engine at a time, in one run:
offline throughput (64 x 128 -> 128 by default), batch-1 TTFT and decode speed, start-up time.

    python benchmarks/peers/export_default.py /tmp/smollm2-hf       # the same weights for all
    bash benchmarks/peers/setup_<peer>.sh                           # each peer in its own venv
    python benchmarks/peers/compare.py --hf /tmp/smollm2-hf [--json-out F]

An engine whose venv is missing is reported as such, not skipped silently. llama.cpp reads the
GGUF directly (the bundled Q4_1 file, as shipped, an F32 copy of the same values, and BF16 / Q8_0
files that llama.cpp re-encodes from it: quantize_gguf.py); tokenmill serves the Q4_1 and Q8_0
files from their codes too (--quantization gguf) beside its own formats on the HF copy.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def venv_python(name: str | None) -> Path:
    return Path(sys.executable) if name is None else HERE / f".venv-{name}" / "bin" / "python"


def engines(
    hf: str, gguf: str, gguf_f32: str | None, more_ggufs: dict[str, str | None] | None = None
) -> list[tuple[str, str | None, str, str, str]]:
    """(label, venv, driver, model, variant)."""
    rows = [
        ("tokenmill fp32", None, "tokenmill_driver.py", hf, "float32"),
        ("tokenmill bf16", None, "tokenmill_driver.py", hf, "bfloat16"),
        ("tokenmill int8 (weight-only)", None, "tokenmill_driver.py", hf, "int8/bfloat16"),
        ("tokenmill w8a8", None, "tokenmill_driver.py", hf, "w8a8/bfloat16"),
        ("tokenmill nvfp4", None, "tokenmill_driver.py", hf, "nvfp4/bfloat16"),
        ("tokenmill fp8_e4m3 (weight-only)", None, "tokenmill_driver.py", hf, "fp8_e4m3/bfloat16"),
        ("tokenmill fp8 (E4M3 x E4M3)", None, "tokenmill_driver.py", hf, "fp8/bfloat16"),
        ("tokenmill int4 (weight-only)", None, "tokenmill_driver.py", hf, "int4/bfloat16"),
        ("tokenmill gguf Q4_1 (as shipped)", None, "tokenmill_driver.py", gguf, "gguf/bfloat16"),
        ("transformers fp32", None, "transformers_driver.py", hf, "float32"),
        ("vLLM fp32", "vllm", "vllm_driver.py", hf, "float32"),
        ("vLLM bf16", "vllm", "vllm_driver.py", hf, "bfloat16"),
        ("llama.cpp Q4_1 (as shipped)", "llamacpp", "llamacpp_driver.py", gguf, "q4_1"),
        ("CTranslate2 fp32", "ctranslate2", "ctranslate2_driver.py", hf, "float32"),
        ("CTranslate2 int8", "ctranslate2", "ctranslate2_driver.py", hf, "int8"),
    ]
    if gguf_f32:
        rows.insert(5, ("llama.cpp F32", "llamacpp", "llamacpp_driver.py", gguf_f32, "f32"))
    for kind, path in (more_ggufs or {}).items():  # quantize_gguf.py's BF16 and Q8_0 files
        if path:
            rows.append((f"llama.cpp {kind.upper()}", "llamacpp", "llamacpp_driver.py", path, kind))
            if kind == "q8_0":  # served from the same file's codes
                label = "tokenmill gguf Q8_0"
                rows.append((label, None, "tokenmill_driver.py", path, "gguf/bfloat16"))
    return rows


def workload(vocab: int, num: int, input_len: int, output_len: int, seed: int) -> dict:
    rng = random.Random(seed)
    draw = lambda k: [[rng.randrange(100, vocab) for _ in range(input_len)] for _ in range(k)]  # noqa: E731
    return {
        "offline": draw(num),
        "output_len": output_len,
        "latency": draw(3),
        "latency_output_len": output_len,
    }


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hf", required=True, help="HF folder (export_default.py)")
    ap.add_argument("--gguf", default=None, help="GGUF for llama.cpp (default: the bundled file)")
    ap.add_argument("--gguf-f32", default=None, help="an F32 GGUF of the same weights")
    ap.add_argument("--gguf-bf16", default=None, help="a BF16 GGUF of them (quantize_gguf.py)")
    ap.add_argument("--gguf-q8_0", default=None, help="a Q8_0 GGUF of them (quantize_gguf.py)")
    ap.add_argument("--num-prompts", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--only", default=None, help="comma-separated labels to run")
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tokenmill.bench.offline import commit, machine
    from tokenmill.models.gguf import resolve_default_model

    gguf = args.gguf or str(resolve_default_model())
    vocab = json.loads((Path(args.hf) / "config.json").read_text())["vocab_size"]
    work_dir = Path(tempfile.mkdtemp(prefix="peers-"))
    work = work_dir / "workload.json"
    work.write_text(
        json.dumps(workload(vocab, args.num_prompts, args.input_len, args.output_len, 0))
    )
    bandwidth = [read_bandwidth_gbs()]  # before the engines and after them: the drift shows
    results = []
    more = {"bf16": args.gguf_bf16, "q8_0": args.gguf_q8_0}
    for label, venv, driver, model, variant in engines(args.hf, gguf, args.gguf_f32, more):
        if args.only and label not in args.only.split(","):
            continue
        python = venv_python(venv)
        if not python.exists():
            results.append({"label": label, "error": f"not installed: run setup_{venv}.sh"})
            print(f"{label}: not installed (setup_{venv}.sh)", flush=True)
            continue
        out = work_dir / f"{label.replace(' ', '_')}.json"
        cmd = [
            str(python),
            str(HERE / "drivers" / driver),
            "--model",
            model,
            "--workload",
            str(work),
            "--out",
            str(out),
            "--variant",
            variant,
        ]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE / "drivers")
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            results.append({"label": label, "error": " | ".join(tail)})
            print(f"{label}: failed: {tail}", flush=True)
            continue
        row = {"label": label, **json.loads(out.read_text()), "wall_s": time.perf_counter() - t}
        row["weight_bytes"] = weight_bytes(model, variant)
        results.append(row)
        print(json.dumps(row), flush=True)
    bandwidth.append(read_bandwidth_gbs())
    stamp = {
        "read_gb_per_s": bandwidth,
        "machine": machine(),
        "commit": commit(),
        "date": time.strftime("%Y-%m-%d"),
        "workload": f"{args.num_prompts} x ({args.input_len} -> {args.output_len}), greedy",
    }
    table(results, stamp)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({**stamp, "results": results}, indent=2))


def read_bandwidth_gbs(gib: int = 1, repeats: int = 5) -> float:
    """Memory read bandwidth: the median of `repeats` sums over a buffer larger than the last
    cache level (torch, every thread), the roofline a batch-1 decode streams its weights at."""
    import statistics

    import torch

    buf = torch.ones(gib << 28, dtype=torch.float32)  # gib GiB
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        buf.sum()
        times.append(time.perf_counter() - t)
    return buf.numel() * 4 / statistics.median(times) / 1e9


def weight_bytes(model: str, variant: str) -> int:
    """What one decode step reads of weights: a GGUF's size, or an HF folder's parameters at the
    variant's width: a quantization method's bits for the linear layers (codes and scales:
    nvfp4 an fp8 scale per 16, int4 a fp32 scale and a uint8 zero per 64 (this model's 576-wide
    rows; 128 for 1536), fp8 one byte), the model dtype for the rest
    (the embedding, which a tied model's head reads whole each step; norms)."""
    path = Path(model)
    if path.is_file():
        return path.stat().st_size
    from safetensors import safe_open

    method, _, dtype = variant.rpartition("/")
    plain = {"float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    bits = {"int8": 8, "w8a8": 8, "nvfp4": 4.5, "mxfp4": 4.25, "int4": 4.625}.get(method)
    bits = bits or {"fp8_e4m3": 8, "fp8_e5m2": 8, "fp8": 8}.get(method)
    total = 0.0
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                quantized = bits and "_proj." in name
                total += _numel(st, name) * (bits / 8 if quantized else plain)
    return int(total)


def _numel(st, name: str) -> int:
    n = 1
    for d in st.get_slice(name).get_shape():
        n *= d
    return n


def table(results: list[dict], stamp: dict) -> None:
    base = next((r for r in results if r["label"] == "tokenmill fp32" and "error" not in r), None)
    bw = stamp["read_gb_per_s"]
    print(f"\n{stamp['machine']}, commit {stamp['commit']}, {stamp['date']}, {stamp['workload']}")
    print(f"memory read bandwidth {bw[0]:.1f} GB/s before the engines, {bw[-1]:.1f} after")
    print(
        "| engine | version | offline out tok/s | vs tokenmill fp32 | batch-1 decode tok/s "
        "| share of the bandwidth roofline | batch-1 TTFT ms | start-up s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['label']} | - | {r['error']} | | | | | |")
            continue
        ratio = r["offline_output_tps"] / base["offline_output_tps"] if base else float("nan")
        roofline = max(bw) * 1e9 / r["weight_bytes"]  # tok/s if the weights streamed at bw
        print(
            f"| {r['label']} | {r['version']} | {r['offline_output_tps']:.1f} | {ratio:.2f}x | "
            f"{r['decode_b1_tps']:.1f} | {r['decode_b1_tps'] / roofline:.0%} | "
            f"{1000 * r['ttft_b1_s']:.0f} | {r['startup_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
