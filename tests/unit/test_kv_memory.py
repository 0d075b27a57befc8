"""The KV pool's host memory: zeroed, writable, and prefaulted without touching its contents."""

from __future__ import annotations

import torch

from tokenmill.kv.storage.memory import Prefaulter, host_zeros


def test_host_zeros_is_a_zeroed_writable_tensor():
    t = host_zeros((2, 3, 1000, 64), torch.bfloat16)
    assert t.shape == (2, 3, 1000, 64) and t.dtype == torch.bfloat16 and t.is_contiguous()
    assert not t.any()
    t[1, 2, 999] = 3.0
    assert t.float().sum().item() == 3.0 * 64
    assert host_zeros((0, 4), torch.float32).numel() == 0


def test_prefault_keeps_what_was_written_before_and_during():
    pools = [host_zeros((2, 2, 70_000, 16), torch.float32) for _ in range(3)]
    gen = torch.Generator().manual_seed(0)
    before = torch.randn(2, 2, 500, 16, generator=gen)
    pools[1][:, :, 60_000:60_500] = before  # pages the prefaulter reaches last
    pre = Prefaulter(pools).start()
    during = torch.randn(2, 2, 300, 16, generator=gen)
    pools[2][:, :, :300] = during
    assert pre.done.wait(60)
    assert torch.equal(pools[1][:, :, 60_000:60_500], before)
    assert torch.equal(pools[2][:, :, :300], during)
    assert not pools[0].any()
    assert pre.tensors == []  # references dropped when done


def test_a_stopped_prefaulter_finishes_at_once():
    pre = Prefaulter([host_zeros((2, 1, 1 << 20, 64), torch.float32)])
    pre.stop()
    pre.start()
    assert pre.done.wait(10)
