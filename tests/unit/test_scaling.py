"""The interconnect model (tokenmill/bench/scaling.py) against numbers worked by hand, and the
published shapes' weight counts against their model cards."""

from __future__ import annotations

import pytest

from tokenmill.bench.scaling import (
    Device,
    Link,
    Shape,
    allreduce_s,
    efficiency,
    link_for,
    load_catalog,
    ring_allreduce_s,
    step,
    sweep,
    tree_allreduce_s,
)  # fmt: skip

# 2 layers of hidden 4: q, k, v, o 4x4 each, gate/up/down 4x8: 160 weights a layer; a tied
# 10 x 4 embedding: 360 weights, one byte each
TOY = Shape("toy", hidden=4, layers=2, heads=1, kv_heads=1, head_dim=4, intermediate=8,
            vocab=10, tied=True, weight_bytes=1.0)  # fmt: skip
DEV = Device("dev", flops=1000.0, bandwidth=100.0, memory=1e9, compute_efficiency=1.0,
             bandwidth_efficiency=1.0)  # fmt: skip
LINK = Link("l", bandwidth=10.0, latency=1e-3, domain=8, between="slow")
SLOW = Link("slow", bandwidth=1.0, latency=1e-2)
LINKS = {"l": LINK, "slow": SLOW}


def test_the_toy_by_hand():
    assert TOY.layer_weights == 160 and TOY.weights == 360
    one = step(TOY, DEV, LINK, LINKS, mode="decode", batch=1, context=10)
    # bytes: 360 weights + KV 10 tokens x 2 layers x (K+V) x 4 dims x 2 bytes = 320 -> 6.8 s
    # (FLOPs 2 x 360 + attention 4 x 10 x 4 x 2 = 1040 -> 1.04 s: memory-bound)
    assert one.step_s == pytest.approx(6.8) and one.comm_share == 0.0
    tp = step(TOY, DEV, LINK, LINKS, tp=2, mode="decode", batch=1, context=10)
    # half the weights (180) + the KV (one KV head: replicated, 320) = 5.0 s; per layer two
    # ring all-reduces of 8 bytes: 2 x 1/2 x 8 / 10 + 2 x 1 x 1 ms = 0.802 s -> 4 x 0.802
    assert tp.allreduce_s == pytest.approx(4 * 0.802)
    assert tp.step_s == pytest.approx(5.0 + 3.208)
    assert efficiency(one, tp) == pytest.approx(6.8 / (2 * 8.208))
    pp = step(TOY, DEV, LINK, LINKS, pp=2, mode="decode", batch=1, context=10)
    # a stage: 180 weights + its layer's KV 160 = 3.4 s, a send 8 / 10 + 1 ms; one
    # micro-batch through two stages: two slots, one of them a bubble
    assert pp.microbatches == 1
    assert pp.step_s == pytest.approx(2 * (3.4 + 0.801))
    assert pp.bubble_s == pytest.approx(3.4 + 0.801)
    assert pp.comm_share == pytest.approx((0.801 + 4.201) / 8.402)


def test_micro_batches_fill_the_pipeline_and_reread_weights():
    """Decode of 4 sequences on pp=2: two micro-batches, each reading the stage's weights again
    (180 bytes) and half the batch's KV; interleaved across steps (a serving engine) two slots
    and no bubble, drained every step (sync) three slots, one a bubble."""
    s = step(TOY, DEV, LINK, LINKS, pp=2, mode="decode", batch=4, context=10)
    assert s.microbatches == 2
    stage = (180 + 4 * 10 * 16 / 2) / 100  # 180 weights + 2 sequences' KV of one layer
    send = 2 * 4 * 2 / 10 + 1e-3
    assert s.step_s == pytest.approx(2 * (stage + send)) and s.bubble_s == 0.0
    sync = step(TOY, DEV, LINK, LINKS, pp=2, mode="decode", batch=4, context=10, schedule="sync")
    assert sync.step_s == pytest.approx(3 * (stage + send))
    assert sync.bubble_s == pytest.approx(stage + send)


def test_prefill_is_compute_bound_and_attends_half_the_context():
    s = step(TOY, DEV, LINK, LINKS, mode="prefill", batch=1, context=100)
    flops = 2 * 360 * 100 + 4 * 50 * 4 * 2 * 100
    assert s.step_s == pytest.approx(flops / 1000) and s.tokens == 100


