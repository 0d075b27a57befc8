"""Block-scale search: never worse than round-to-nearest in any block, better overall, and a
valid quantized tensor of the same format (codes are the format's encoding on those scales)."""

from __future__ import annotations

import pytest
import torch

from tokenmill.config_quant import BLOCK_SCALED, QuantConfig
from tokenmill.quant import quantize
from tokenmill.quant.formats import encode_with
from tokenmill.quant.methods import make_method
from tokenmill.quant.scale_search import SCALE_CODES, SEARCHABLE, search_scales


def block_errors(w: torch.Tensor, q, col: torch.Tensor | None) -> torch.Tensor:
    err = (q.dequantize(torch.float64) - w.double()).pow(2)
    err = err if col is None else err * col.double()
    return err.view(w.shape[0], -1, q.group_size).sum(-1)


@pytest.mark.parametrize(
    "fmt,options,weighted",
    [(f, {}, False) for f in SCALE_CODES]
    + [(f, {}, True) for f in SEARCHABLE]
    + [("int4", {"symmetric": True, "group_size": 32}, True)],
    ids=str,
)
def test_search_never_loses_to_round_to_nearest(fmt, options, weighted):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(48, 256, generator=gen) * torch.logspace(-2, 1, 48)[:, None]
    w = w * (1 + 4 * (torch.rand(48, 256, generator=gen) > 0.97))  # heavy tails, as LLMs have
    w[5, :32] = 0.0  # an all-zero block keeps its zero scale
    col = torch.rand(256, generator=gen).pow(4) * 10 if weighted else None  # a few loud inputs
    rtn = quantize(w, fmt, **options)
    searched = search_scales(w, rtn, col)
    assert searched.format == fmt and searched.data.shape == rtn.data.shape
    assert searched.scale.dtype == rtn.scale.dtype and searched.nbytes == rtn.nbytes
    before, after = block_errors(w, rtn, col), block_errors(w, searched, col)
    assert (after <= before * (1 + 1e-12)).all()
    assert after.sum() < 0.97 * before.sum()  # a real gain, not a no-op
    assert not torch.equal(searched.scale.view(torch.uint8), rtn.scale.view(torch.uint8))
    again = encode_with(searched, w)  # the codes are the format's encoding on those scales
    assert torch.equal(again.data, searched.data)
    if fmt == "nvfp4":
        assert torch.equal(searched.global_scale, rtn.global_scale)


def test_search_is_an_option_of_block_formats_only():
    assert tuple(SEARCHABLE) == BLOCK_SCALED
    assert QuantConfig(quantization="mxfp4", scale_search=True).method_options() == {
        "scale_search": True
    }
    with pytest.raises(ValueError, match="scale_search applies to quantization"):
        QuantConfig(quantization="w8a8", scale_search=True)
    with pytest.raises(ValueError, match="needs activation statistics"):
        search_scales(torch.ones(4, 128), quantize(torch.ones(4, 128), "int4"))
    assert make_method("nvfp4", scale_search=True).scale_search
    with pytest.raises(ValueError, match="scale_search applies to"):
        make_method("int8", scale_search=True)
    with pytest.raises(ValueError, match="scale search applies to"):
        search_scales(torch.ones(4, 32), quantize(torch.ones(4, 32), "int8"))
