"""The decode-step breakdown: every part timed, nothing left patched afterwards."""

from __future__ import annotations

import pytest

from tokenmill import LLM
from tokenmill.bench.breakdown import LOOP, PARTS, decode_breakdown
from tokenmill.bench.offline import touch_kv_cache
from tokenmill.layers.linear import Linear

FUSED = {"attention (gather + SDPA)", "KV write", "silu * up (+ rotation)"} | {
    "linear layers",
    "rotary",
    "silu * up",
}  # each decoder layer's halves fused at decode sizes: their parts are not called


@pytest.mark.parametrize(
    "backend,looped,unused",
    [
        (
            "torch",
            True,
            {"attention (native)", "KV write (native)", "silu * up (+ rotation)", LOOP}
            | {"fused norm + q/k/v + rotary", "fused o_proj .. down"},
        ),
        ("native", False, FUSED | {LOOP}),
        (  # and the layers as one call: the halves and attention inside it are one part
            "native",
            True,
            FUSED
            | {"fused norm + q/k/v + rotary", "fused o_proj .. down"}
            | {"attention (native)", "KV write (native)"},
        ),
    ],
)
def test_breakdown_times_decode_steps_and_restores_the_model(
    tiny_model_dir, backend, looped, unused
):
    llm = LLM(
        tiny_model_dir("llama"),
        dtype="float32",
        kv_cache_memory=1 << 22,
        cpu_kernels=backend,
    )
    touch_kv_cache(llm)  # every KV byte written once (zeros), nothing else changes
    assert all(not c.any() for c in llm.engine.runner.kv_caches)
    forward = Linear.forward
    loop = llm.engine.runner.model.decode_layers
    wall, parts = decode_breakdown(llm, [[5, 6, 7, 8, 9], [10, 11, 12]], steps=4, looped=looped)
    assert Linear.forward is forward  # unpatched
    assert llm.engine.runner.model.decode_layers is loop
    assert set(parts) == {label for *_, label in PARTS} - unused
    assert all(ms > 0 for ms in parts.values())
    assert sum(parts.values()) < wall  # parts are inside the step
    assert not llm.engine.has_unfinished() and llm.engine.kv.pool.num_used_blocks == 0
