"""Precision configuration (`QuantConfig`): which quantization method, and how it is calibrated.

Part of `EngineConfig` (config.py), split out so that each file stays one subsystem's worth.
Every field carries its documentation in `metadata["help"]`; the CLI builds `--help` from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

FORMATS = ("int8", "int4", "fp8_e4m3", "fp8_e5m2", "fp6_e3m2", "fp6_e2m3", "mxfp4", "nvfp4")
QUANTIZERS = ("w8a8", "fp8", *FORMATS)  # the methods that quantize a 16/32-bit checkpoint
QUANTIZATIONS = (*QUANTIZERS, "gguf")  # quant/methods' METHODS is this tuple
ROTATION_SEED = 0
BLOCK_SCALED = ("nvfp4", "mxfp4", "fp6_e3m2", "fp6_e2m3", "int4")  # scale_search.SEARCHABLE


def doc_field(text: str, **kw: Any) -> Any:
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class QuantConfig:
    """Weight and activation precision, quantized at load time from a 16/32-bit checkpoint."""

    quantization: str | None = doc_field(
        "w8a8 (int8 weights x int8 per-token activations), fp8 (E4M3 weights and activations), "
        "or a format for weight-only: int8, int4, fp8_e4m3, fp8_e5m2, fp6_e3m2, fp6_e2m3, mxfp4, "
        "nvfp4; or gguf: a .gguf model served from its own codes (Q4_0, Q4_1, Q5_*, Q8_0, "
        "Q4_K, Q5_K, Q6_K: the file's size in memory, its bits per weight read per token) "
        "instead of dequantized to --dtype at load. Default: none, or what a quantized "
        "checkpoint says.",
        default=None,
    )
    activation_scaling: str = doc_field(
        "fp8 activation scales: current (each token's amax, every step) or delayed (one scale "
        "from the amax history of earlier steps, as Transformer Engine does).",
        default="current",
    )
    amax_history_len: int = doc_field("Steps of amax history for delayed scaling.", default=16)
    group_size: int | None = doc_field(
        "int4 group size (32, 64 or 128); default 128, or the largest that divides the rows.",
        default=None,
    )
    gptq: bool = doc_field(
        "Choose weight codes with GPTQ (error-compensating, from the Hessian of each layer's "
        "inputs on a few windows of held-out text) instead of round-to-nearest; same format and "
        "kernels, a slower load.",
        default=False,
    )
    smoothquant_alpha: float | None = doc_field(
        "w8a8 and fp8: SmoothQuant migration strength in [0, 1], calibrated at load on a few "
        "windows of text; 0 turns smoothing off. Default 0.5, or 0 with --rotate (the rotation "
        "already flattens the inputs; smoothing on top measured worse).",
        default=None,
    )
    smoothquant_search: bool = doc_field(
        "w8a8 and fp8: choose SmoothQuant's alpha per layer (0 to 0.8) for the least output "
        "error of the quantized layer on sampled calibration tokens, instead of one alpha.",
        default=False,
    )
    scale_search: bool = doc_field(
        "nvfp4, mxfp4, fp6_*, int4: choose each block's scale (int4: its clipped range) for the "
        "least error, weighted by each input channel's E[x^2] on calibration text (same format; "
        "a slower load).",
        default=False,
    )
    activation_zero_point: bool = doc_field(
        "w8a8: per-token activation codes with a zero point (asymmetric), so that skewed inputs "
        "use the whole int8 range: lower error, about 10% slower on CPU (BENCHMARKS.md).",
        default=False,
    )
    calibration_windows: int = doc_field(
        "Windows of 512 tokens of calibration text (Hamlet; evaluation uses another play) that "
        "SmoothQuant, AWQ, GPTQ and the scale search fit on; more fit better, load slower.",
        default=16,
    )
    awq: bool = doc_field(
        "Weight-only formats: AWQ input-channel scaling (each input channel's weights scaled by "
        "E[x^2]^(alpha/2) from calibration text, alpha searched per layer, the input divided "
        "back at run time); composes with --scale-search and --gptq (a slower load).",
        default=False,
    )
    quantize_embedding: bool = doc_field(
        "Weight-only formats: store the token embedding and the LM head in the format too, as "
        "llama.cpp does (by default both stay in the model dtype, as in vLLM). A tied table is "
        "stored once; the head gets the layers' calibration (GPTQ, scale search), which it "
        "needs: on the bundled model round-to-nearest nvfp4 costs the head +8.6% perplexity, "
        "GPTQ + scale search +0.9% (BENCHMARKS.md).",
        default=False,
    )

    rotate: bool = doc_field(
        "Rotate the model before quantizing (QuaRot): an orthogonal change of basis of the "
        "residual stream and of each head's values, folded into the weights, and a block "
        "Hadamard of down_proj's input at run time; the same function, with activation outliers "
        "spread over all channels. For w8a8 (its KL halves on the bundled model); fp8 and the "
        "weight-only formats measured worse there (BENCHMARKS.md). A tied LM head is untied "
        "(one more vocab x hidden matrix).",
        default=False,
    )

    rotation_search: int = doc_field(
        "With --rotate: try this many random rotations, each quantized on a copy of the model, "
        "and keep the one that moves the log-likelihood of 4 calibration windows least (the "
        "seeds differ by up to 1% perplexity with w8a8 here); a slower load, twice the model "
        "in memory meanwhile. 0 or 1: seed 0.",
        default=0,
    )

    def __post_init__(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATIONS:
            raise ValueError(
                f"quantization must be one of {QUANTIZATIONS}, got {self.quantization!r}"
            )
        if self.quantization == "gguf":
            tuned = [n for n in ("gptq", "awq", "scale_search", "rotate", "quantize_embedding")
                     if getattr(self, n)]  # fmt: skip
            if tuned:
                raise ValueError(
                    f"quantization gguf serves a GGUF file's codes as they are; {tuned[0]} "
                    "does not apply to it (the embedding and head are served from the file too)"
                )
        if self.activation_scaling not in ("current", "delayed"):
            raise ValueError(
                f"activation_scaling must be current or delayed, got {self.activation_scaling!r}"
            )
        if self.amax_history_len < 1:
            raise ValueError(f"amax_history_len must be >= 1, got {self.amax_history_len}")
        if self.smoothquant_alpha is not None and not 0.0 <= self.smoothquant_alpha <= 1.0:
            raise ValueError(f"smoothquant_alpha must be in [0, 1], got {self.smoothquant_alpha}")
        if self.group_size not in (None, 32, 64, 128):
            raise ValueError(f"group_size must be 32, 64 or 128, got {self.group_size}")
        if self.scale_search and self.quantization not in BLOCK_SCALED:
            raise ValueError(
                f"scale_search applies to quantization {BLOCK_SCALED}, got {self.quantization!r}"
            )

        if self.smoothquant_search and self.quantization not in ("w8a8", "fp8"):
            raise ValueError(
                f"smoothquant_search applies to w8a8 and fp8, got quantization {self.quantization!r}"
            )
        if self.activation_zero_point and self.quantization != "w8a8":
            raise ValueError(
                f"activation_zero_point applies to w8a8, got quantization {self.quantization!r}"
            )
        if self.quantize_embedding and self.quantization not in FORMATS:
            raise ValueError(
                "quantize_embedding applies to weight-only quantization (a format such as nvfp4 "
                f"or int4), got {self.quantization!r}"
            )
        if self.rotate and self.quantization is None:
            raise ValueError("rotate applies to a quantization (such as w8a8); none was given")
        if self.rotation_search < 0:
            raise ValueError(f"rotation_search must be >= 0, got {self.rotation_search}")
        if self.rotation_search > 1 and not self.rotate:
            raise ValueError("rotation_search chooses among rotations: add rotate (--rotate)")
        if self.calibration_windows < 1:
            raise ValueError(f"calibration_windows must be >= 1, got {self.calibration_windows}")
        if self.awq and self.quantization in (None, "w8a8", "fp8"):
            raise ValueError(
                "awq applies to weight-only quantization (a format such as nvfp4 or int4); "
                f"got {self.quantization!r} (w8a8 and fp8 use smoothquant_alpha)"
            )

    @property
    def alpha(self) -> float:
        """SmoothQuant's alpha in effect."""
        if self.smoothquant_alpha is not None:
            return self.smoothquant_alpha
        return 0.0 if self.rotate else 0.5

    @property
    def rotation_seeds(self) -> tuple[int, ...] | None:
        """The seeds of the rotations to try (the first alone without a search); None: none."""
        if not self.rotate:
            return None
        return tuple(range(ROTATION_SEED, ROTATION_SEED + max(1, self.rotation_search)))

    def method_options(self) -> dict[str, Any]:
        """Keyword arguments for quant/methods.make_method."""
        common: dict[str, Any] = {"gptq": True} if self.gptq else {}
        if self.scale_search:
            common["scale_search"] = True
        if self.awq:
            common["awq"] = True
        if self.calibration_windows != 16:
            common["calibration_windows"] = self.calibration_windows
        if self.smoothquant_search:
            common["smoothquant_search"] = True
        if self.quantization == "fp8":
            return {
                "activation_scaling": self.activation_scaling,
                "amax_history_len": self.amax_history_len,
                "smoothquant_alpha": self.alpha,
                **common,
            }
        if self.quantization == "w8a8":
            if self.activation_zero_point:
                common["activation_zero_point"] = True
            return {"smoothquant_alpha": self.alpha, **common}
        if self.quantization == "int4":
            return {"group_size": self.group_size, **common}
        return common
