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

With `model.attention.dynamic_mask.block_smooth` = majority or budget the selection is
made of whole key blocks per query block instead (dynamic_mask_plan.smoothed_block_mask),
so that tiles are skipped or visited whole.

Decoding: the cache holds every token's key, value and delta (a slot per position);
`decode_key_score` gives a new token's delta from its value, and `decode_keep` the keys of
the cache the newest query keeps (the top-W, or the smoothed blocks).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import block_sparse_attention
from sparseformer.model.attention import dynamic_mask_plan as dmp
from sparseformer.model.attention import kv_cache
from sparseformer.model.attention.base import (KEYS, QUERIES, Mechanism, Option, kernel, mean_causal_keys, no_aux,
                                               plan_layout, register, softmax_flops, softmax_scale)
from sparseformer.model.layers import param


def key_scores(v, dt_weight, dt_scale):
  """delta [B, Hkv, T] float32 of values v [B, T, Hkv, d], W_dt [Hkv, d, Hkv], A [Hkv]."""
  z = jnp.einsum('bthd,hdg->bgt', v.astype(jnp.float32), dt_weight.astype(jnp.float32))
  return dt_scale.astype(jnp.float32)[None, :, None] * jax.nn.softplus(z)


def decode_key_score(v_new, dt_weight, dt_scale):
  """delta [B, Hkv] of one new token's values v_new [B, Hkv, d]."""
  return key_scores(v_new[:, None], dt_weight, dt_scale)[:, :, 0]


def decode_keep(cache_scores, length, window, block_smooth='none', block=128):
  """bool [B, Hkv, L]: the keys the newest query (position length - 1) keeps among the
  first `length` (an int, or [B] one per row) entries of a cache of scores [B, Hkv, L]
  (one document): the `window` largest, ties to the earlier key (as in prefill), or
  under block smoothing the blocks of `block` keys that prefill keeps for that query."""
  length = jnp.reshape(length, (-1, 1, 1))
  if block_smooth != 'none':
    return _decode_keep_smoothed(cache_scores, length, window, block_smooth, block)
  valid = jnp.arange(cache_scores.shape[-1]) < length
  order_key = jnp.where(valid, -cache_scores.astype(jnp.float32), jnp.inf)
  order = jnp.argsort(order_key, axis=-1, stable=True)
  place = jnp.argsort(order, axis=-1)
  return valid & (place < window)


