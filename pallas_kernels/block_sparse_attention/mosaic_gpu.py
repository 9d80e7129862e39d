"""The Mosaic GPU (Hopper, sm90) implementation: the forward kernel of
mosaic_gpu_forward.py; the deterministic dQ and dK/dV kernels of mosaic_gpu_backward.py,
and the fused backward of mosaic_gpu_fused_backward.py (atomic dQ; its fast_backward,
taken with deterministic=False, see api.py).

`mosaic_gpu` runs on an sm90 GPU; `mosaic_gpu_interpret` runs the same kernels in
Mosaic GPU interpret mode on any platform (tests on CPU).
"""

import functools

from pallas_kernels.block_sparse_attention import mosaic_gpu_backward, mosaic_gpu_forward, mosaic_gpu_fused_backward
from pallas_kernels.block_sparse_attention.implementation import Implementation


def unavailable(q, k, v, key_bias, plan, *, interpret=False):
  """Why forward or backward cannot run on these inputs, or None."""
  return (mosaic_gpu_forward.unavailable(q, k, v, key_bias, plan, interpret=interpret)
          or mosaic_gpu_backward.unavailable(q, k, v, key_bias, plan))


def _implementation(name, interpret, platforms):
  return Implementation(name,
                        functools.partial(mosaic_gpu_forward.forward, interpret=interpret),
                        functools.partial(mosaic_gpu_backward.backward, interpret=interpret),
                        platforms=platforms,
                        unavailable=functools.partial(unavailable, interpret=interpret),
                        fast_backward=functools.partial(mosaic_gpu_fused_backward.backward, interpret=interpret))


IMPLEMENTATIONS = (
    _implementation('mosaic_gpu', False, ('gpu',)),
    _implementation('mosaic_gpu_interpret', True, ('cpu', 'gpu')),
)
