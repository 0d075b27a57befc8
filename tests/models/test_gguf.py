"""GGUF: our header parser and dequantization against the `gguf` package, and the bundled
SmolLM2-135M-Instruct against `transformers` loading the same file."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFReader, GGUFWriter
from gguf.quants import dequantize as ref_dequantize
from gguf.quants import quantize as ref_quantize

from tokenmill.models.gguf import GGUFFile, resolve_default_model
from tokenmill.quant.gguf_quants import GGML_TYPES

DEFAULT = resolve_default_model()
BLOCK_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]
PLAIN = {Q.F32: np.float32, Q.F16: np.float16}


def raw_blocks(qtype, rows: int, cols: int, rng) -> np.ndarray:
    """Valid random blocks: quantized from real floats where gguf can, else random bytes
    with finite half-precision scales."""
    x = rng.standard_normal((rows, cols)).astype(np.float32)
    try:
        return ref_quantize(x, qtype)
    except NotImplementedError:
        _, block, nbytes = GGML_TYPES[int(qtype)]
        raw = rng.integers(0, 256, (rows, cols // block * nbytes), dtype=np.uint8)
        blocks = raw.reshape(-1, nbytes)
        scales = rng.uniform(-0.05, 0.05, (blocks.shape[0], 2)).astype(np.float16).view(np.uint8)
        if qtype == Q.Q6_K:  # d is the last 2 bytes
            blocks[:, -2:] = scales[:, :2]
        else:  # d and dmin lead the block
            blocks[:, 0:4] = scales
        return raw


def test_writer_roundtrip_every_type_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "t.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("test.answer", 42)
    w.add_array("test.list", ["a", "bb", "ccc"])
    expected = {}
    for qtype in BLOCK_TYPES:
        raw = raw_blocks(qtype, 4, 512, rng)
        w.add_tensor(f"t.{qtype.name}", raw, raw_shape=raw.shape, raw_dtype=qtype)
        expected[f"t.{qtype.name}"] = (qtype, raw)
    for qtype, dt in PLAIN.items():
        x = rng.standard_normal((3, 64)).astype(dt)
        w.add_tensor(f"t.{qtype.name}", x)
        expected[f"t.{qtype.name}"] = (qtype, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    ours = GGUFFile(path)
    assert ours.metadata["test.answer"] == 42 and ours.metadata["test.list"] == ["a", "bb", "ccc"]
    for name, (qtype, data) in expected.items():
        got = ours.dequantized(ours.tensors[name]).numpy()
        want = ref_dequantize(data, qtype).astype(np.float32)
        assert got.shape == want.shape, name
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), name


def test_parser_matches_gguf_reader_on_default_model():
    ours = GGUFFile(DEFAULT)
    ref = GGUFReader(DEFAULT)
    assert len(ours.tensors) == len(ref.tensors)
    for t in ref.tensors:
        mine = ours.tensors[t.name]
        assert mine.shape == tuple(int(d) for d in reversed(t.shape.tolist()))
        assert mine.ggml_type == int(t.tensor_type) and mine.offset == t.data_offset
    for key in ("llama.block_count", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert ours.metadata[key] == ref.fields[key].contents()
    assert ours.metadata["tokenizer.ggml.tokens"] == ref.fields["tokenizer.ggml.tokens"].contents()


@pytest.mark.parametrize(
    "name",
    ["token_embd.weight", "blk.0.attn_q.weight", "blk.3.ffn_down.weight", "blk.0.attn_norm.weight"],
)
def test_dequantization_of_real_tensors_bit_exact(name):
    ours = GGUFFile(DEFAULT)
    ref = {t.name: t for t in GGUFReader(DEFAULT).tensors}[name]
    want = ref_dequantize(ref.data, ref.tensor_type).astype(np.float32)
    got = ours.dequantized(ours.tensors[name]).numpy()
    assert np.array_equal(got.view(np.uint32), want.reshape(got.shape).view(np.uint32))


def test_unsupported_type_names_it():
    from tokenmill.quant.gguf_quants import dequantize

    with pytest.raises(ValueError, match="type 16 is not supported"):
        dequantize(torch.zeros(66, dtype=torch.uint8), 16, (256,))
