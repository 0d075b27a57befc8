"""Wall-clock breakdown of decode steps by part of the model (linear layers, attention, KV
writes, norms, rotary, activation, LM head, sampler), measured on decode-only steps after every
prompt is prefilled. Timers wrap the parts' Python entry points, so on CUDA (asynchronous) they
measure dispatch, not kernels: use it on CPU, and torch.profiler on GPUs. A part called inside
another (an untied LM head is a Linear) counts for the outer one, so parts never overlap. With
the native kernels a decoder layer's halves run fused at decode sizes (layers/fused_decode.py):
their linear layers, norms, rotary and SiLU * up then count as the two fused parts; and at
decode sizes the layers of a step run as one native call (layers/decode_layers.py), one part:
`looped=False` takes that call off for the run, so that the halves and attention show.
"""

from __future__ import annotations

import time
from collections import Counter
from contextlib import contextmanager

LOOP = "decoder layers, one native call"
PARTS = [  # (module, class, method, label)
    ("tokenmill.layers.decode_layers", "DecodeLayers", "__call__", LOOP),
    ("tokenmill.layers.fused_decode", "QKVBlock", "__call__", "fused norm + q/k/v + rotary"),
    ("tokenmill.layers.fused_decode", "MLPBlock", "__call__", "fused o_proj .. down"),
    ("tokenmill.layers.linear", "Linear", "forward", "linear layers"),
    ("tokenmill.layers.attention", "TorchAttention", "_decode", "attention (gather + SDPA)"),
    ("tokenmill.layers.cpu_attention", "NativeCpuAttention", "_decode", "attention (native)"),
    ("tokenmill.layers.attention", "TorchAttention", "write", "KV write"),
    ("tokenmill.layers.cpu_attention", "NativeCpuAttention", "write", "KV write (native)"),
    ("tokenmill.layers.norm", "RMSNorm", "forward", "RMSNorm (+ residual)"),
    ("tokenmill.layers.rotary", "RotaryEmbedding", "apply", "rotary"),
    ("tokenmill.layers.activation", "SiluAndMul", "forward", "silu * up"),
    ("tokenmill.layers.activation", "RotatedSiluAndMul", "forward", "silu * up (+ rotation)"),
    ("tokenmill.layers.embedding", "EmbeddingHead", "compute_logits", "LM head"),
    ("tokenmill.layers.sampler", "Sampler", "__call__", "sampler"),
]


@contextmanager
def timed_parts(totals: Counter):
    """Add each part's wall time to `totals` while the context is open."""
    import importlib

    saved = []
    depth = [0]  # parts inside parts (an untied LM head is a Linear) count for the outer one
    for module, cls_name, method, label in PARTS:
        cls = getattr(importlib.import_module(module), cls_name)
        raw = cls.__dict__[method]
        saved.append((cls, method, raw))
        setattr(cls, method, _timer(raw, label, totals, depth))
    try:
        yield
    finally:
        for cls, method, raw in saved:
            setattr(cls, method, raw)


def _timer(raw, label: str, totals: Counter, depth: list[int]):
    is_static = isinstance(raw, staticmethod)
    fn = raw.__func__ if is_static else raw

    def timed(*args, **kwargs):
        if depth[0]:
            return fn(*args, **kwargs)
        depth[0] += 1
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - t
            depth[0] -= 1

    return staticmethod(timed) if is_static else timed


def decode_breakdown(
    llm, prompts: list[list[int]], steps: int, looped: bool = True
) -> tuple[float, dict[str, float]]:
    """(wall ms per decode step, {part: ms per step}) over `steps` decode-only engine steps;
    `looped=False`: the decoder layers called one by one from Python for the run."""
    model = llm.engine.runner.model
    loop = getattr(model, "decode_layers", None)
    if not looped and loop is not None:
        model.decode_layers = None
    try:
        return _breakdown(llm, prompts, steps)
    finally:
        if loop is not None:
            model.decode_layers = loop


def _breakdown(llm, prompts: list[list[int]], steps: int) -> tuple[float, dict[str, float]]:
    from tokenmill import SamplingParams

    engine = llm.engine
    params = SamplingParams(max_tokens=steps + 2, temperature=0, ignore_eos=True)
    for i, ids in enumerate(prompts):
        engine.add_request(f"breakdown-{i}", {"prompt_token_ids": ids}, params)
    while any(
        r.num_output_tokens == 0 for r in [*engine.scheduler.running, *engine.scheduler.waiting]
    ):
        engine.step()  # prefill (chunked) until every request decodes
    totals: Counter = Counter()
    with timed_parts(totals):
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        wall = time.perf_counter() - t
    while engine.has_unfinished():
        engine.step()
    return wall / steps * 1e3, {k: v / steps * 1e3 for k, v in totals.most_common()}
