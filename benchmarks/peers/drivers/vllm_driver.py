"""vLLM (CPU build; variant: float32 | bfloat16). Batch-1 TTFT and decode from vLLM's own
request metrics where it reports them, else from the time of 1 token and of n tokens."""

from __future__ import annotations

import os
import time

from common import latency_by_timing, load_workload, parse, timed, write

args = parse()
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
w = load_workload(args.workload)
t0 = time.perf_counter()
import vllm  # noqa: E402
from vllm import LLM, SamplingParams  # noqa: E402

# no prefix caching: the 1-token and n-token runs of a prompt must both prefill it
llm = LLM(args.model, dtype=args.variant, max_model_len=1024, seed=0, enable_prefix_caching=False)
startup = time.perf_counter() - t0
n = w["output_len"]


def run(prompts, k):
    params = SamplingParams(max_tokens=k, min_tokens=k, temperature=0, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


run([p[::-1] for p in w["offline"][:8]], 8)  # warm-up on other prompts
outs, dt = timed(lambda: run(w["offline"], n))
tokens = sum(len(o.outputs[0].token_ids) for o in outs)
lat = latency_by_timing(run, w["latency"], w["latency_output_len"])
write(args, "vllm", vllm.__version__, startup, tokens, dt, lat)
