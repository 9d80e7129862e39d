"""Chunked gated linear attention with per-channel log decay, segment resets and state in/out:
an exact reference (reference.py) and the public function (api.py)."""

from pallas_kernels.linear_attention.api import gated_linear_attention

__all__ = ['gated_linear_attention']
