"""The Mosaic GPU (Hopper, sm90) implementations: the forward kernel of
mosaic_gpu_forward.py with one of two backwards.

`mosaic_gpu`: the dQ and dK/dV kernels of mosaic_gpu_backward.py.
`mosaic_gpu_fused`: the single kv-major kernel of mosaic_gpu_backward_fused.py, dQ added
in a fixed order through GMEM semaphores (not measured on a GPU yet).

The `_interpret` variants run the same kernels in Mosaic GPU interpret mode on any
platform (tests on CPU).
"""

import functools

from pallas_kernels.block_sparse_attention import mosaic_gpu_backward, mosaic_gpu_backward_fused, mosaic_gpu_forward
from pallas_kernels.block_sparse_attention.implementation import Implementation


def unavailable(q, k, v, key_bias, plan, *, backward_module=mosaic_gpu_backward, interpret=False):
  """Why forward or backward cannot run on these inputs, or None."""
  return (mosaic_gpu_forward.unavailable(q, k, v, key_bias, plan, interpret=interpret)
          or backward_module.unavailable(q, k, v, key_bias, plan))


def _implementation(name, backward_module, interpret, platforms):
  return Implementation(name,
                        functools.partial(mosaic_gpu_forward.forward, interpret=interpret),
                        functools.partial(backward_module.backward, interpret=interpret),
                        platforms=platforms,
                        unavailable=functools.partial(unavailable, backward_module=backward_module,
                                                      interpret=interpret))


IMPLEMENTATIONS = (
    _implementation('mosaic_gpu', mosaic_gpu_backward, False, ('gpu',)),
    _implementation('mosaic_gpu_interpret', mosaic_gpu_backward, True, ('cpu', 'gpu')),
    _implementation('mosaic_gpu_fused', mosaic_gpu_backward_fused, False, ('gpu',)),
    _implementation('mosaic_gpu_fused_interpret', mosaic_gpu_backward_fused, True, ('cpu', 'gpu')),
)
