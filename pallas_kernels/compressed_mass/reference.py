"""compressed_mass in jnp: the definition, and the CPU/TPU implementation.

For query head h, query block I (tokens [I qb, (I + 1) qb)) and compressed key j (the
span [j d, j d + l) of the keys; l = cmp_len, d = cmp_stride):

    mass[b, g, I, j] = sum over the query heads h of kv head g's group and over voting t in
                       block I of  visible(t, j) exp(s_h[t, j] - lse[h, t])

with s = q_t . k_j x scale, visible(t, j) = the span is complete at t (j d + l - 1 <= t),
t < T, and, with segment ids, the query's document is the span's. A token votes unless
its segment id is 0 (padding). lse is the log-sum-exp of s over the keys t sees (given:
the compressed attention's own; None: computed here), so each voting row's masses sum to
1 (0 for a row that sees nothing). The result is float32 [B, Hkv, nQ, Tc], summed over
each GQA group's heads (NSA's eq. 10: the group shares its choice); it carries no
gradient (the selection it feeds is discrete).
"""

import jax
import jax.numpy as jnp
import numpy as np

# Probabilities held at once (float32): query blocks go through lax.map in groups of up to
# this many, so memory stays bounded (never [T, Tc] for all heads at once).
STEP_ELEMENTS = 2 ** 24


def num_blocks(length, block):
  return -(-length // block)


def visibility(query_index, length, count, cmp_len, cmp_stride):
  """bool [q, Tc]: compressed key j complete at query t (t < length), documents aside."""
  key_end = np.arange(count) * cmp_stride + cmp_len - 1
  return (key_end <= query_index[:, None]) & (query_index < length)[:, None]


def softmax_where(s, visible):
  """float32 softmax of s over its last axis where `visible`, 0 elsewhere (a row that sees
  nothing: all 0)."""
  s = jnp.where(visible, s, -jnp.inf)
  row_max = s.max(-1, keepdims=True)
  row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  p = jnp.exp(s - row_max)
  return p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)


def padded_blocks(x, block, axis=1):
  """x with `axis` padded to whole blocks and split: [..., n, block, ...] at `axis`."""
  length = x.shape[axis]
  pad = [(0, 0)] * x.ndim
  pad[axis] = (0, -length % block)
  x = jnp.pad(x, pad)
  return x.reshape(*x.shape[:axis], -1, block, *x.shape[axis + 1:])


def compressed_mass(q, k_cmp, lse, q_segments, k_segments, *, scale, cmp_len, cmp_stride, query_block):
  b, length, heads, dim = q.shape
  count, kv_heads = k_cmp.shape[1], k_cmp.shape[2]
  group = heads // kv_heads
  nq = num_blocks(length, query_block)
  queries = jnp.moveaxis(padded_blocks(q.reshape(b, length, kv_heads, group, dim), query_block), 1, 0)
  voters = jnp.ones((b, length), bool) if q_segments is None else q_segments != 0
  blocks = [queries, jnp.moveaxis(padded_blocks(voters, query_block), 1, 0)]  # [nQ, B, qb, ...]
  if q_segments is not None:
    blocks.append(jnp.moveaxis(padded_blocks(q_segments.astype(jnp.int32), query_block), 1, 0))
  if lse is not None:
    lse = jnp.moveaxis(lse.astype(jnp.float32).reshape(b, kv_heads, group, length), -1, 1)  # [B, T, Hkv, G]
    blocks.append(jnp.moveaxis(padded_blocks(lse, query_block), 1, 0))

  def block_mass(args):
    index, queries, voters, *rest = args
    segments = rest.pop(0) if q_segments is not None else None
    query_index = index * query_block + jnp.arange(query_block)
    visible = visibility(query_index, length, count, cmp_len, cmp_stride)[None]  # [1, qb, Tc]
    if segments is not None:
      visible = visible & (segments[:, :, None] == k_segments[:, None, :])
    visible = (visible & voters[:, :, None])[:, :, None, None, :]  # [B, qb, 1, 1, Tc]
    s = jnp.einsum('bqkgd,bjkd->bqkgj', queries, k_cmp, preferred_element_type=jnp.float32) * scale
    if lse is None:
      p = softmax_where(s, visible)
    else:
      p = jnp.exp(jnp.where(visible, s, -jnp.inf) - rest[0][..., None])  # exactly 0 where not visible
    return p.sum((1, 3))  # [B, Hkv, Tc]

  if count == 0:
    return jnp.zeros((b, kv_heads, nq, 0), jnp.float32)
  per_step = max(1, STEP_ELEMENTS // (b * query_block * heads * count))
  mass = jax.lax.map(block_mass, (jnp.arange(nq), *blocks), batch_size=min(per_step, nq))  # [nQ, B, Hkv, Tc]
  return jnp.moveaxis(mass, 0, 2)


def _implementation():
  from pallas_kernels.implementations import Implementation
  return Implementation('reference', compressed_mass, None)


IMPLEMENTATIONS = (_implementation(),)
