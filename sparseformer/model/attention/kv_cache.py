"""The key/value cache of decoding: a fixed number of slots per row, written in place.

A cache is a dict of arrays (a pytree, so it passes through `jax.jit` and is sharded like
the activations):

    k, v      [B, S, Hkv, D]   the keys (rotated) and values of the cached tokens
    position  [B, S] int32     each slot's position in its row's document, -1: empty

Token p of a row lives in slot p % S. With S the longest length a row reaches (dense
attention) no token is ever overwritten; with S = W (a window) the slots are a ring
buffer holding the last W tokens. Each row is one document (one prompt and what is
generated after it): rows of different lengths write to different slots, so nothing in
the cache depends on the batch's longest prompt.
"""

import jax
import jax.numpy as jnp

EMPTY = -1
NEG_INF = -1e30


def empty(batch, slots, kv_heads, head_dim, dtype):
  """A cache of `slots` empty slots per row."""
  return {'k': jnp.zeros((batch, slots, kv_heads, head_dim), dtype),
          'v': jnp.zeros((batch, slots, kv_heads, head_dim), dtype),
          'position': jnp.full((batch, slots), EMPTY, jnp.int32)}


def slot_positions(lengths, slots):
  """int32 [B, S]: the position each slot holds once a row of `lengths` [B] tokens is
  written (the newest token p with p % S == slot), -1 where none is."""
  slot = jnp.arange(slots, dtype=jnp.int32)
  last = lengths.astype(jnp.int32)[:, None] - 1
  position = last - jnp.mod(last - slot[None, :], slots)
  return jnp.where(position >= 0, position, EMPTY)


def fill(cache, k, v, lengths):
  """The cache after a prompt: k, v [B, P, Hkv, D] of prompts of `lengths` [B] tokens
  (right-padded to P); each slot takes the newest prompt token that maps to it. Entries
  of the cache other than k, v and position (a mechanism's own) are kept."""
  position = slot_positions(lengths, cache['position'].shape[1])
  source = jnp.clip(position, 0, k.shape[1] - 1)
  take = lambda a: jnp.take_along_axis(a, source[:, :, None, None], axis=1)  # noqa: E731
  present = (position >= 0)[:, :, None, None]
  return {**cache, 'k': jnp.where(present, take(k), 0).astype(cache['k'].dtype),
          'v': jnp.where(present, take(v), 0).astype(cache['v'].dtype),
          'position': position}


def append(cache, k_new, v_new, positions):
  """The cache with one token per row written: k_new, v_new [B, 1, Hkv, D] at
  `positions` [B] (slot position % S), the cache's other entries kept. A scatter of one slot per row: with the cache
  donated to the jitted step, XLA writes it in place rather than copying the cache."""
  rows = jnp.arange(positions.shape[0])
  slot = jnp.mod(positions, cache['position'].shape[1])
  put = lambda old, new: old.at[rows, slot].set(new[:, 0].astype(old.dtype))  # noqa: E731
  return {**cache, 'k': put(cache['k'], k_new), 'v': put(cache['v'], v_new),
          'position': cache['position'].at[rows, slot].set(positions.astype(jnp.int32))}


def causal(cache, positions):
  """bool [B, S]: the filled slots at or before the query's position [B]."""
  held = cache['position']
  return (held >= 0) & (held <= positions[:, None])


def attend(q, cache, visible, scale, key_bias=None):
  """Softmax attention of one query per row, q [B, 1, H, D], over the cached slots a
  `visible` mask allows: bool [B, S] (every head), [B, Hkv, S] (per kv head) or
  [B, H, S] (per query head); `key_bias` [B, Hkv, S], if given, is added to the scaled
  logits. Scores and the softmax in float32 (the matmuls accumulate in float32 from the
  cache's dtype: the cache is never copied to float32); y [B, 1, H, D] in q's dtype. A
  query that sees no slot gets zeros."""
  b, _, heads, d = q.shape
  k, v = cache['k'], cache['v']
  kv_heads = k.shape[2]
  group = heads // kv_heads
  qg = q[:, 0].reshape(b, kv_heads, group, d).astype(k.dtype)
  precision = jax.lax.Precision.HIGHEST
  scores = jnp.einsum('bhgd,bshd->bhgs', qg, k, precision=precision, preferred_element_type=jnp.float32) * scale
  if key_bias is not None:
    scores = scores + key_bias.astype(jnp.float32)[:, :, None, :]
  weights = masked_softmax(scores, visible_per_group(visible, kv_heads, group))
  y = jnp.einsum('bhgs,bshd->bhgd', weights.astype(v.dtype), v, precision=precision,
                 preferred_element_type=jnp.float32)
  return y.reshape(b, 1, heads, d).astype(q.dtype)


def attend_blocks(q, cache, blocks, block_size, positions, scale):
  """`attend` over the slots of chosen key blocks only: q [B, 1, H, D]; blocks int32
  [B, H, N], each query head's key blocks (block j: slots j * block_size onwards; -1: no
  block; no block twice), of which the slots at or before `positions` [B] are visible. The
  cache must keep token p in slot p (no ring buffer). It gathers those slots, so a step
  reads N * block_size slots per query head rather than every slot of the cache."""
  b, _, heads, d = q.shape
  k, v, held = cache['k'], cache['v'], cache['position']
  slots = held.shape[1]
  slot = (blocks[..., None] * block_size + jnp.arange(block_size)).reshape(b, heads, -1)  # [B, H, N * block]
  inside = jnp.repeat(blocks >= 0, block_size, axis=-1) & (slot < slots)
  slot = jnp.clip(slot, 0, slots - 1)
  rows = jnp.arange(b)[:, None, None]
  kv_head = (jnp.arange(heads) // (heads // k.shape[2]))[None, :, None]
  position = held[rows, slot]
  visible = inside & (position >= 0) & (position <= positions[:, None, None])
  precision = jax.lax.Precision.HIGHEST
  scores = jnp.einsum('bhd,bhnd->bhn', q[:, 0].astype(k.dtype), k[rows, slot, kv_head], precision=precision,
                      preferred_element_type=jnp.float32) * scale
  weights = masked_softmax(scores, visible)
  y = jnp.einsum('bhn,bhnd->bhd', weights.astype(v.dtype), v[rows, slot, kv_head], precision=precision,
                 preferred_element_type=jnp.float32)
  return y[:, None].astype(q.dtype)


def masked_softmax(scores, allowed):
  """Softmax over the last axis of float32 scores where `allowed`; zeros on a row with none."""
  scores = jnp.where(allowed, scores, NEG_INF)
  weights = jnp.exp(scores - scores.max(-1, keepdims=True)) * allowed
  return weights / jnp.maximum(weights.sum(-1, keepdims=True), 1e-30)


def visible_per_group(visible, kv_heads, group):
  """A visibility mask as bool [B, Hkv, G or 1, S] (query head h = kv head h // G)."""
  if visible.ndim == 2:
    return visible[:, None, None, :]
  if visible.shape[1] == kv_heads:
    return visible[:, :, None, :]
  return visible.reshape(visible.shape[0], kv_heads, group, visible.shape[-1])
