"""Precision: quantized formats (formats.py, elements.py), methods behind the linear layer's
quant-method seam (methods.py), and quality evaluation (eval.py)."""

from tokenmill.quant.formats import FORMATS, QuantizedTensor, quantize

__all__ = ["FORMATS", "QuantizedTensor", "quantize"]
