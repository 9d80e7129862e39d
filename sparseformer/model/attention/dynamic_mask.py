"""Dynamic mask attention (DMA; Shi et al., arXiv 2508.02124; research/mechanisms.md section 4).

    dynamic_mask:W   each query sees the W keys of its causal past (within its document)
                     with the largest learned score, and every logit gets that score

The score of a key comes from its value: delta = A * softplus(V_flat W_dt), per (batch,
kv head, key), V_flat the token's values of all kv heads, W_dt [(Hkv x d) -> Hkv], A one
scale per kv head (the log-space form of the current reference code; A multiplies the
head axis). delta is the additive key bias of the logits (not multiplied by the softmax
scale) and receives the gradient; the top-W selection is made on the detached delta and
is not differentiated. The selection becomes a block-sparse plan per kv head with a rank
rule inside partial tiles (dynamic_mask_plan.py): no T x T mask anywhere.

Decoding: `decode_key_score` gives a new token's delta from its value, and `decode_keep`
the top-W keys of a cache for the newest query.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import block_sparse_attention
from sparseformer.model.attention import dynamic_mask_plan as dmp
from sparseformer.model.attention.base import Mechanism, no_aux, register
from sparseformer.model.layers import param


def key_scores(v, dt_weight, dt_scale):
  """delta [B, Hkv, T] float32 of values v [B, T, Hkv, d], W_dt [Hkv, d, Hkv], A [Hkv]."""
  z = jnp.einsum('bthd,hdg->bgt', v.astype(jnp.float32), dt_weight.astype(jnp.float32))
  return dt_scale.astype(jnp.float32)[None, :, None] * jax.nn.softplus(z)


def decode_key_score(v_new, dt_weight, dt_scale):
  """delta [B, Hkv] of one new token's values v_new [B, Hkv, d]."""
  return key_scores(v_new[:, None], dt_weight, dt_scale)[:, :, 0]


def decode_keep(cache_scores, length, window):
  """bool [B, Hkv, L]: the keys the newest query (position length - 1) keeps among the
  first `length` entries of a cache of scores [B, Hkv, L]: the `window` largest, ties to
  the earlier key (as in prefill)."""
  valid = jnp.arange(cache_scores.shape[-1]) < length
  order_key = jnp.where(valid, -cache_scores.astype(jnp.float32), jnp.inf)
  order = jnp.argsort(order_key, axis=-1, stable=True)
  place = jnp.argsort(order, axis=-1)
  return valid & (place < window)


@register('dynamic_mask')
class DynamicMaskAttention(Mechanism):

  def __init__(self, dims, layer_index, rngs):
    super().__init__(dims, layer_index, rngs)
    kv_heads, head_dim = dims.num_kv_heads, dims.head_dim
    self.dt_weight = param(rngs, (kv_heads, head_dim, kv_heads), ('kv_heads', 'head_dim', 'kv_heads'),
                           dtype=dims.weight_dtype, std=dims.init_std)
    # Doge initialises A with N(0, initializer_range), so the bias starts near zero.
    self.dt_scale = param(rngs, (kv_heads,), ('kv_heads',), dtype=dims.weight_dtype, std=dims.init_std)

  @classmethod
  def check_argument(cls, argument):
    if argument is None or not argument.isdigit() or int(argument) < 1:
      return f'{cls.name} needs a positive keep count, e.g. {cls.name}:1024'
    return None

  @property
  def window(self):
    return int(self.argument)

  def __call__(self, q, k, v, ctx):
    block = self.options.block_size
    delta = key_scores(v, self.dt_weight[...], self.dt_scale[...])
    plan, thresholds = dmp.dynamic_mask_plan(delta, self.window, block_q=block, block_kv=block,
                                             segment_ids=ctx.segment_ids)
    scale = ctx.logit_scale / q.shape[-1] ** 0.5
    y = block_sparse_attention(q, k, v, plan, scale=scale, key_bias=delta)
    aux = no_aux()
    segments = None if ctx.segment_ids is None else ctx.segment_ids.astype(jnp.int32)
    aux['stats']['dma_kept_fraction'] = dmp.kept_fraction(thresholds, self.window, segments)
    aux['stats']['dma_tile_fraction'] = dmp.active_tile_fraction(plan, segments)
    return y, aux
