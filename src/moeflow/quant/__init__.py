"""Quantized experts: group-wise int4/int8 weights, one contiguous block per expert (format.py)."""

from moeflow.quant.format import ExpertFormat, QuantSpec, parse_quant

__all__ = ["ExpertFormat", "QuantSpec", "parse_quant"]
