"""transformers.generate: one left-padded batch offline; batch-1 TTFT and decode from the time
of 1 token and of n tokens."""

from __future__ import annotations

import time

from common import latency_by_timing, load_workload, parse, timed, write

args = parse()
w = load_workload(args.workload)
t0 = time.perf_counter()
import torch  # noqa: E402
import transformers  # noqa: E402

torch.set_num_threads(args.threads)
model = transformers.AutoModelForCausalLM.from_pretrained(
    args.model, dtype=getattr(torch, args.variant)
).eval()
startup = time.perf_counter() - t0


def generate(prompts, n):
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    with torch.inference_mode():
        return model.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
            pad_token_id=0,
        )


n = w["output_len"]
generate(w["offline"][:8], 8)  # warm-up
out, dt = timed(lambda: generate(w["offline"], n))
tokens = (out.shape[1] - max(len(p) for p in w["offline"])) * out.shape[0]
lat = latency_by_timing(generate, w["latency"], w["latency_output_len"])
write(args, "transformers", transformers.__version__, startup, tokens, dt, lat)
