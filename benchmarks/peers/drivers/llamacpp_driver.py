"""llama.cpp through llama-cpp-python's low-level API (llama.h), which batches many sequences
in one llama_decode: prompts prefilled n_batch tokens at a time, then one token per sequence
per step, greedy (argmax of the logits with EOS banned). Variant: the GGUF's type (q4_1, f32)."""

from __future__ import annotations

import ctypes
import time

import numpy as np
from common import load_workload, parse, write

args = parse()
w = load_workload(args.workload)
t0 = time.perf_counter()
import llama_cpp as lc  # noqa: E402

lc.llama_backend_init()
model = lc.llama_model_load_from_file(args.model.encode(), lc.llama_model_default_params())
vocab = lc.llama_model_get_vocab(model)
n_vocab = lc.llama_vocab_n_tokens(vocab)
eos = lc.llama_vocab_eos(vocab)
num = len(w["offline"])
n_batch = 2048
cp = lc.llama_context_default_params()
cp.n_ctx = num * 256
cp.n_batch = n_batch
cp.n_ubatch = 512
cp.n_seq_max = num
cp.n_threads = cp.n_threads_batch = args.threads
ctx = lc.llama_init_from_model(model, cp)
batch = lc.llama_batch_init(n_batch, 0, num)
startup = time.perf_counter() - t0


def submit(items: list[tuple[int, int, int, bool]]) -> None:
    """(token, position, sequence, wants logits) -> one llama_decode."""
    batch.n_tokens = len(items)
    for i, (tok, pos, seq, logits) in enumerate(items):
        batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, pos, 1
        batch.seq_id[i][0], batch.logits[i] = seq, logits
    if lc.llama_decode(ctx, batch) != 0:
        raise RuntimeError("llama_decode failed")


def argmax_rows(rows: int) -> list[int]:
    ptr = lc.llama_get_logits(ctx)
    logits = np.ctypeslib.as_array(
        ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), shape=(rows, n_vocab)
    )
    logits[:, eos] = -np.inf
    return logits.argmax(axis=1).tolist()


def generate(prompts: list[list[int]], n: int) -> tuple[int, float, float]:
    """Returns (tokens generated, seconds to the first token of all, seconds in total)."""
    lc.llama_memory_clear(lc.llama_get_memory(ctx), True)
    start = time.perf_counter()
    pending = [
        (t, p, s, p == len(ids) - 1) for s, ids in enumerate(prompts) for p, t in enumerate(ids)
    ]
    last: list[int] = []
    for i in range(0, len(pending), n_batch):
        chunk = pending[i : i + n_batch]
        submit(chunk)
        last += argmax_rows(sum(1 for c in chunk if c[3]))
    first = time.perf_counter() - start
    lens = [len(p) for p in prompts]
    for step in range(1, n):
        submit([(last[s], lens[s] + step - 1, s, True) for s in range(len(prompts))])
        last = argmax_rows(len(prompts))
    return n * len(prompts), first, time.perf_counter() - start


n = w["output_len"]
generate([p[::-1] for p in w["offline"][:8]], 8)  # warm-up
tokens, _, dt = generate(w["offline"], n)
lat = []
m = w["latency_output_len"]
for p in w["latency"]:
    _, ttft, total = generate([p], m)
    lat.append((ttft, (m - 1) / (total - ttft)))
write(args, "llama.cpp", lc.__version__, startup, tokens, dt, lat)
