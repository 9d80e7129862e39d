"""The attention mass of query blocks on compressed keys (NSA's and InfLLM-V2's block
votes): an exact reference (reference.py), a Pallas Triton kernel for GPUs (triton_gpu.py)
and the public function (api.py)."""

from pallas_kernels.compressed_mass.api import compressed_mass

__all__ = ['compressed_mass']
