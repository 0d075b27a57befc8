"""KV tiers in the engine: with a device pool far too small for the conversations, a host or
disk tier gives exactly the outputs of an unlimited pool (the blocks come back bit-identical),
with n > 1, seeded sampling, preemption and a quantized KV cache; a restart finds the disk tier
warm; corrupt files are recomputed; an abort while loading leaks nothing."""

from __future__ import annotations

import functools
import threading

import pytest

from tokenmill.config import EngineConfig
from tokenmill.engine.engine import LLMEngine
from tokenmill.sampling_params import SamplingParams

BLOCK = 2 * 2 * 2 * 16 * 4 * 4  # layers x K/V x kv heads x head dim x fp32 x 4 tokens: 2 KiB
INT8_BLOCK = 2 * 2 * 2 * (16 + 4) * 4  # int8 codes and an fp32 scale per head and token
SMALL = 28 * BLOCK  # a quarter of the blocks the conversations reuse
OPTIONS = dict(dtype="float32", block_size=4, max_num_batched_tokens=64, max_num_seqs=4,
               max_model_len=100)  # fmt: skip
PARAMS = [
    SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1),
    SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True, n=2, logprobs=0),
]
SYSTEM = [(7 * i + 3) % 200 for i in range(40)]


def conversations(turns: int = 3, chats: int = 6) -> list[list[tuple[str, list[int]]]]:
    """Per turn, each chat's prompt: the shared system prompt, then its growing history."""
    return [
        [
            (f"t{t}c{c}", SYSTEM + [(11 * c + j) % 200 for j in range(8 * (t + 1))])
            for c in range(chats)
        ]  # fmt: skip
        for t in range(turns)
    ]


def run(model: str, turns=None, parallel: bool = False, **options) -> tuple[dict, LLMEngine]:
    config = EngineConfig.from_kwargs(model=model, **{**OPTIONS, **options})
    if parallel:
        from tokenmill.executor.multiproc import MultiprocExecutor
        from tokenmill.models.loader import load_tokenizer

        engine = LLMEngine(config, executor=MultiprocExecutor(config), tokenizer=load_tokenizer(model))  # fmt: skip
    else:
        engine = LLMEngine(config)
    out = {}
    engine.cached_tokens = 0  # prompt tokens served from the pool or a tier, over all requests
    try:
        for turn in turns or conversations():
            for i, (rid, ids) in enumerate(turn):
                engine.add_request(rid, ids, PARAMS[i % len(PARAMS)])
            while engine.has_unfinished():
                for o in engine.step():
                    if o.finished:
                        out[o.request_id] = [(c.token_ids, c.logprobs) for c in o.outputs]
                        engine.cached_tokens += o.num_cached_tokens
        assert engine.kv.pool.num_used_blocks == 0  # nothing leaked
        tiers = engine.kv.tiers
        assert tiers is None or not (tiers.host.pins or tiers.disk.pins or engine.kv._loading)
    finally:
        engine.core.shutdown()
    return out, engine


@functools.cache
def reference(model: str, kv_cache_dtype: str, max_num_seqs: int) -> dict:
    return run(model, kv_cache_memory=800 * BLOCK, kv_cache_dtype=kv_cache_dtype,
               max_num_seqs=max_num_seqs)[0]  # fmt: skip


TIERS = {
    "host": dict(kv_host_memory=600 * BLOCK),
    "small host + disk": dict(kv_host_memory=20 * BLOCK, kv_disk_memory=1 << 24),
    "disk only": dict(kv_disk_memory=1 << 24),
}


def tiered(model: str, tmp_path, tiers: str, **options) -> tuple[dict, LLMEngine]:
    """28 device blocks: a quarter of what the conversations reuse."""
    options = {**TIERS[tiers], **options}
    if "kv_disk_memory" in options:
        options["kv_disk_dir"] = str(tmp_path)
    per_block = INT8_BLOCK if options.get("kv_cache_dtype") == "int8" else BLOCK
    return run(model, kv_cache_memory=28 * per_block, **options)


