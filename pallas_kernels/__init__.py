"""Pallas kernels for sparseformer's attention primitives.

This package knows nothing of sparseformer. Each primitive is a folder with the same
faces: `reference.py` (exact jnp, the test oracle), the hardware kernels
(`mosaic_gpu.py`, `tpu.py`, or a Triton kernel through jax_triton), and `api.py`, the one
public function, which owns the `custom_vjp` and chooses an implementation.
"""
