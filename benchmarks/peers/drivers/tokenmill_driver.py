"""tokenmill's offline engine (variant: float32 | bfloat16 | METHOD/DTYPE, e.g. nvfp4/bfloat16 for
--quantization nvfp4 over bf16 activations)."""

from __future__ import annotations

import time

from common import load_workload, parse, timed, write

args = parse()
w = load_workload(args.workload)
t0 = time.perf_counter()
import tokenmill  # noqa: E402
from tokenmill import LLM, SamplingParams  # noqa: E402

method, _, dtype = args.variant.rpartition("/")
llm = LLM(
    args.model,
    dtype=dtype,
    quantization=method or None,
    num_threads=args.threads,
    max_model_len=1024,
)
startup = time.perf_counter() - t0
n = w["output_len"]
params = SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)
prompts = [{"prompt_token_ids": p} for p in w["offline"]]
llm.generate([{"prompt_token_ids": p[::-1]} for p in w["offline"][:8]], params, use_tqdm=False)
outs, dt = timed(lambda: llm.generate(prompts, params, use_tqdm=False))
tokens = sum(len(o.outputs[0].token_ids) for o in outs)
lat = []
m = w["latency_output_len"]
for p in w["latency"]:
    o = llm.generate(
        [{"prompt_token_ids": p}],
        SamplingParams(max_tokens=m, temperature=0, ignore_eos=True),
        use_tqdm=False,
    )[0]
    lat.append((o.metrics.ttft, 1.0 / o.metrics.tpot))
write(args, "tokenmill", tokenmill.__version__, startup, tokens, dt, lat)