@pytest.mark.parametrize("tiers", list(TIERS))
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_tiers_give_the_outputs_of_an_unlimited_pool_bit_for_bit(
    tiny_model_dir, tmp_path, tiers, kv_cache_dtype
):
    """One sequence at a time, so both runs compute the same tokens in the same steps: any
    difference would be a block that came back changed."""
    if kv_cache_dtype == "int8" and tiers != "small host + disk":
        pytest.skip("one quantized configuration covers the (codes, scales) blocks")
    model = str(tiny_model_dir("llama"))
    out, engine = tiered(model, tmp_path, tiers, kv_cache_dtype=kv_cache_dtype, max_num_seqs=1)
    assert out == reference(model, kv_cache_dtype, 1)  # tokens and logprobs, bit for bit
    assert sum(t.blocks_out for t in engine.core.stats().kv_tiers) > 10  # prefixes came back


@pytest.mark.parametrize("tiers", ["host", "small host + disk"])
def test_tiers_under_preemption_and_n_gt_1(tiny_model_dir, tmp_path, tiers):
    """Four at a time: the small pool preempts (a resumed request recomputes its outputs in
    a prefill, which rounds differently), so tokens are equal and logprobs close."""
    model = str(tiny_model_dir("llama"))
    out, engine = tiered(model, tmp_path, tiers)
    expected = reference(model, "auto", 4)
    assert engine.core.stats().num_preemptions > 0
    assert_close(out, expected)


def assert_close(out: dict, expected: dict) -> None:
    """Tokens equal, logprobs within float32 rounding of a differently chunked prefill."""
    assert out.keys() == expected.keys()
    for rid, seqs in out.items():
        for (tokens, lps), (ref_tokens, ref_lps) in zip(seqs, expected[rid], strict=True):
            assert tokens == ref_tokens, rid
            for a, b in zip(lps, ref_lps, strict=True):
                assert a.keys() == b.keys()
                assert all(abs(a[k] - b[k]) < 1e-4 for k in a)


def test_a_restart_finds_the_disk_tier_warm(tiny_model_dir, tmp_path):
    model = str(tiny_model_dir("llama"))
    options = dict(kv_cache_memory=SMALL, kv_disk_dir=str(tmp_path), kv_disk_memory=1 << 24)  # fmt: skip
    first = conversations()
    run(model, first, **options)
    # the server restarts; the last turn's conversations come back
    again = [[(f"again-{rid}", ids) for rid, ids in first[-1]]]
    cold, cold_engine = run(model, again, kv_cache_memory=SMALL)
    warm, warm_engine = run(model, again, **options)
    assert_close(warm, cold)  # the prefix was computed in other chunks by the first run
    (disk,) = warm_engine.core.stats().kv_tiers
    assert disk.hits >= 6 and disk.blocks_out >= 6
    assert cold_engine.cached_tokens == 5 * 40  # the system prompt, after the first
    assert warm_engine.cached_tokens == 6 * 60  # every prompt but its last block (and token)


def test_corrupt_files_are_recomputed(tiny_model_dir, tmp_path, caplog):
    model = str(tiny_model_dir("llama"))
    options = dict(kv_cache_memory=SMALL, kv_disk_dir=str(tmp_path), kv_disk_memory=1 << 24)  # fmt: skip
    first = conversations()
    run(model, first, **options)
    files = sorted(tmp_path.glob("*/*.kvb"))
    for f in files:  # flip one byte in the data of every file
        data = bytearray(f.read_bytes())
        data[-1] ^= 0x01
        f.write_bytes(bytes(data))
    again = [[(f"again-{rid}", ids) for rid, ids in first[-1]]]
    cold, _ = run(model, again, kv_cache_memory=SMALL)
    out, _ = run(model, again, **options)
    assert_close(out, cold)
    assert "checksum mismatch" in caplog.text


def test_an_abort_while_loading_frees_everything(tiny_model_dir, monkeypatch):
    from tokenmill.kv.storage.mover import TierStorage

    gate = threading.Event()  # loads wait here: the requests stay "loading" until it opens
    load = TierStorage._load
    monkeypatch.setattr(TierStorage, "_load", lambda self, loads: gate.wait(10) and load(self, loads))  # fmt: skip
    model = str(tiny_model_dir("llama"))
    options = dict(kv_cache_memory=SMALL, kv_host_memory=600 * BLOCK)
    engine = LLMEngine(EngineConfig.from_kwargs(model=model, **{**OPTIONS, **options}))
    turns = conversations()
    params = PARAMS[0]
    gate.set()
    for rid, ids in turns[0] + turns[1]:
        engine.add_request(rid, ids, params)
    while engine.has_unfinished():
        engine.step()
    gate.clear()
    for rid, ids in turns[2]:
        engine.add_request(rid, ids, params)
    for _ in range(3):
        engine.step()
    loading = sorted(engine.core.scheduler.loading)
    assert loading  # their prefixes are on the host tier, the loads held at the gate
    engine.abort(loading)
    gate.set()
    while engine.has_unfinished():
        engine.step()
    assert engine.kv.pool.num_used_blocks == 0 and engine.kv.num_loads_in_flight == 0
    assert not engine.kv.tiers.host.pins
    engine.core.shutdown()


