"""Offline throughput and batch-1 latency of tokenmill and of `transformers.generate`, on one
workload of random token prompts (as vLLM's `random` dataset), greedy, EOS ignored."""

from __future__ import annotations

import platform
import random
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Workload:
    num_prompts: int = 64
    input_len: int = 128
    output_len: int = 128
    seed: int = 0

    def prompts(self, vocab_size: int, low: int = 100) -> list[list[int]]:
        rng = random.Random(self.seed)
        return [
            [rng.randrange(low, vocab_size) for _ in range(self.input_len)]
            for _ in range(self.num_prompts)
        ]


@dataclass(frozen=True)
class Result:
    engine: str
    output_tokens_per_s: float
    seconds: float


def machine() -> str:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in open("/proc/cpuinfo")
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu}, {torch.get_num_threads()}+ threads avail{gpu}, torch {torch.__version__}"


def commit() -> str:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except Exception:
        return "unknown"


def memory_bandwidth_gbs(
    size_mb: int = 512, repeats: int = 5, device: str | torch.device = "cpu"
) -> dict[str, float]:
    """Median copy (read + write counted) and read-only (sum) bandwidth of a large buffer."""
    a = torch.ones(size_mb * 2**20 // 4, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    sync = torch.cuda.synchronize if a.is_cuda else (lambda: None)
    copy, read = [], []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        b.copy_(a)
        sync()
        copy.append(2 * a.numel() * 4 / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        a.sum()
        sync()
        read.append(a.numel() * 4 / (time.perf_counter() - t) / 1e9)
    return {"copy": statistics.median(copy), "read": statistics.median(read)}


def run_tokenmill(llm, prompts: list[list[int]], output_len: int) -> Result:
    from tokenmill import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    t = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=True)
    dt = time.perf_counter() - t
    n = sum(len(o.outputs[0].token_ids) for o in outs)
    return Result("tokenmill", n / dt, dt)


def tokenmill_decode_tps(llm, prompt: list[int], output_len: int) -> tuple[float, float]:
    """Batch-1 (decode tokens/s, TTFT seconds) from the engine's own request metrics."""
    from tokenmill import SamplingParams

    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    return 1.0 / out.metrics.tpot, out.metrics.ttft


def run_hf(model, prompts: list[list[int]], output_len: int, pad_id: int) -> Result:
    """transformers.generate on the whole batch at once (equal lengths: no padding needed)."""
    ids = torch.tensor(prompts, device=model.device)
    t = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=output_len,
            min_new_tokens=output_len,
            do_sample=False,
            pad_token_id=pad_id,
        )
    _sync(model.device)
    dt = time.perf_counter() - t
    return Result("transformers", (out.shape[1] - ids.shape[1]) * ids.shape[0] / dt, dt)


def hf_decode_tps(model, prompt: list[int], output_len: int, pad_id: int) -> float:
    """Batch-1 decode tokens/s: (time for output_len tokens - time for 1) / (output_len - 1)."""
    ids = torch.tensor([prompt], device=model.device)
    kw = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=pad_id)
    with torch.inference_mode():
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kw)
        _sync(model.device)
        first = time.perf_counter() - t
        t = time.perf_counter()
        model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, **kw)
        _sync(model.device)
        full = time.perf_counter() - t
    return (output_len - 1) / (full - first)


def touch_kv_cache(llm) -> None:
    """Write the whole KV pool once, so that later figures are those of a warm server and leave
    out the first-touch page faults of never-used blocks (the pool is allocated lazily)."""
    for cache in llm.engine.runner.kv_caches:
        for t in cache if isinstance(cache, tuple) else (cache,):
            t.zero_()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def as_dict(r: Result) -> dict:
    return asdict(r)
