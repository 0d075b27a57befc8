"""A decode step's decoder layers as one native call (`csrc/decode_layers.cpp`).

At batch 1 a layer is four native calls (the fused input half, the KV write, the paged decode
attention, the fused output half: layers/fused_decode.py, layers/cpu_attention.py), and the
Python around them (module calls, argument checks, allocations, ctypes conversions) cost about a
third of the 135M model's step here: 18.5 ms for the layers' forward against 12.1 ms for the same
native calls made back to back (measured, bf16, 2 threads). `DecodeLayers` makes those calls from
C, through the kernels' own entry points, in the same order on the same buffers: the output is
the same bits as the layers' (tested), the KV cache receives the same rows.

It applies to a decode-only step of 1..MAX_ROWS rows where every layer runs the fused halves and
the native attention on a KV cache of the model dtype; anything else (a prefill in the step, a
quantized KV cache, a layer whose halves stepped aside, torch.compile) and the model runs its
layers one by one as before.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from tokenmill.layers import native, skinny
from tokenmill.layers.cpu_attention import NativeCpuAttention

log = logging.getLogger(__name__)

_I64, _PTR, _F32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float


class LayerPlan(ctypes.Structure):  # csrc/decode_layers.cpp TmLayerPlan
    _fields_ = [
        ("qkv_gguf", _I64), ("qkv_fn", _PTR), ("qkv_desc", _PTR),
        ("mlp_gguf", _I64), ("mlp_fn", _PTR), ("mlp_desc", _PTR),
        ("kv_cache", _PTR), ("num_slots", _I64),
        ("qkv_eps", _F32), ("mlp_eps", _F32), ("scale", _F32), ("pad", _F32),
    ]  # fmt: skip


class StepPlan(ctypes.Structure):  # csrc/decode_layers.cpp TmStepPlan
    _fields_ = [
        ("M", _I64), ("hidden", _I64), ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64),
        ("elem_bytes", _I64), ("x_bf16", _I64), ("write_fn", _PTR), ("decode_fn", _PTR),
        ("x0", _PTR), ("cos", _PTR), ("sin", _PTR), ("slots", _PTR), ("tables", _PTR),
        ("lens", _PTR), ("block_size", _I64), ("max_blocks", _I64),
        ("x", _PTR), ("res_a", _PTR), ("res_b", _PTR), ("qkv", _PTR), ("rotated", _PTR),
        ("q", _PTR), ("o", _PTR), ("threads", _I64),
    ]  # fmt: skip


@functools.cache
def _library() -> ctypes.CDLL:
    lib = native.load("decode_layers")
    lib.tm_decode_layers.argtypes = [_PTR, _I64, _PTR]
    lib.tm_decode_layers.restype = _I64
    return lib


def _address(fn) -> int:
    address = ctypes.cast(fn, ctypes.c_void_p).value
    assert address is not None
    return address


class DecodeLayers:
    """(x [rows, hidden] the embedding, cos_sin, kv_caches, meta) -> (x, residual) after the
    last decoder layer, as the layers' loop returns them; None where the step is not one this
    applies to (the caller then runs the layers)."""

    def __init__(self, layers: list) -> None:
        first = layers[0]
        blocks = first.fused_inputs
        self.layers = layers
        self.halves = [(lyr.fused_inputs, lyr.fused_outputs) for lyr in layers]
        self.backends = [lyr.self_attn.backend for lyr in layers]
        self.dtype = blocks.dtype
        self.hidden, self.heads = blocks.hidden, blocks.heads
        self.kv_heads, self.head_dim = blocks.kv_heads, blocks.head_dim
        kernels = self.backends[0].kernels
        self._write, self._decode = _address(kernels["write"]), _address(kernels[self.dtype])
        self._lib = _library()
        self._plans: tuple[tuple[int, ...], ctypes.Array] | None = None  # keyed by the caches
        # what _unchanged checks each step, flattened (a walk over the layers cost 120 us)
        self._same: list[tuple[object, str, object]] = []
        self._equal: list[tuple[object, str, object]] = []
        for lyr, (inputs, outputs), backend in zip(layers, self.halves, self.backends):
            self._same += [(lyr, "fused_inputs", inputs), (lyr, "fused_outputs", outputs)]
            self._same.append((lyr.self_attn, "backend", backend))
            for half in (inputs, outputs):
                same, equal = half.watched()
                self._same += same
                self._equal += equal
        self._dicts = [lyr.__dict__ for lyr in layers]  # torch.compile'd halves land here

    @classmethod
    def build(cls, layers) -> DecodeLayers | None:
        """The loop over these decoder layers, or None where one of them does not run the fused
        halves and the native attention (or the driver does not build)."""
        layers = list(layers)
        if not layers:
            return None
        first = layers[0].fused_inputs
        for lyr in layers:
            inputs, outputs = lyr.fused_inputs, lyr.fused_outputs
            if inputs is None or outputs is None or not hasattr(inputs, "entry"):
                return None
            if type(lyr.self_attn.backend) is not NativeCpuAttention:
                return None
            if (
                (inputs.dtype, inputs.hidden, inputs.heads, inputs.kv_heads, inputs.head_dim)
                != (first.dtype, first.hidden, first.heads, first.kv_heads, first.head_dim)
                or outputs.dtype != first.dtype
                or outputs.hidden != first.hidden
            ):
                return None
            if first.dtype not in lyr.self_attn.backend.kernels:
                return None
        try:
            _library()
        except native.NativeUnavailable as e:
            log.info("decoder layers called one by one (%s)", e)
            return None
        return cls(layers)

    def _unchanged(self) -> bool:
        """Whether every layer still runs the halves and attention this was built over, eagerly
        (a runner that hands the halves to torch.compile, or steps them aside, wins)."""
        return (
            all(getattr(o, name) is v for o, name, v in self._same)
            and all(getattr(o, name) == v for o, name, v in self._equal)
            and not any("attention_inputs" in d for d in self._dicts)
        )

    def _layer_plans(self, kv_caches) -> ctypes.Array | None:
        key = tuple(c.data_ptr() if isinstance(c, torch.Tensor) else -1 for c in kv_caches)
        if self._plans is not None and self._plans[0] == key:
            return self._plans[1]
        if len(kv_caches) != len(self.layers):
            return None
        plans = (LayerPlan * len(self.layers))()
        for plan, (inputs, outputs), backend, cache in zip(
            plans, self.halves, self.backends, kv_caches
        ):
            if not (
                isinstance(cache, torch.Tensor)
                and cache.dtype == self.dtype
                and cache.is_contiguous()
                and cache.dim() == 4
                and cache.shape[0] == 2
                and cache.shape[1] == self.kv_heads
                and cache.shape[3] == self.head_dim
            ):
                return None
            plan.qkv_gguf, plan.qkv_fn, plan.qkv_desc = int(inputs.gguf), inputs.entry, inputs.desc_ptr  # fmt: skip
            plan.mlp_gguf, plan.mlp_fn, plan.mlp_desc = int(outputs.gguf), outputs.entry, outputs.desc_ptr  # fmt: skip
            plan.kv_cache, plan.num_slots = cache.data_ptr(), cache.shape[2]
            plan.qkv_eps, plan.mlp_eps, plan.scale = inputs.eps, outputs.eps, backend.scale
        self._plans = (key, plans)
        return plans

    def __call__(self, x: torch.Tensor, cos_sin, kv_caches, meta):
        rows = x.shape[0]
        if not 0 < rows <= skinny.MAX_ROWS or meta.num_decode_tokens != rows or meta.prefills:
            return None
        tables, lens, slots = meta.decode_block_tables, meta.decode_lens, meta.slot_mapping
        if tables is None or lens is None or x.dtype != self.dtype or not x.is_contiguous():
            return None
        if not (
            tables.dtype == slots.dtype == torch.int64
            and lens.dtype == torch.int32
            and tables.is_contiguous()
            and lens.is_contiguous()
            and slots.is_contiguous()
            and slots.shape[0] == rows
        ):
            return None
        cos, sin = cos_sin
        d, h, kvh = self.head_dim, self.heads, self.kv_heads
        if not (cos.is_contiguous() and sin.is_contiguous()) or cos.dtype != self.dtype:
            return None
        if cos.shape != (rows, 1, d) or sin.shape != cos.shape:
            return None
        if not self._unchanged():
            return None
        plans = self._layer_plans(kv_caches)
        if plans is None:
            return None
        empty = functools.partial(torch.empty, dtype=self.dtype)
        out, res_a, res_b = empty(rows, self.hidden), empty(rows, self.hidden), empty(rows, self.hidden)  # fmt: skip
        qkv, rotated = empty(rows, (h + 2 * kvh) * d), empty(rows, h + kvh, d)
        q, o = empty(rows, h, d), empty(rows, h, d)
        step = StepPlan(
            rows, self.hidden, h, kvh, d, x.element_size(), int(self.dtype == torch.bfloat16),
            self._write, self._decode, x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
            slots.data_ptr(), tables.data_ptr(), lens.data_ptr(), meta.block_size,
            tables.shape[1], out.data_ptr(), res_a.data_ptr(), res_b.data_ptr(), qkv.data_ptr(),
            rotated.data_ptr(), q.data_ptr(), o.data_ptr(), torch.get_num_threads(),
        )  # fmt: skip
        rc = self._lib.tm_decode_layers(ctypes.addressof(plans), len(plans), ctypes.addressof(step))
        if rc == 0:
            return out, res_b
        layer, stage = divmod(rc - 1, 4)
        if stage == 1:
            num_slots = kv_caches[layer].shape[2]
            raise IndexError(f"a KV slot outside [0, {num_slots}) was not written")
        if stage == 2:
            raise RuntimeError(f"paged decode kernel rejected its arguments (layer {layer})")
        return None  # a half that did not apply: the layers run one by one
