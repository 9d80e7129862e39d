"""compressed_mass: the one public function of this primitive.

    mass = compressed_mass(q, k_cmp, lse, q_segments, k_segments, scale=s, cmp_len=l,
                           cmp_stride=d, query_block=qb)       # float32 [B, Hkv, nQ, Tc]

q [B, T, H, D], k_cmp [B, Tc, Hkv, D] (compressed key j summarises tokens [j d, j d + l)),
lse [B, H, T] the log-sum-exp of q's attention over the compressed keys (None: computed),
q_segments [B, T] and k_segments [B, Tc] (or both None). The mass of a kv head is summed
over its GQA group's query heads. reference.py states the maths.
No gradient flows through it. `implementation`: None picks the best one available on this
platform; a name fails fast with the reason it cannot run; a list is tried in order.
"""

import jax

from pallas_kernels.implementations import Registry

KERNEL_MODULES = ('reference', 'triton_gpu')
PREFERENCE = {'gpu': ('triton', 'reference'), 'tpu': ('reference',), 'cpu': ('reference',)}

REGISTRY = Registry('compressed_mass', __package__, KERNEL_MODULES, PREFERENCE)
IMPLEMENTATIONS = REGISTRY.implementations


def compressed_mass(q, k_cmp, lse, q_segments, k_segments, *, scale, cmp_len, cmp_stride, query_block,
                    implementation=None):
  b, length, heads, dim = q.shape
  if k_cmp.ndim != 4 or k_cmp.shape[0] != b or k_cmp.shape[3] != dim or heads % k_cmp.shape[2]:
    raise ValueError(f'q {q.shape} and k_cmp {k_cmp.shape}: batch and head_dim must agree and H % Hkv == 0')
  if lse is not None and lse.shape != (b, heads, length):
    raise ValueError(f'lse must be [B, H, T] = {(b, heads, length)}, got {lse.shape}')
  if (q_segments is None) != (k_segments is None):
    raise ValueError('q_segments and k_segments come together (both None for rows of one document)')
  inputs = jax.lax.stop_gradient((q, k_cmp, lse, q_segments, k_segments))
  chosen = REGISTRY.select(implementation, *inputs, query_block)
  return chosen.forward(*inputs, scale=float(scale), cmp_len=cmp_len, cmp_stride=cmp_stride, query_block=query_block)
