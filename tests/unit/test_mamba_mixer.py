"""The Mamba-2 mixer (issue #22, the layer): the chunked scan equals the plain recurrence in
float64, and the mixer equals transformers' Mamba2Mixer on the same weights, in one pass, in
chunks that carry the state through a slot, one decode token at a time, and with sequences of
different lengths in one batch."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers.factory import LayerFactory
from tokenmill.layers.mamba import Mamba2Mixer, SSMSequence, chunked_scan, sequential_scan


@pytest.mark.parametrize("length", [1, 7, 8, 37])
def test_the_chunked_scan_is_the_recurrence(length):
    g = torch.Generator().manual_seed(length)
    h, p, n = 3, 4, 5
    x = torch.randn(length, h, p, generator=g, dtype=torch.float64)
    dt = torch.rand(length, h, generator=g, dtype=torch.float64)
    A = -torch.rand(h, generator=g, dtype=torch.float64) * 2
    # one group of B and C for heads 0-1, another for 2-3 (the chunked scan takes groups)
    h = 4
    x = torch.randn(length, h, p, generator=g, dtype=torch.float64)
    dt = torch.rand(length, h, generator=g, dtype=torch.float64)
    A = -torch.rand(h, generator=g, dtype=torch.float64) * 2
    B, C = (torch.randn(length, 2, n, generator=g, dtype=torch.float64) for _ in range(2))
    h0 = torch.randn(h, p, n, generator=g, dtype=torch.float64)
    per_head = (B.repeat_interleave(2, dim=1), C.repeat_interleave(2, dim=1))
    y_ref, final_ref = sequential_scan(x, dt, A, *per_head, h0)
    y, final = chunked_scan(x, dt, A, B, C, h0, chunk_size=8)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_ref, rtol=1e-10, atol=1e-10)


def reference_and_ours(groups: int = 2):
    import transformers
    from transformers.models.mamba2.modeling_mamba2 import Mamba2Mixer as HFMixer

    config = transformers.Mamba2Config(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, state_size=8, expand=2,
        head_dim=8, num_heads=8, n_groups=groups, conv_kernel=4, chunk_size=8,
    )  # fmt: skip
    torch.manual_seed(0)
    hf = HFMixer(config, layer_idx=0).float().eval()
    with torch.no_grad():  # the initialisation leaves dt and D trivial: make every term count
        for p in hf.parameters():
            p.normal_(0, 0.3)
        hf.A_log.copy_(torch.log(torch.linspace(0.5, 4, 8)))
    ours = Mamba2Mixer(
        LayerFactory(torch.float32), "mixer", 32, 8, 8, 8, groups, 4, 8, config.layer_norm_epsilon
    )
    ours.load_state_dict(hf.state_dict())  # Hugging Face's names, every one
    return hf, ours


def states(mixer: Mamba2Mixer, slots: int = 4):
    conv, ssm = mixer.state_shapes()
    return torch.full((slots, *conv), float("nan")), torch.full((slots, *ssm), float("nan"))


@pytest.mark.parametrize("groups", [1, 2])
def test_the_mixer_equals_transformers_in_one_pass_in_chunks_and_decoding(groups):
    hf, ours = reference_and_ours(groups)
    x = torch.randn(1, 29, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = hf(x)[0]  # [29, 32]
        conv, ssm = states(ours)  # stale slots: a fresh sequence must not read them
        one = ours(x[0], [SSMSequence(0, 29, 2, True)], conv, ssm)
        torch.testing.assert_close(one, expected, rtol=1e-4, atol=1e-5)
        # chunks of 5, 11, then decodes of 1: the state carried through slot 1
        conv, ssm = states(ours)
        parts, start = [], 0
        for i, n in enumerate([5, 11, 1, 1, 7, 1, 1, 1, 1]):
            parts.append(ours(x[0, start : start + n], [SSMSequence(0, n, 1, i == 0)], conv, ssm))
            start += n
        torch.testing.assert_close(torch.cat(parts), expected, rtol=1e-4, atol=1e-5)


def test_sequences_of_different_lengths_share_a_batch():
    hf, ours = reference_and_ours()
    g = torch.Generator().manual_seed(2)
    a, b, c = (torch.randn(1, n, 32, generator=g) for n in (13, 6, 9))
    with torch.no_grad():
        ref = [hf(t)[0] for t in (a, b, c)]
        conv, ssm = states(ours)
        # step 1: a's first 12 tokens, b whole, c's first 8; step 2: a and c one decode each
        # (batched), then c's last token... as the engine mixes them
        step1 = ours(torch.cat([a[0, :12], b[0], c[0, :8]]),
                     [SSMSequence(0, 12, 0, True), SSMSequence(12, 6, 3, True), SSMSequence(18, 8, 2, True)],
                     conv, ssm)  # fmt: skip
        step2 = ours(torch.cat([a[0, 12:], c[0, 8:]]),
                     [SSMSequence(0, 1, 0, False), SSMSequence(1, 1, 2, False)], conv, ssm)  # fmt: skip
    torch.testing.assert_close(torch.cat([step1[:12], step2[:1]]), ref[0], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step1[12:18], ref[1], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([step1[18:], step2[1:]]), ref[2], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2])
def test_the_native_decode_step_equals_the_torch_step(groups):
    from tokenmill.layers.native import compiler

    if compiler() is None:
        pytest.skip("no C++ compiler")
    _, torch_mixer = reference_and_ours(groups)
    _, native_mixer = reference_and_ours(groups)
    native_mixer.attach_native()
    assert native_mixer.native is not None
    g = torch.Generator().manual_seed(3)
    conv_shape, ssm_shape = torch_mixer.state_shapes()
    conv = torch.randn(5, *conv_shape, generator=g)
    ssm = torch.randn(5, *ssm_shape, generator=g)
    states = {m: (conv.clone(), ssm.clone()) for m in ("torch", "native")}
    x = torch.randn(3, 32, generator=g)
    for slots in ([4], [3, 0, 2]):  # one sequence (its state through a view), then three
        seqs = [SSMSequence(i, 1, s, False) for i, s in enumerate(slots)]
        n = len(slots)
        with torch.no_grad():
            a = torch_mixer(x[:n], seqs, *states["torch"])
            b = native_mixer(x[:n], seqs, *states["native"])
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
        for ta, tb in zip(states["torch"], states["native"], strict=True):
            torch.testing.assert_close(tb, ta, rtol=1e-5, atol=1e-5)
