"""KV tier storage: blocks move device -> host -> disk -> device bit-identical (plain and
quantized caches), files are validated (fingerprint, checksum, size) and bad ones removed, and
a directory that cannot be used is a clear error at start."""

from __future__ import annotations

import os

import pytest
import torch

from tokenmill.kv.moves import BlockLoad, TierOps
from tokenmill.kv.storage.disk import DiskBlocks
from tokenmill.kv.storage.host import BlockCodec, BlockViews
from tokenmill.kv.storage.mover import TierStorage

BS = 4
NUM_BLOCKS = 6


def kv_caches(quantized: bool) -> list:
    """Two layers of [2, kv_heads=2, slots, head_dim=8] (+ fp32 scales when quantized),
    filled with distinct random values; slots = (blocks + 1) x block size."""
    g = torch.Generator().manual_seed(0)
    slots = (NUM_BLOCKS + 1) * BS
    out = []
    for _ in range(2):
        if quantized:
            codes = torch.randint(-127, 128, (2, 2, slots, 8), generator=g, dtype=torch.int8)
            out.append((codes, torch.rand((2, 2, slots, 1), generator=g)))
        else:
            out.append(torch.randn((2, 2, slots, 8), generator=g).to(torch.bfloat16))
    return out


def block(caches: list, b: int) -> list[torch.Tensor]:
    flat = [t for c in caches for t in (c if isinstance(c, tuple) else (c,))]
    return [t[:, :, b * BS : (b + 1) * BS].clone() for t in flat]


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return all(torch.equal(x.view(torch.uint8), y.view(torch.uint8)) for x, y in zip(a, b))


def disk(tmp_path, views: BlockViews, max_bytes=1 << 20, identity=None) -> DiskBlocks:
    return DiskBlocks(str(tmp_path), max_bytes, identity or {"model": "m"}, views.block_shapes())


@pytest.mark.parametrize("quantized", [False, True])
def test_blocks_round_trip_through_host_and_disk_bit_identical(tmp_path, quantized):
    caches = kv_caches(quantized)
    views = BlockViews(caches, BS)
    originals = {b: block(caches, b) for b in range(NUM_BLOCKS)}
    store = TierStorage(views, host_blocks=2, disk=disk(tmp_path, views))
    h = [bytes([i]) * 16 for i in range(4)]
    # blocks 1, 2 to host; block 3 straight to disk; then host slot 0 (block 1) to disk
    store.apply(TierOps(device_to_host=((1, 0), (2, 1)), device_to_disk=((3, h[3]),)))
    store.apply(TierOps(host_to_disk=((0, h[1]),), device_to_host=((4, 0),)))
    store.disk.flush()
    for c in caches:  # the device pool is overwritten by other requests
        for t in c if isinstance(c, tuple) else (c,):
            t.zero_()
    load = BlockLoad(7, host=((1, 5, h[2]), (0, 0, h[0])), disk=((h[1], 1), (h[3], 2)))
    store.apply(TierOps(loads=(load,)))
    done, failed, lost = store.harvest(block=True)
    assert (done, failed, lost) == ((7,), (), ())
    assert same(block(caches, 5), originals[2])  # from host slot 1
    assert same(block(caches, 0), originals[4])  # host slot 0 was refilled with block 4
    assert same(block(caches, 1), originals[1])  # via host, then its file
    assert same(block(caches, 2), originals[3])  # its file, written from the device
    store.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("tier_dtype", ["auto", "int8"])