def test_past_its_domain_a_ring_runs_at_the_next_links_pace():
    assert link_for(8, LINK, LINKS) is LINK and link_for(9, LINK, LINKS) is SLOW
    assert ring_allreduce_s(100.0, 4, LINK) == pytest.approx(2 * 3 / 4 * 100 / 10 + 6e-3)
    assert tree_allreduce_s(100.0, 4, LINK) == pytest.approx(2 * 2 * 1e-3 + 2 * 100 / 10)
    assert ring_allreduce_s(100.0, 1, LINK) == 0.0
    # small messages: the tree's 2 log2(p) latencies beat the ring's 2 (p - 1)
    fast = Link("fast", bandwidth=1e12, latency=1e-3, domain=8)
    assert allreduce_s(8.0, 8, fast, {}) == pytest.approx(tree_allreduce_s(8.0, 8, fast))
    # 16 chips, domains of 8: reduce-scatter + all-gather inside (7/8 x 800 / 10 + 7 ms, twice)
    # and the 100-byte shards all-reduced between the two domains on the slow link
    inside = 7 / 8 * 800 / 10 + 7e-3
    between = min(ring_allreduce_s(100.0, 2, SLOW), tree_allreduce_s(100.0, 2, SLOW))
    assert allreduce_s(800.0, 16, LINK, LINKS) == pytest.approx(2 * inside + between)
    with pytest.raises(ValueError, match="names no link past it"):
        lonely = Link("lonely", 1.0, 0.0, domain=1)
        link_for(2, lonely, {"lonely": lonely})


def test_published_shapes_count_their_weights():
    models = load_catalog()["models"]
    assert models["llama-3.1-8b"].weights / 1e9 == pytest.approx(8.03, abs=0.01)
    assert models["llama-3.1-70b"].weights / 1e9 == pytest.approx(70.55, abs=0.05)
    assert models["llama-3.1-405b"].weights / 1e9 == pytest.approx(405.8, abs=0.5)
    assert models["smollm2-135m"].weights / 1e6 == pytest.approx(134.5, abs=0.1)


def test_scaling_on_nvlink_beats_pcie_and_tp_stops_at_the_node():
    c = load_catalog()
    shape, h100, links = c["models"]["llama-3.1-70b"], c["devices"]["h100"], c["links"]
    rows = {(r["parallelism"], r["chips"]): r for r in sweep(
        shape, h100, links["nvlink4"], links, [1, 2, 4, 8, 16], mode="decode", batch=32,
        context=4096)}  # fmt: skip
    pcie = {(r["parallelism"], r["chips"]): r for r in sweep(
        shape, h100, links["pcie5"], links, [8], mode="decode", batch=32, context=4096)}  # fmt: skip
    assert rows[("tp", 8)]["efficiency"] > pcie[("tp", 8)]["efficiency"]
    assert rows[("tp", 16)]["link"] == "ib-ndr"  # two nodes
    assert rows[("tp", 16)]["efficiency"] < rows[("tp", 8)]["efficiency"]
    # 141 GB of bf16 weights and 43 GB of KV (32 x 4096 tokens): four H100s hold them, two do not
    assert not rows[("tp", 2)]["fits"] and rows[("tp", 4)]["fits"]
    assert rows[("tp", 1)]["efficiency"] == pytest.approx(1.0)


def test_bench_scaling_prints_tables_json_and_a_plot(tmp_path, capsys, tiny_model_dir):
    import json

    from tokenmill.cli import main

    plot = tmp_path / "eff.png"
    assert main(["bench", "scaling", "--model", "llama-3.1-8b", "--links", "nvlink4,pcie5",
                 "--chips", "1,2,8", "--plot", str(plot)]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "nvlink4        tp       8" in out and plot.read_bytes()[:4] == b"\x89PNG"
    folder = str(tiny_model_dir("llama"))  # an HF folder's config.json as the shape
    assert main(["bench", "scaling", "--model", folder, "--device", "cpu-2core", "--links",
                 "gloo-loopback", "--chips", "1,2", "--mode", "prefill", "--json"]) == 0  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert [r["chips"] for r in data["links"]["gloo-loopback"]] == [1, 1, 2, 2]
    assert main(["bench", "scaling", "--device", "tpu-v9"]) == 2
    assert "the catalogue has" in capsys.readouterr().err
