"""Precision: quantized formats and methods (to come), and quality evaluation (eval.py)."""