def test_a_host_tier_under_tensor_parallelism(tiny_model_dir):
    """Two ranks, each with its half of every block in its own host tier (loads finish inside
    the step, so no rank reads a block another has not loaded yet)."""
    model = str(tiny_model_dir("llama"))
    out, engine = run(model, parallel=True, tensor_parallel_size=2, max_num_seqs=1,
                      kv_cache_memory=SMALL // 2, kv_host_memory=600 * BLOCK // 2)  # fmt: skip
    assert engine.kv.pool.num_blocks == 28
    assert_close(out, reference(model, "auto", 1))
    assert engine.core.stats().kv_tiers[0].blocks_out > 10


@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2), dict(pipeline_parallel_size=2)])
def test_a_disk_tier_under_tensor_and_pipeline_parallelism(tiny_model_dir, tmp_path, layout):
    """Each rank keeps its shard of every block in its own directory: outputs as without
    tiers, a restart finds every rank's files warm, a block one rank lost (a file gone, one
    corrupt) is recomputed and dropped on every rank, never half-loaded."""
    model = str(tiny_model_dir("llama"))
    options = dict(parallel=True, max_num_seqs=1, kv_cache_memory=SMALL // 2,
                   kv_disk_dir=str(tmp_path), kv_disk_memory=1 << 22, **layout)  # fmt: skip
    if "pipeline_parallel_size" in layout:  # a stage holds half the layers, all the heads
        options["kv_cache_memory"] = SMALL // 2
    first = conversations()
    out, engine = run(model, first, **options)
    assert_close(out, reference(model, "auto", 1))
    (disk,) = engine.core.stats().kv_tiers
    assert disk.blocks_out > 10
    size = layout.get("tensor_parallel_size", 1) * layout.get("pipeline_parallel_size", 1)
    dirs = sorted(p for p in tmp_path.iterdir() if p.is_dir())
    assert [d.name for d in dirs] == [
        f"rank{r}-tp{layout.get('tensor_parallel_size', 1)}-pp{layout.get('pipeline_parallel_size', 1)}"
        for r in range(size)
    ]  # fmt: skip
    files = [sorted(p.name for p in d.glob("*/*.kvb")) for d in dirs]
    assert files[0] == files[1] and len(files[0]) > 20  # every rank wrote every block
    # rank 1 has the file of the system prompt's third block corrupt, and loses five others
    from tokenmill.kv.manager import hash_block

    chain = [b""]
    for i in range(3):
        chain.append(hash_block(chain[-1], SYSTEM[4 * i : 4 * i + 4]))
    (corrupt,) = dirs[1].glob(f"*/{chain[3].hex()}.kvb")
    rank1 = [f for f in sorted(dirs[1].glob("*/*.kvb")) if f != corrupt]
    lost = {f.name for f in rank1[:5]}
    for f in rank1[:5]:
        f.unlink()
    data = bytearray(corrupt.read_bytes())
    data[-1] ^= 0x01
    corrupt.write_bytes(bytes(data))
    run(model, [[]], **options)  # a start: blocks some ranks lack are dropped from all ranks
    assert not lost & {p.name for p in dirs[0].glob("*/*.kvb")}
    again = [[(f"again-{rid}", ids) for rid, ids in first[-1]]]
    cold, cold_engine = run(model, again, parallel=True, max_num_seqs=1, kv_cache_memory=options["kv_cache_memory"], **layout)  # fmt: skip
    warm, warm_engine = run(model, again, **options)
    assert_close(warm, cold)  # the corrupt shard was not loaded: its block was recomputed
    (disk,) = warm_engine.core.stats().kv_tiers
    assert disk.hits >= 6 and warm_engine.cached_tokens > cold_engine.cached_tokens
    # the corrupt file is gone, or written whole again at shutdown
    assert not corrupt.exists() or corrupt.read_bytes() != bytes(data)
    after = [{p.name for p in d.glob("*/*.kvb")} for d in dirs]
    assert after[0] == after[1]