def _decode_keep_smoothed(cache_scores, length, window, block_smooth, block):
  """The smoothed rule of prefill for the newest query: its block's first query f votes
  with its own top-`window` keys; the first block and f's block are always kept."""
  size = cache_scores.shape[-1]
  blocks = -(-size // block)
  newest_block = (length - 1) // block
  first_query_keeps = decode_keep(cache_scores, newest_block * block + 1, window)
  padded = jnp.pad(first_query_keeps, ((0, 0), (0, 0), (0, blocks * block - size)))
  counts = padded.reshape(padded.shape[:2] + (blocks, block)).sum(-1)  # [B, Hkv, blocks]
  key_block = jnp.arange(blocks)
  forced = (key_block == 0) | (key_block == newest_block)
  voted = (key_block > 0) & (key_block < newest_block)
  chosen = dmp.vote(counts, jnp.broadcast_to(voted, counts.shape), forced, window, block, block_smooth)
  kept_blocks = forced | chosen
  keys = jnp.arange(size)
  return kept_blocks[..., keys // block] & (keys < length)


@register('dynamic_mask')
class DynamicMaskAttention(Mechanism):
  argument_meaning = ('keep count', 1024)
  options_section = 'dynamic_mask'  # model.attention.dynamic_mask, docs/dynamic_mask.md
  OPTIONS = {'block_smooth': Option('none', 'none (exact top-W) | majority | budget: whole key blocks per q block',
                                    choices=dmp.SMOOTHINGS)}

  def __init__(self, dims, layer_index, rngs):
    super().__init__(dims, layer_index, rngs)
    kv_heads, head_dim = dims.num_kv_heads, dims.head_dim
    self.dt_weight = param(rngs, (kv_heads, head_dim, kv_heads), ('kv_heads', 'head_dim', 'kv_heads'),
                           dtype=dims.weight_dtype, std=dims.init_std)
    # Doge initialises A with N(0, initializer_range), so the bias starts near zero.
    self.dt_scale = param(rngs, (kv_heads,), ('kv_heads',), dtype=dims.weight_dtype, std=dims.init_std)

  @property
  def window(self):
    return self.argument

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    """Each query's top-w keys of its past (the tiles the kernel visits are logged as
    dma_tile_fraction; partial tiles cost more than this)."""
    return softmax_flops(dims.num_heads, dims.head_dim, mean_causal_keys(seq_len, argument))

  def forward(self, q, k, v, ctx):
    block, smoothing = self.block_size, self.options.dynamic_mask.block_smooth
    delta = key_scores(v, self.dt_weight[...], self.dt_scale[...])
    segments = None if ctx.segment_ids is None else ctx.segment_ids.astype(jnp.int32)
    if smoothing == 'none':
      plan, thresholds = dmp.dynamic_mask_plan(delta, self.window, block_q=block, block_kv=block, segment_ids=segments)
      kept = dmp.kept_fraction(thresholds, self.window, segments)
    else:
      plan, block_keep = dmp.smoothed_plan(delta, self.window, smoothing, block_q=block, block_kv=block,
                                           segment_ids=segments)
      kept = dmp.smoothed_kept_fraction(block_keep, q.shape[1], block, block, segments)
    y = self.attend(q, k, v, plan, delta, scale=softmax_scale(q, ctx))
    aux = no_aux()
    aux['stats']['dma_kept_fraction'] = kept
    aux['stats']['dma_tile_fraction'] = dmp.active_tile_fraction(plan, segments)
    return y, aux

  @kernel(QUERIES, KEYS, KEYS, plan_layout('kv_heads'), 'batch kv_heads .', out=QUERIES)
  def attend(self, q, k, v, plan, delta, *, scale):
    """Attention over the plan, with the key bias delta [B, Hkv, T] on every logit."""
    return block_sparse_attention(q, k, v, plan, scale=scale, key_bias=delta)

  # --------------------------------------------------------------------------------------
  # decoding: a slot per position (every key may stay among the top W) and each key's delta

  def init_cache(self, batch, max_len, kv_heads, head_dim, dtype):
    """The key/value slots and `score` [B, Hkv, S] float32, each slot's delta."""
    cache = super().init_cache(batch, max_len, kv_heads, head_dim, dtype)
    return cache | {'score': jnp.zeros((batch, kv_heads, max_len), jnp.float32)}

  def prefill(self, q, k, v, ctx, cache, lengths):
    y, filled = super().prefill(q, k, v, ctx, cache, lengths)
    delta = key_scores(v, self.dt_weight[...], self.dt_scale[...])
    held = filled['position']
    score = jnp.take_along_axis(delta, jnp.clip(held, 0, v.shape[1] - 1)[:, None], axis=-1)
    return y, filled | {'score': jnp.where(held[:, None] >= 0, score, 0.0)}

  def decode(self, q, k, v, ctx, cache):
    """The new token's delta joins the cache; the query keeps what decode_keep keeps of
    its past (slot = position: the cache holds max_len slots)."""
    positions = ctx.positions[:, 0]
    delta = decode_key_score(v[:, 0], self.dt_weight[...], self.dt_scale[...])
    slots = cache['score'].shape[-1]
    here = jnp.arange(slots) == jnp.mod(positions, slots)[:, None, None]
    cache = kv_cache.append(cache, k, v, positions) | {
        'score': jnp.where(here, delta[..., None], cache['score'])}
    keep = decode_keep(cache['score'], positions + 1, self.window, self.options.dynamic_mask.block_smooth,
                       self.block_size)
    return kv_cache.attend(q, cache, keep, softmax_scale(q, ctx), key_bias=cache['score']), cache
