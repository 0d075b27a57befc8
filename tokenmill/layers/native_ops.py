"""Row-wise CPU kernels between the GEMMs (`csrc/elementwise.cpp`): residual add + RMSNorm,
SiLU(gate) * up and rotary embedding, one pass each, with the eager code's bfloat16 rounding.

`RMSNorm`, `SiluAndMul` and `RotaryEmbedding` call these where the runner has given them a `RowKernels` (CPU,
`cpu_kernels` auto/native) and the tensors fit: float32 or bfloat16, contiguous rows. Anything
else, and everything inside torch.compile (where inductor fuses the same work), stays on the
torch code.
"""

from __future__ import annotations

import ctypes
import logging

import torch

from tokenmill.layers import native

log = logging.getLogger(__name__)

CHOICES = ("auto", "torch", "native")  # config.CPU_KERNELS
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p
_NULL = None


class RowKernels:
    def __init__(self) -> None:
        lib = native.load("elementwise")
        self.norm, self.silu, self.silu_hadamard, self.rope = {}, {}, {}, {}
        for dtype, tag in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
            norm = getattr(lib, f"tm_add_rms_norm_{tag}")
            norm.argtypes = [_PTR] * 5 + [_I64, _I64, ctypes.c_float, ctypes.c_int]
            norm.restype = None
            silu = getattr(lib, f"tm_silu_mul_{tag}")
            silu.argtypes = [_PTR, _PTR, _I64, _I64, ctypes.c_int]
            silu.restype = None
            self.norm[dtype], self.silu[dtype] = norm, silu
            fused = getattr(lib, f"tm_silu_mul_hadamard_{tag}")
            fused.argtypes = [_PTR, _PTR, _I64, _I64, _I64, ctypes.c_int]
            fused.restype = None
            self.silu_hadamard[dtype] = fused
            rope = getattr(lib, f"tm_rotary_{tag}")
            rope.argtypes = [_PTR, _I64, _PTR, _PTR, _PTR, _I64, _I64, _I64, ctypes.c_int]
            rope.restype = None
            self.rope[dtype] = rope
        self.bitmask = lib.tm_apply_bitmask_f32
        self.bitmask.argtypes = [_PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, ctypes.c_int]
        self.bitmask.restype = None

    def apply_bitmask(self, logits: torch.Tensor, rows: torch.Tensor, words: torch.Tensor):
        """As layers/sampler.apply_bitmask, in place; False where the kernel does not apply."""
        if not (
            logits.device.type == rows.device.type == words.device.type == "cpu"
            and logits.dtype == torch.float32
            and logits.dim() == 2
            and logits.stride(1) == 1
            and words.dtype == torch.int32
            and words.is_contiguous()
            and rows.dtype == torch.int64
            and rows.is_contiguous()
        ):
            return False
        self.bitmask(logits.data_ptr(), logits.stride(0), rows.data_ptr(), words.data_ptr(),
                     len(rows), logits.shape[1], words.shape[1], torch.get_num_threads())  # fmt: skip
        return True

    def rms_norm(self, x: torch.Tensor, residual: torch.Tensor | None, weight, eps: float):
        """As RMSNorm.forward, or None where these kernels do not apply."""
        fn = self.norm.get(x.dtype)
        if (
            fn is None
            or x.device.type != "cpu"
            or not x.is_contiguous()
            or weight.dtype != x.dtype
            or (
                residual is not None
                and (
                    residual.dtype != x.dtype
                    or residual.shape != x.shape
                    or not residual.is_contiguous()
                )
            )
        ):
            return None
        hidden = x.shape[-1]
        out = torch.empty_like(x)
        summed = torch.empty_like(x) if residual is not None else None
        fn(
            x.data_ptr(),
            residual.data_ptr() if residual is not None else _NULL,
            weight.data_ptr(),
            out.data_ptr(),
            summed.data_ptr() if summed is not None else _NULL,
            x.numel() // hidden,
            hidden,
            eps,
            torch.get_num_threads(),
        )
        return out if summed is None else (out, summed)

    def silu_mul(self, x: torch.Tensor, hadamard_block: int = 0) -> torch.Tensor | None:
        """silu(x[..., :d]) * x[..., d:], or None where these kernels do not apply. With
        `hadamard_block` (a power of two <= 1024 dividing d), each block of that many channels
        of the result times the orthonormal Hadamard matrix (quant/rotation.OnlineRotation)."""
        table = self.silu_hadamard if hadamard_block else self.silu
        fn = table.get(x.dtype)
        if fn is None or x.device.type != "cpu" or not x.is_contiguous():
            return None
        d = x.shape[-1] // 2
        out = torch.empty(*x.shape[:-1], d, dtype=x.dtype)
        rows, threads = x.numel() // (2 * d), torch.get_num_threads()
        if not hadamard_block:
            fn(x.data_ptr(), out.data_ptr(), rows, d, threads)
            return out
        block = hadamard_block
        if block & (block - 1) or block > 1024 or d % block:
            return None
        fn(x.data_ptr(), out.data_ptr(), rows, d, block, threads)
        return out

    def rotary(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """As RotaryEmbedding.apply: x [tokens, heads, head_dim], each token's heads side by
        side (a column slice of the fused q/k/v output is fine), cos/sin [tokens, 1, head_dim]
        in x's dtype. A new contiguous tensor, or None where the kernel does not apply."""
        fn = self.rope.get(x.dtype)
        tokens, heads, d = x.shape if x.dim() == 3 else (0, 0, 0)
        if (
            fn is None
            or x.dim() != 3
            or x.device.type != "cpu"
            or x.stride(2) != 1
            or (heads > 1 and x.stride(1) != d)
            or d % 2
            or cos.dtype != x.dtype
            or sin.dtype != x.dtype
            or cos.shape != (tokens, 1, d)
            or sin.shape != cos.shape
            or not (cos.is_contiguous() and sin.is_contiguous())
        ):
            return None
        out = torch.empty(tokens, heads, d, dtype=x.dtype)
        fn(
            x.data_ptr(),
            x.stride(0),
            cos.data_ptr(),
            sin.data_ptr(),
            out.data_ptr(),
            tokens,
            heads,
            d,
            torch.get_num_threads(),
        )
        return out


_SHARED: list[RowKernels] = []


def shared_row_kernels() -> RowKernels:
    """One RowKernels per process: what select_kernels hands the modules and the custom op
    below calls (built on first use; NativeUnavailable where they cannot be)."""
    if not _SHARED:
        _SHARED.append(RowKernels())
    return _SHARED[0]


@torch.library.custom_op("tokenmill::silu_mul_hadamard", mutates_args=())
def silu_mul_hadamard(x: torch.Tensor, block: int) -> torch.Tensor:
    """SiLU(gate) * up times the block Hadamard of quant/rotation.OnlineRotation, as one native
    pass, registered as an op so that a torch.compile'd layer calls it too (inductor would
    otherwise emit the Hadamard as a separate bf16 GEMM, ~100 us per layer at decode sizes)."""
    out = shared_row_kernels().silu_mul(x.contiguous(), block)
    if out is not None:
        return out
    from tokenmill.quant.rotation import hadamard  # shapes the kernel does not take

    d = x.shape[-1] // 2
    h = torch.nn.functional.silu(x[..., :d]) * x[..., d:]
    return (h.reshape(-1, block) @ hadamard(block).to(h.dtype)).view(h.shape)


@silu_mul_hadamard.register_fake
def _(x: torch.Tensor, block: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], x.shape[-1] // 2)


def select_kernels(
    model: torch.nn.Module, choice: str, device: torch.device, dtype, attention: bool = True
) -> str:
    """Give the model's norms and activations the native row kernels, and (with `attention`:
    a KV cache in the model dtype) swap its torch attention backends for native ones, where
    `choice` allows and the kernels build; returns 'native' or 'torch'. Then each layer's quant
    method drops the layouts its chosen kernel does not read (QuantMethod.settle)."""
    chosen = _select_kernels(model, choice, device, dtype, attention)
    from tokenmill.layers.linear import Linear

    for module in model.modules():
        settle = (
            getattr(module.quant_method, "settle", None) if isinstance(module, Linear) else None
        )
        if settle is not None:  # quant methods (plain layers hold one layout)
            settle()
    return chosen


def _select_kernels(model, choice, device, dtype, attention) -> str:
    from tokenmill.layers.activation import SiluAndMul
    from tokenmill.layers.attention import TorchAttention
    from tokenmill.layers.cpu_attention import NativeCpuAttention
    from tokenmill.layers.linear import Linear
    from tokenmill.layers.norm import RMSNorm
    from tokenmill.layers.rotary import RotaryEmbedding

    if choice not in CHOICES:
        raise ValueError(f"cpu_kernels must be one of {CHOICES}, got {choice!r}")
    if choice == "torch":
        return "torch"
    why = None
    if device.type != "cpu":
        why = f"the native kernels run on CPU, not {device.type}"
    elif dtype not in (torch.float32, torch.bfloat16):
        why = f"the native kernels take float32 and bfloat16, not {dtype}"
    if why is None:
        try:
            rows = shared_row_kernels()
            NativeCpuAttention.load()
        except native.NativeUnavailable as e:
            why = str(e)
    if why is not None:
        if choice == "native":
            raise RuntimeError(f"cpu_kernels=native is not available: {why}")
        log.info("torch kernels (%s)", why)
        return "torch"
    fp4 = True
    if hasattr(model, "attach_native_head"):  # layers/embedding.EmbeddingHead: a tied head
        model.attach_native_head()
    for module in model.modules():
        if isinstance(module, RMSNorm | SiluAndMul | RotaryEmbedding):
            module.native = rows
        # weight-only nvfp4/mxfp4/fp8 (quant/fp4_cpu.py), plain fp32/bf16 (layers/skinny.py)
        if fp4 and isinstance(module, Linear):
            try:
                module.quant_method.attach_native(module)
            except native.NativeUnavailable as e:
                log.info("torch path for FP4/FP8 weights (%s)", e)
                fp4 = False
        elif hasattr(module, "attach_native"):  # a GGUF table's rows (quant/methods/gguf.py)
            module.attach_native()
        backend = getattr(module, "backend", None)
        if attention and type(backend) is TorchAttention:
            module.backend = NativeCpuAttention(backend.scale)
    if hasattr(model, "compile_units"):  # decoder layers: each half as one call at decode
        from tokenmill.layers.fused_decode import build_inputs, build_outputs

        for unit in model.compile_units():
            unit.fuse_with(build_inputs, build_outputs)
    if hasattr(model, "loop_with"):  # and then the layers of a decode step as one call
        from tokenmill.layers.decode_layers import DecodeLayers

        model.loop_with(DecodeLayers.build)
    return "native"