def test_a_host_tier_larger_than_the_machine_is_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="kv_host_memory asks for .* GiB available"):
        run(str(tiny_model_dir("llama")), kv_host_memory=1 << 50)


@pytest.mark.parametrize("tier_dtype", ["int8", "fp8_e4m3"])
def test_a_compressed_tier_holds_more_blocks_and_stays_close(tiny_model_dir, tmp_path, tier_dtype):
    """kv_tier_dtype int8 / fp8: the same host bytes hold 3.2x the blocks of this fp32 model
    (head_dim 16), through host and disk; blocks come back rounded, so outputs are close to the
    unlimited pool's rather than equal."""
    model = str(tiny_model_dir("llama"))
    out, engine = tiered(
        model, tmp_path, "small host + disk", kv_tier_dtype=tier_dtype, max_num_seqs=1,
        kv_host_memory=6 * BLOCK,
    )  # fmt: skip
    host, disk = engine.core.stats().kv_tiers
    assert host.num_blocks == 6 * BLOCK // INT8_BLOCK and host.bytes_per_block == INT8_BLOCK
    assert host.blocks_out + disk.blocks_out > 10 and disk.blocks_out > 0
    expected = reference(model, "auto", 1)
    worst, flips = 0.0, 0
    for rid, seqs in out.items():
        for (tokens, lps), (ref_tokens, ref_lps) in zip(seqs, expected[rid], strict=True):
            for t, r, a, b in zip(tokens, ref_tokens, lps, ref_lps):
                if t != r:  # a near-tie that rounding flipped: the rest of the sequence differs
                    flips += 1
                    break
                worst = max(worst, abs(a[t] - b[r]))
    # measured: int8 0 flips, 0.005 nats; fp8 (3 mantissa bits) 1 flip, 0.021; every K and V
    # value 5% too large gives 3-4 flips and 0.06-0.07
    limit = {"int8": (1, 0.015), "fp8_e4m3": (2, 0.04)}[tier_dtype]
    assert flips <= limit[0] and worst < limit[1], (flips, worst)


def test_scoring_after_a_tier_round_trip_and_the_eval_command(tiny_model_dir, tmp_path, capsys):
    """`runner.score` with a tier: the history's blocks go down and back through the tier's own
    code; an exact tier changes nothing, int8 only what is computed over the history; and
    `tokenmill eval perplexity --kv-tier-dtype` scores the tokens after it against exact."""
    import json

    import torch

    from tokenmill import LLM
    from tokenmill.cli import main

    model = str(tiny_model_dir("llama"))
    llm = LLM(model=model, dtype="float32", block_size=4, kv_cache_memory=1 << 20)
    ids = [(13 * i + 5) % 300 for i in range(40)]
    runner = llm.engine.runner
    plain, exact, int8 = (
        runner.score(ids),
        runner.score(ids, "auto", 24),
        runner.score(ids, "int8", 24),
    )
    assert torch.allclose(plain, exact, atol=1e-5)
    assert torch.equal(int8[:24], exact[:24])
    gap = (int8[24:].log_softmax(-1) - exact[24:].log_softmax(-1)).abs().max().item()
    assert 0 < gap < 0.05
    with pytest.raises(ValueError, match="whole blocks"):
        runner.score(ids, "int8", 22)

    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    argv = ["eval", "perplexity", "--model", model, "--dataset", str(text), "--window", "64"]
    argv += ["--max-windows", "3", "--json", "--dtype", "float32", "--block-size", "4"]
    assert main([*argv, "--kv-tier-dtype", "int8", "--history", "32"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["kv_tier_dtype"] == "int8" and out["history"] == 32
    assert out["num_tokens"] == 3 * (64 - 1 - 32)  # only the tokens after the history
    assert out["perplexity"] != out["reference_perplexity"]
    assert abs(out["ppl_change_pct"]) < 5
    assert main([*argv, "--kv-tier-dtype", "int8", "--history", "30"]) == 2  # not whole blocks