def test_cuda_loads_run_on_their_own_stream_while_the_forward_is_busy(tier_dtype):
    """On CUDA the host tier is pinned and a load is DMAs on the loader's stream: it finishes
    (harvested, bit-identical, or within rounding for int8) while the compute stream is still
    running a long kernel, instead of queueing behind it."""
    cpu = kv_caches(False)
    caches = [c.cuda() for c in cpu]
    views = BlockViews(caches, BS)
    store = TierStorage(views, 4, None, codec=BlockCodec(views.block_shapes(), tier_dtype))
    assert store.host is not None and all(t.is_pinned() for t in store.host.tensors)
    h = [bytes([i]) * 16 for i in range(4)]
    store.apply(TierOps(device_to_host=((1, 0), (2, 1))))
    for job in range(2):  # the first job warms the pinned staging allocator
        for c in caches:
            c.zero_()
        torch.cuda.synchronize()
        torch.cuda._sleep(3_000_000_000)  # ~1.5-2 s of GPU clock on the compute stream
        store.apply(TierOps(loads=(BlockLoad(job, host=((0, 3, h[1]), (1, 5, h[2])), disk=()),)))
        done: tuple = ()
        for _ in range(100):
            done += store.harvest(block=True)[0]
            if done:
                break
        busy = not torch.cuda.current_stream().query()
        torch.cuda.synchronize()
        assert done == (job,) and busy, (done, busy)
    for dst, src in ((3, 1), (5, 2)):
        got = [t.cpu() for t in block(caches, dst)]
        want = block(cpu, src)
        if tier_dtype == "auto":
            assert same(got, want)
        else:
            assert all((g.float() - w.float()).abs().max() <= w.float().abs().max() / 100 for g, w in zip(got, want))  # fmt: skip
    store.close()


@pytest.mark.parametrize("tier_dtype, qmax, rel", [("int8", 127, 0.5), ("fp8_e4m3", 448, 0.0625)])
def test_a_compressed_tier_keeps_blocks_within_rounding_in_half_the_bytes(
    tmp_path, tier_dtype, qmax, rel
):
    """int8 / fp8 tiers: each block comes back within its format's rounding of the original
    (checked in float64 per token and head), the same whichever way it travelled (host slot,
    file written from host, file written from the device), and takes ~half a bf16 block."""
    caches = kv_caches(False)
    views = BlockViews(caches, BS)
    codec = BlockCodec(views.block_shapes(), tier_dtype)
    exact = BlockCodec(views.block_shapes())
    assert codec.bytes_per_block / exact.bytes_per_block == (8 + 4) / (2 * 8)  # head_dim 8
    originals = {b: block(caches, b) for b in range(NUM_BLOCKS)}
    d = DiskBlocks(str(tmp_path), 1 << 20, {"model": "m"}, codec.shapes())
    store = TierStorage(views, host_blocks=2, disk=d, codec=codec)
    h = [bytes([i]) * 16 for i in range(4)]
    store.apply(TierOps(device_to_host=((1, 0), (2, 1)), device_to_disk=((3, h[3]),)))
    store.apply(TierOps(host_to_disk=((0, h[1]),)))
    d.flush()
    from safetensors.torch import load_file

    files = sorted(d.dir.glob("*.kvb"))
    assert len(files) == 2
    stored = load_file(files[0])  # the files hold the codes and scales, not bf16
    assert sorted(str(t.dtype) for t in stored.values()) == sorted(
        str(dt) for _, dt in codec.shapes()
    ) and torch.bfloat16 not in {t.dtype for t in stored.values()}
    for c in caches:
        c.zero_()
    load = BlockLoad(1, host=((1, 5, h[2]),), disk=((h[1], 0), (h[3], 4)))
    store.apply(TierOps(loads=(load,)))
    assert store.harvest(block=True)[:2] == ((1,), ())
    back = {5: 2, 0: 1, 4: 3}  # device block -> the block it came from
    for dst, src in back.items():
        for got, want in zip(block(caches, dst), originals[src]):
            want64, got64 = want.double(), got.double()
            step = want64.abs().amax(-1, keepdim=True) / qmax  # the scale of each token and head
            # int8: half a step; fp8 E4M3: 2^-4 of the value (3 mantissa bits), and the bf16 output
            fmt = step * rel if tier_dtype == "int8" else want64.abs() * rel + step * 2**-10
            bound = fmt + want64.abs() / 128
            assert torch.all((got64 - want64).abs() <= bound + 1e-30), (dst, tier_dtype)
            assert not torch.equal(got, torch.zeros_like(got))
    # one format, however it travelled: the file written from host equals the host slot's decode
    slot_copy = codec.decode([t[None] for t in store.host.block(1)])
    assert same([x[0] for x in slot_copy], block(caches, 5))
    store.close()


