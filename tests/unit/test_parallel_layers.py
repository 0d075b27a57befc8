"""Tensor-parallel layers (tokenmill/layers/parallel.py) on two Gloo ranks against the same
layers unsharded: merged q/k/v with replicated KV heads, an MLP (column gate/up, row down with a
bias), a vocabulary-parallel embedding and LM head (tied and not) over a vocabulary the size
does not divide. Every rank loads the whole checkpoint tensors through the weight loaders."""

from __future__ import annotations

import socket
import traceback

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from tokenmill.layers.parallel import (
    ColumnParallelLinear,
    ParallelLMHead,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from tokenmill.parallel.group import SINGLE, TPGroup, init_group, kv_split, split


def _checks(group: TPGroup) -> None:
    torch.manual_seed(0)  # the same checkpoint on every rank
    r, n = group.rank, group.size
    hidden, heads, kv_heads, hd, inter, vocab = 8, 6, 1, 4, 16, 11
    wq, wk, wv = torch.randn(heads * hd, hidden), torch.randn(kv_heads * hd, hidden), torch.randn(kv_heads * hd, hidden)  # fmt: skip
    bq, bk, bv = torch.randn(heads * hd), torch.randn(kv_heads * hd), torch.randn(kv_heads * hd)
    x = torch.randn(5, hidden)
    qkv = ColumnParallelLinear.qkv(hidden, heads, kv_heads, hd, group, bias=True)
    for i, (w, b) in enumerate(((wq, bq), (wk, bk), (wv, bv))):
        qkv.weight_loader(qkv.weight, w, i)
        qkv.weight_loader(qkv.bias, b, i)
    qkv.quant_method.process_weights_after_loading(qkv)
    y = qkv(x)
    q_rows = heads * hd // n
    want_q = (x @ wq.T + bq)[:, r * q_rows : (r + 1) * q_rows]
    want_kv = torch.cat([x @ wk.T + bk, x @ wv.T + bv], dim=1)  # one KV head: every rank has it
    torch.testing.assert_close(y, torch.cat([want_q, want_kv], dim=1), rtol=1e-5, atol=1e-5)

    wg, wu, wd, bd = torch.randn(inter, hidden), torch.randn(inter, hidden), torch.randn(hidden, inter), torch.randn(hidden)  # fmt: skip
    gate_up = ColumnParallelLinear.even(hidden, [inter, inter], group, "intermediate_size")
    gate_up.weight_loader(gate_up.weight, wg, 0)
    gate_up.weight_loader(gate_up.weight, wu, 1)
    down = RowParallelLinear(inter, hidden, group, "intermediate_size", bias=True)
    down.weight_loader(down.weight, wd)
    down.weight_loader(down.bias, bd)
    for layer in (gate_up, down):
        layer.quant_method.process_weights_after_loading(layer)
    g, u = gate_up(x).chunk(2, dim=-1)
    got = down(F.silu(g) * u)
    want = (F.silu(x @ wg.T) * (x @ wu.T)) @ wd.T + bd
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    table, head = torch.randn(vocab, hidden), torch.randn(vocab, hidden)
    embed = VocabParallelEmbedding(vocab, hidden, group)
    embed.weight_loader(embed.weight, table)
    ids = torch.tensor([0, 5, 6, 10, 3])
    torch.testing.assert_close(embed(ids), F.embedding(ids, table))
    h = torch.randn(3, hidden)
    tied = ParallelLMHead(vocab, hidden, group, embedding=embed)
    torch.testing.assert_close(tied(h), h @ table.T, rtol=1e-5, atol=1e-5)
    untied = ParallelLMHead(vocab, hidden, group)
    untied.weight_loader(untied.weight, head)
    torch.testing.assert_close(untied(h), h @ head.T, rtol=1e-5, atol=1e-5)


def _rank(rank: int, size: int, port: int, results) -> None:
    try:
        torch.set_num_threads(1)
        _checks(init_group(rank, size, f"tcp://127.0.0.1:{port}", "gloo"))
        results.put((rank, "ok"))
    except Exception:
        results.put((rank, traceback.format_exc()))


def test_sharded_layers_on_two_gloo_ranks_equal_the_whole():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 2, port, results)) for r in range(2)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(30)
    assert got == {0: "ok", 1: "ok"}, "\n".join(str(v) for v in got.values())


def test_size_one_is_the_plain_layer_and_never_touches_distributed():
    import sys

    _checks(SINGLE)  # every check holds with one rank too (no collectives run)
    assert init_group(0, 1, "tcp://unused:1") is SINGLE
    assert "torch.distributed" not in sys.modules or not __import__("torch.distributed").distributed.is_initialized()  # fmt: skip


def test_shards_that_do_not_divide_are_refused_by_name():
    assert split(12, 2, 1, "x") == (6, 6)
    assert kv_split(8, 4, 2, 1) == (16, 16)  # 4 of 8 KV heads
    assert kv_split(2, 4, 4, 3) == (4, 4)  # 2 KV heads over 4 ranks: rank 3 uses head 1
    with pytest.raises(ValueError, match="num_attention_heads: 9 heads do not split over tensor_parallel_size 2"):  # fmt: skip
        split(9 * 64, 2, 0, "num_attention_heads", 64)
    with pytest.raises(ValueError, match="num_key_value_heads: 3 KV heads cannot be replicated"):
        kv_split(3, 64, 4, 0)
    from tokenmill.quant.methods.gguf import GGUFMethod
    from tokenmill.quant.methods.weight_only import WeightOnlyMethod

    class Custom:  # not a QuantMethod: nothing to quantize whole and cut
        def create_weights(self, layer) -> None: ...

    with pytest.raises(
        ValueError, match="quant method Custom does not shard for tensor parallelism"
    ):
        ColumnParallelLinear.even(8, [8], SINGLE, "x", quant_method=Custom())
    # a calibrated method and a GGUF file's codes shard (loaded whole, then cut)
    for method in (WeightOnlyMethod("int4", gptq=True), GGUFMethod()):
        assert ColumnParallelLinear.even(8, [8], SINGLE, "x", quant_method=method).whole


def test_quantized_codes_cut_to_one_ranks_columns_dequantize_to_its_slice():
    """take_cols against float64: each format's shard dequantizes to the same columns of the
    whole tensor's dequantization (the scales travel with their groups)."""
    from tokenmill.quant.formats import quantize, take_cols

    torch.manual_seed(1)
    w = torch.randn(6, 128, dtype=torch.float64)
    for fmt, kw in (("int8", {}), ("int4", {"group_size": 32}), ("nvfp4", {}), ("mxfp4", {}), ("fp8_e4m3", {})):  # fmt: skip
        q = quantize(w, fmt, **kw)
        whole = q.dequantize(torch.float64)
        for start in (0, 64):
            part = take_cols(q, start, 64)
            torch.testing.assert_close(part.dequantize(torch.float64), whole[:, start : start + 64])
    with pytest.raises(ValueError, match="groups of 32 do not divide a shard of 48"):
        take_cols(quantize(w, "int4", group_size=32), 0, 48)
