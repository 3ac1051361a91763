"""Evaluation: recall against reference captions (eval) and the quantization-cost report (bench-quant)."""
