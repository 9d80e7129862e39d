"""gated_linear_attention: the one public function of this primitive.

    o = gated_linear_attention(q, k, v, g)              # q, k, g [B,T,H,Dk], v [B,T,H,Dv]
    o, state = gated_linear_attention(..., return_final_state=True)   # state [B,H,Dk,Dv] f32
    o = gated_linear_attention(..., segment_ids=ids, initial_state=s0)

g is the per-key-channel log decay (<= 0). The maths, the segment and state conventions
are in reference.py. `implementation`: None picks the best one available on this platform;
a name fails fast with the reason it cannot run; a list is tried in order, with a warning
naming why each skipped one could not run. The custom_vjp lives here and nowhere else.

Each kernel module exposes IMPLEMENTATIONS, a tuple of block_sparse_attention's
Implementation records with these signatures:
    forward(q, k, v, g, initial_state, segment_ids, scale) -> (o q.dtype, final_state f32)
    backward(q, k, v, g, initial_state, segment_ids, scale, o, final_state, d_o, d_final_state)
        -> (dq, dk, dv, dg, d_initial_state or None)
    unavailable(q, k, v, g, initial_state, segment_ids) -> None or the reason it cannot run
"""

import functools

import jax

from pallas_kernels.implementations import Registry, shared_lowering

KERNEL_MODULES = ('reference', 'tpu', 'triton_gpu')

# Preference order per platform when implementation=None. The Triton kernels' `-m gpu` tests
# passed on an H200 (2026-12-03), so they are the GPU default.
PREFERENCE = {'gpu': ('triton', 'reference'), 'tpu': ('tpu', 'reference'), 'cpu': ('reference',)}

REGISTRY = Registry('gated_linear_attention', __package__, KERNEL_MODULES, PREFERENCE)
IMPLEMENTATIONS = REGISTRY.implementations


def select_implementation(implementation, *inputs):
  """The Implementation to run on inputs (q, k, v, g, initial_state, segment_ids)."""
  return REGISTRY.select(implementation, *inputs)


def check_shapes(q, k, v, g, initial_state, segment_ids):
  if q.ndim != 4 or k.shape != q.shape or g.shape != q.shape:
    raise ValueError(f'expected q, k, g [B,T,H,Dk] of one shape; got {q.shape}, {k.shape}, {g.shape}')
  b, t, h, dk = q.shape
  if v.ndim != 4 or v.shape[:3] != (b, t, h):
    raise ValueError(f'v must be [B,T,H,Dv] = [{b},{t},{h},Dv], got {v.shape}')
  if initial_state is not None and initial_state.shape != (b, h, dk, v.shape[3]):
    raise ValueError(f'initial_state must be [B,H,Dk,Dv] = {(b, h, dk, v.shape[3])}, got {initial_state.shape}')
  if segment_ids is not None and segment_ids.shape != (b, t):
    raise ValueError(f'segment_ids must be [B,T] = {(b, t)}, got {segment_ids.shape}')


def gated_linear_attention(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None, implementation=None,
                           return_final_state=False):
  inputs = (q, k, v, g, initial_state, segment_ids)
  check_shapes(*inputs)
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  chosen = select_implementation(implementation, *inputs)
  o, final_state = shared_lowering(_linear_attention)(chosen.name, scale, *inputs)
  return (o, final_state) if return_final_state else o


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _linear_attention(name, scale, q, k, v, g, initial_state, segment_ids):
  return IMPLEMENTATIONS[name].forward(q, k, v, g, initial_state, segment_ids, scale)


def _linear_attention_fwd(name, scale, q, k, v, g, initial_state, segment_ids):
  o, final_state = IMPLEMENTATIONS[name].forward(q, k, v, g, initial_state, segment_ids, scale)
  return (o, final_state), (q, k, v, g, initial_state, segment_ids, o, final_state)


def _linear_attention_bwd(name, scale, residuals, cotangents):
  q, k, v, g, initial_state, segment_ids, o, final_state = residuals
  d_o, d_final_state = cotangents
  dq, dk, dv, dg, d_state = IMPLEMENTATIONS[name].backward(q, k, v, g, initial_state, segment_ids, scale, o,
                                                           final_state, d_o, d_final_state)
  return dq, dk, dv, dg, d_state, None


_linear_attention.defvjp(_linear_attention_fwd, _linear_attention_bwd)

