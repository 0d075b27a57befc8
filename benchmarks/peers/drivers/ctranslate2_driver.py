"""CTranslate2 (variant: float32 | int8): the HF folder converted once with
ct2-transformers-converter (cached next to the workload)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from common import load_workload, parse, timed, write

args = parse()
w = load_workload(args.workload)
converted = os.path.join(os.path.dirname(os.path.abspath(args.workload)), f"ct2-{args.variant}")
if not os.path.exists(converted):
    subprocess.run(
        [
            os.path.join(os.path.dirname(sys.executable), "ct2-transformers-converter"),
            "--model",
            args.model,
            "--output_dir",
            converted,
            "--quantization",
            args.variant,
        ],
        check=True,
    )
t0 = time.perf_counter()
import ctranslate2  # noqa: E402
import transformers  # noqa: E402

tok = transformers.AutoTokenizer.from_pretrained(args.model)
gen = ctranslate2.Generator(
    converted, device="cpu", intra_threads=args.threads, compute_type=args.variant
)
startup = time.perf_counter() - t0


def tokens_of(p):
    return tok.convert_ids_to_tokens(p)


n = w["output_len"]
kw = dict(sampling_topk=1, include_prompt_in_result=False, end_token=[])
gen.generate_batch([tokens_of(p) for p in w["offline"][:8]], max_length=8, min_length=8, **kw)
res, dt = timed(
    lambda: gen.generate_batch(
        [tokens_of(p) for p in w["offline"]], max_length=n, min_length=n, **kw
    )
)
tokens = sum(len(r.sequences_ids[0]) for r in res)
lat = []
m = w["latency_output_len"]
for p in w["latency"]:
    t = time.perf_counter()
    first = None
    count = 0
    for _ in gen.generate_tokens(tokens_of(p), max_length=m, sampling_topk=1, end_token=[]):
        count += 1
        if first is None:
            first = time.perf_counter()
    end = time.perf_counter()
    lat.append((first - t, (count - 1) / (end - first)))
write(args, "ctranslate2", ctranslate2.__version__, startup, tokens, dt, lat)