def test_the_tier_format_is_checked_at_config():
    from tokenmill.config import CacheConfig

    with pytest.raises(ValueError, match="kv_tier_dtype must be one of"):
        CacheConfig(kv_host_memory=1 << 20, kv_tier_dtype="int4")
    with pytest.raises(ValueError, match="set kv_host_memory or kv_disk_dir"):
        CacheConfig(kv_tier_dtype="int8")
    with pytest.raises(ValueError, match="kv_cache_dtype=int8 already"):
        CacheConfig(kv_host_memory=1 << 20, kv_tier_dtype="int8", kv_cache_dtype="int8")
    with pytest.raises(ValueError, match="kv_tier_policy must be s3fifo or lru, got 'arc'"):
        CacheConfig(kv_host_memory=1 << 20, kv_tier_policy="arc")
    with pytest.raises(ValueError, match="kv_tier_policy chooses what the KV tiers keep"):
        CacheConfig(kv_tier_policy="lru")
    assert CacheConfig(kv_host_memory=1 << 20, kv_tier_policy="lru").kv_tier_policy == "lru"
    views = BlockViews(kv_caches(True), BS)
    with pytest.raises(ValueError, match="16- or 32-bit"):
        BlockCodec(views.block_shapes(), "int8")


def test_files_survive_a_restart_and_bad_ones_are_skipped(tmp_path, caplog):
    caches = kv_caches(False)
    views = BlockViews(caches, BS)
    d = disk(tmp_path, views)
    h = [bytes([i]) * 16 for i in range(4)]
    for i in range(3):
        d.write(h[i], block(caches, i))
    d.close()
    files = sorted(d.dir.glob("*.kvb"))
    assert len(files) == 3 and all(f.stat().st_size == d.file_bytes for f in files)
    # a torn file, a stray file, a copy under the wrong name, another model's directory
    torn = d.dir / (h[0].hex() + ".kvb")
    torn.write_bytes(torn.read_bytes()[:-10])
    (d.dir / "zz.kvb").write_bytes(b"not a block")
    (d.dir / (h[3].hex() + ".kvb")).write_bytes((d.dir / (h[1].hex() + ".kvb")).read_bytes())
    (tmp_path / "other-model").mkdir()
    (tmp_path / "other-model" / "x.kvb").write_bytes(b"theirs")
    again = disk(tmp_path, views)
    assert sorted(again.scan()) == sorted([h[1], h[2]])
    assert not torn.exists() and not (d.dir / "zz.kvb").exists()
    assert (tmp_path / "other-model" / "x.kvb").exists()  # not ours: left alone
    # a flipped bit inside the data: the checksum catches it at load time
    path = again.dir / (h[2].hex() + ".kvb")
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x40
    path.write_bytes(bytes(data))
    assert again.read(h[2]) is None and not path.exists()
    assert "checksum" in caplog.text
    assert same(again.read(h[1]), block(caches, 1))
    again.close()


def test_another_model_or_block_size_writes_elsewhere(tmp_path):
    views = BlockViews(kv_caches(False), BS)
    a = disk(tmp_path, views, identity={"model": "a"})
    a.write(b"\1" * 16, block(kv_caches(False), 0))
    a.close()
    b = disk(tmp_path, views, identity={"model": "b"})
    assert b.scan() == [] and b.fingerprint != a.fingerprint
    b.close()


def test_a_directory_in_use_or_too_small_is_refused_at_start(tmp_path):
    views = BlockViews(kv_caches(False), BS)
    first = disk(tmp_path, views)
    with pytest.raises(
        ValueError, match=f"in use by another tokenmill server \\(pid {os.getpid()}\\)"
    ):
        disk(tmp_path, views)
    first.close()
    with pytest.raises(ValueError, match="GiB free"):
        disk(tmp_path, views, max_bytes=1 << 60)
    with pytest.raises(ValueError, match="holds no KV block"):
        disk(tmp_path, views, max_bytes=100)
    disk(tmp_path, views).close()  # every failure above released the lock


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_a_directory_that_is_not_writable_is_refused(tmp_path):
    locked = tmp_path / "ro"
    locked.mkdir()
    locked.chmod(0o500)
    views = BlockViews(kv_caches(False), BS)
    with pytest.raises(ValueError, match="not writable"):
        disk(locked, views)


def test_a_failed_write_is_reported_lost(tmp_path):
    views = BlockViews(kv_caches(False), BS)
    d = disk(tmp_path, views)
    d.dir.rename(tmp_path / "gone")  # the directory vanishes under the server
    d.write(b"\5" * 16, block(kv_caches(False), 0))
    d.flush()
    assert d.take_lost() == [b"\5" * 16]
    d.close()
