"""One large + six small, partitioned versus sharing the machine (issue #19's benchmark).

    python benchmarks/partition.py --seconds 60 --out benchmarks/results-partition.json

Seven instances of the bundled SmolLM2-135M behind one `tokenmill serve --config` endpoint:
"large" streams long completions (a batch job: `--large-streams` at once, prompt
`--large-prompt` -> `--large-tokens` tokens, back to back), and six "small" instances s0..s5
each answer short chat requests (one every `--small-every` seconds, staggered; 16 tokens out).
Two layouts of the same seven workloads, run one after the other on one machine:
- partitioned: large pinned to its cores, the six small sharing the remaining cores
  (`cores=N:shared`), each process with threads for its own cores only;
- shared: no slices; every instance's engine sees and threads over every core (seven
  containers on one box, as each would start by default);
- shared-1t: no slices, but each engine held to one thread (oversubscription removed by
  hand): what is left is the lack of isolation itself;
- shared-tuned: no slices, the large engine threaded over every core (sized for the machine),
  the small ones one thread each.
Reported per layout: the small requests' TTFT p50/p99 and end-to-end p50/p99, each instance's
throughput (tokens/s), and the machine's utilization (busy CPU time / wall time x cores, from
/proc/stat) over the measured window. The point: partitioned, the large job no longer sets the
small requests' tail.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from tqdm.auto import tqdm

SMALL = [f"s{i}" for i in range(6)]
LAYOUTS = ["partitioned", "shared", "shared-1t", "shared-tuned"]
QUESTIONS = [
    "What is the capital of France?", "Name a primary colour.", "Say hello in Spanish.",
    "How many legs has a spider?", "What is two plus two?", "Name a planet.",
    "What do bees make?", "Which ocean is largest?", "What is water made of?",
]  # fmt: skip


def fleet_toml(layout: str, cores: list[int], args) -> str:
    common = f'model = "default"\ndtype = "bfloat16"\nkv_cache_memory = {64 << 20}\n'
    big_cores, small_cores = cores[: args.large_cores], cores[args.large_cores :]
    if layout == "partitioned" and not small_cores:
        raise SystemExit(f"--large-cores {args.large_cores} leaves no core for the small ones")
    span = ",".join(map(str, small_cores))
    small_common = common
    if layout == "shared-1t":
        common += "num_threads = 1\n"
    if layout in ("shared-1t", "shared-tuned"):
        small_common += "num_threads = 1\n"
    out = ['[[instances]]\nname = "large"\n' + common + "max_model_len = 2048\n"]
    if layout == "partitioned":
        out[0] += f'slice = "cores={",".join(map(str, big_cores))}"\n'
    for name in SMALL:
        t = f'[[instances]]\nname = "{name}"\n' + small_common + "max_model_len = 512\n"
        if layout == "partitioned":
            t += f'slice = "cores={span}:shared"\n'
        out.append(t)
    return "\n".join(out)


def cpu_busy() -> tuple[float, float]:
    """(busy, total) jiffies of every CPU since boot."""
    fields = [float(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


async def stream_one(client: httpx.AsyncClient, body: dict) -> tuple[float | None, float, int]:
    """(TTFT, end-to-end seconds, tokens) of one streamed request."""
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = ttft if ttft is not None else time.perf_counter() - t0
    return ttft, time.perf_counter() - t0, tokens


async def drive(url: str, args) -> dict:
    limits = httpx.Limits(max_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        rng = random.Random(0)
        filler = " ".join(rng.choice(QUESTIONS) for _ in range(args.large_prompt // 6))
        large_body = {"model": "large", "messages": [{"role": "user", "content": filler}],
                      "max_tokens": args.large_tokens, "ignore_eos": True, "stream": True,
                      "stream_options": {"include_usage": True}}  # fmt: skip
        # warm every instance once (first requests pay lazy set-up)
        await asyncio.gather(*(stream_one(client, {**large_body, "model": m, "max_tokens": 4})
                               for m in ["large", *SMALL]))  # fmt: skip
        start, end = time.perf_counter(), time.perf_counter() + args.seconds
        busy0 = cpu_busy()
        large_tokens, small = [], {m: [] for m in SMALL}

        async def large_loop() -> None:
            while time.perf_counter() < end:
                _, _, n = await stream_one(client, large_body)
                if time.perf_counter() <= end + args.large_tokens:  # count finished work
                    large_tokens.append((time.perf_counter(), n))

        async def small_loop(i: int, name: str) -> None:
            await asyncio.sleep(args.small_every * i / len(SMALL))  # staggered
            pending = []
            k = 0
            while time.perf_counter() < end:
                body = {"model": name, "messages": [{"role": "user", "content": QUESTIONS[k % len(QUESTIONS)]}],
                        "max_tokens": 16, "ignore_eos": True, "stream": True,
                        "stream_options": {"include_usage": True}}  # fmt: skip
                pending.append(asyncio.ensure_future(stream_one(client, body)))
                k += 1
                await asyncio.sleep(args.small_every)
            small[name] = [await p for p in pending]

        bar = tqdm(total=args.seconds, desc="measuring", unit="s", leave=False)

        async def tick() -> None:
            while time.perf_counter() < end:
                await asyncio.sleep(1)
                bar.update(1)

        await asyncio.gather(tick(), *(large_loop() for _ in range(args.large_streams)),
                             *(small_loop(i, m) for i, m in enumerate(SMALL)))  # fmt: skip
        bar.close()
        wall = time.perf_counter() - start
        busy1 = cpu_busy()
    ttfts = sorted(t for rs in small.values() for t, _, _ in rs if t is not None)
    e2es = sorted(e for rs in small.values() for _, e, _ in rs)
    utilization = (busy1[0] - busy0[0]) / (busy1[1] - busy0[1])
    return {
        "wall_s": wall,
        "small_requests": len(e2es),
        "small_ttft_p50_ms": 1000 * pct(ttfts, 50),
        "small_ttft_p99_ms": 1000 * pct(ttfts, 99),
        "small_ttft_max_ms": 1000 * ttfts[-1],
        "small_e2e_p50_ms": 1000 * pct(e2es, 50),
        "small_e2e_p99_ms": 1000 * pct(e2es, 99),
        "large_tokens_per_s": sum(n for _, n in large_tokens) / wall,
        "small_tokens_per_s": {m: sum(n for _, _, n in rs) / wall for m, rs in small.items()},
        "utilization": utilization,
    }


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    k = min(len(xs) - 1, max(0, round(p / 100 * (len(xs) - 1))))
    return xs[k]


def run_layout(layout: str, cores: list[int], args) -> dict:
    from tokenmill.bench.serve import wait_ready

    workdir = Path(tempfile.mkdtemp())
    (workdir / "FLEET.toml").write_text(fleet_toml(layout, cores, args))
    port = 8800 + LAYOUTS.index(layout)
    log = open(workdir / "serve.log", "w")  # noqa: SIM115
    cmd = [sys.executable, "-m", "tokenmill.cli", "serve", "--config", str(workdir / "FLEET.toml"),
           "--port", str(port), "--usage-db", str(workdir / "usage.sqlite")]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        t = time.perf_counter()
        wait_ready(f"http://127.0.0.1:{port}", 600, alive=lambda: proc.poll() is None)
        print(f"{layout}: 7 instances up in {time.perf_counter() - t:.0f} s", file=sys.stderr)
        result = asyncio.run(drive(f"http://127.0.0.1:{port}", args))
        health = httpx.get(f"http://127.0.0.1:{port}/v1/health/instances").json()["instances"]
        result["instances"] = {h["instance"]: {k: h[k] for k in ("slice", "cores", "device_share",
                               "memory_cap_bytes", "memory_used_bytes")} for h in health}  # fmt: skip
        return result
    finally:
        proc.terminate()
        proc.wait(120)
        log.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--seconds", type=float, default=60.0, help="measured window per layout")
    p.add_argument("--large-cores", type=int, default=1, help="cores the large instance gets when partitioned")  # fmt: skip
    p.add_argument("--large-streams", type=int, default=2, help="long completions in flight at once")  # fmt: skip
    p.add_argument("--large-prompt", type=int, default=512, help="words in the large prompt (about)")  # fmt: skip
    p.add_argument("--large-tokens", type=int, default=512)
    p.add_argument("--small-every", type=float, default=3.0, help="seconds between one small instance's requests")  # fmt: skip
    p.add_argument("--layouts", default=",".join(LAYOUTS))
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    cores = sorted(os.sched_getaffinity(0))
    results = {"machine": {"cores": cores, "cpu": _cpu_name()}, "args": vars(args) | {"out": str(args.out)}}  # fmt: skip
    for layout in args.layouts.split(","):
        results[layout] = run_layout(layout, cores, args)
    rows = [("layout", "small TTFT p50", "p99", "max", "small e2e p99", "large tok/s",
             "small tok/s (sum)", "utilization")]  # fmt: skip
    for layout in args.layouts.split(","):
        r = results[layout]
        rows.append((layout, f"{r['small_ttft_p50_ms']:.0f} ms", f"{r['small_ttft_p99_ms']:.0f} ms",
                     f"{r['small_ttft_max_ms']:.0f} ms", f"{r['small_e2e_p99_ms']:.0f} ms",
                     f"{r['large_tokens_per_s']:.1f}", f"{sum(r['small_tokens_per_s'].values()):.1f}",
                     f"{r['utilization']:.0%}"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "?"


if __name__ == "__main__":
    main()
