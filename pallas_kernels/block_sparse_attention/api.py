"""block_sparse_attention: the one public function of this primitive.

    out = block_sparse_attention(q, k, v, plan)                 # q [B,Tq,H,D], k/v [B,Tk,Hkv,D]
    out, lse = block_sparse_attention(..., return_lse=True)     # lse [B,H,Tq], natural log
    out = block_sparse_attention(..., key_bias=b)               # b [B,Hkv,Tk], gets a gradient
    out = block_sparse_attention(..., deterministic=True)       # bitwise reproducible gradients

A plan built for batch 1 without segment ids serves every batch row.

`implementation`: None picks the best one available on this platform; a name fails fast
with the reason it cannot run; a list is tried in order, with a warning naming why each
skipped one could not run. The custom_vjp lives here and nowhere else.

`deterministic`: an implementation may have a faster backward whose gradients are not
bitwise reproducible (on Hopper, one fused kernel that adds dQ atomically, as cuDNN and
FlashAttention-3 do). False asks for it, True for the reproducible one; None takes the
default (FUSED_BACKWARD_VERIFIED below), or what `with deterministic_backward(flag):`
says around the trace (training's `train.attention_backward`).
"""

import contextlib
import contextvars
import functools

import jax

from pallas_kernels.block_sparse_attention.plan import broadcast_batch
from pallas_kernels.implementations import Registry, shared_lowering

# Kernel modules, each exposing IMPLEMENTATIONS (see implementation.py).
KERNEL_MODULES = ('reference', 'tpu', 'mosaic_gpu')

# Preference order per platform when implementation=None.
PREFERENCE = {'gpu': ('mosaic_gpu', 'reference'), 'tpu': ('tpu', 'reference'), 'cpu': ('reference',)}

REGISTRY = Registry('block_sparse_attention', __package__, KERNEL_MODULES, PREFERENCE)
IMPLEMENTATIONS = REGISTRY.implementations


def select_implementation(implementation, q, k, v, key_bias, plan):
  return REGISTRY.select(implementation, q, k, v, key_bias, plan)


def check_shapes(q, k, v, key_bias, plan):
  if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
    raise ValueError(f'expected q [B,Tq,H,D] and k, v [B,Tk,Hkv,D]; got {q.shape}, {k.shape}, {v.shape}')
  b, tq, h, d = q.shape
  _, tk, hkv, _ = k.shape
  if h % hkv or k.shape[0] != b or k.shape[3] != d:
    raise ValueError(f'q {q.shape} and k {k.shape}: batch and head_dim must agree and H % Hkv == 0')
  if (tq, tk) != (plan.q_len, plan.kv_len):
    raise ValueError(f'plan is for lengths ({plan.q_len}, {plan.kv_len}), inputs have ({tq}, {tk})')
  if plan.kv_count.shape[0] not in (1, b) or h % plan.plan_heads or (plan.plan_heads > hkv and plan.plan_heads != h):
    raise ValueError(f'plan of shape {plan.kv_count.shape} (batch, plan heads, q blocks) does not fit '
                     f'batch {b}, {h} query heads, {hkv} kv heads')
  if key_bias is not None and key_bias.shape != (b, hkv, tk):
    raise ValueError(f'key_bias must be [B, Hkv, Tk] = {(b, hkv, tk)}, got {key_bias.shape}')


# The default of deterministic=None. FUSED_BACKWARD_VERIFIED=True would make the fused Hopper
# backward the default. It stays False: on an H200 the fused backward measured no faster than
# the two-kernel one (docs/benchmarks.md), which is reproducible; it runs when asked for
# (deterministic=False).
FUSED_BACKWARD_VERIFIED = False
_DETERMINISTIC = contextvars.ContextVar('deterministic_backward', default=not FUSED_BACKWARD_VERIFIED)


@contextlib.contextmanager
def deterministic_backward(enabled=True):
  """Inside, block_sparse_attention(deterministic=None) takes the reproducible backward
  (enabled) or the fast one (not). Read when the call is traced: enter it inside the
  function that jax.jit traces."""
  token = _DETERMINISTIC.set(bool(enabled))
  try:
    yield
  finally:
    _DETERMINISTIC.reset(token)


def block_sparse_attention(q, k, v, plan, *, scale=None, key_bias=None, implementation=None, return_lse=False,
                           deterministic=None):
  check_shapes(q, k, v, key_bias, plan)
  plan = broadcast_batch(plan, q.shape[0])
  scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
  deterministic = _DETERMINISTIC.get() if deterministic is None else bool(deterministic)
  chosen = select_implementation(implementation, q, k, v, key_bias, plan)
  out, lse = shared_lowering(_attention, 3)(chosen.name, scale, deterministic, q, k, v, key_bias, plan)
  return (out, lse) if return_lse else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _attention(name, scale, deterministic, q, k, v, key_bias, plan):
  return IMPLEMENTATIONS[name].forward(q, k, v, key_bias, plan, scale)


def _attention_fwd(name, scale, deterministic, q, k, v, key_bias, plan):
  out, lse = IMPLEMENTATIONS[name].forward(q, k, v, key_bias, plan, scale)
  return (out, lse), (q, k, v, key_bias, plan, out, lse)


def _attention_bwd(name, scale, deterministic, residuals, cotangents):
  q, k, v, key_bias, plan, out, lse = residuals
  d_out, d_lse = cotangents
  implementation = IMPLEMENTATIONS[name]
  backward = implementation.backward if deterministic else implementation.fast_backward or implementation.backward
  dq, dk, dv, d_bias = backward(q, k, v, key_bias, plan, scale, out, lse, d_out, d_lse)
  plan_cotangent = jax.tree.map(lambda x: None, plan)
  return dq, dk, dv, d_bias, plan_cotangent


_attention.defvjp(_attention_fwd, _attention_bwd)
