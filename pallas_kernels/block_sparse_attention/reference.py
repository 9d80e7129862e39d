"""Exact block-sparse attention in jnp: the oracle every kernel is tested against.

It walks the plan's compacted lists like a kernel does (q-major for the output and dQ,
kv-major for dK, dV and d(key_bias)), vectorised over q blocks (or kv blocks), so
memory stays O(T x block) and the transposed lists are exercised too. Computation is in
float32. Fully masked rows give zero output, LSE = EMPTY_ROW_LSE and zero gradients.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention.implementation import Implementation

EMPTY_ROW_LSE = -1e30  # finite: merging LSEs with logaddexp treats it as zero mass


def _blocks(x, length_axis, block):
  """[B, T, heads, D] -> [B, heads, n, block, D], zero-padded to whole blocks."""
  b, t, h, d = x.shape
  n = -(-t // block)
  x = jnp.pad(x, ((0, 0), (0, n * block - t), (0, 0), (0, 0)))
  return x.reshape(b, n, block, h, d).transpose(0, 3, 1, 2, 4)


def _row_blocks(x, block, fill):
  """[B, heads, T] -> [B, heads, n, block] padded with `fill`."""
  t = x.shape[-1]
  n = -(-t // block)
  return jnp.pad(x, ((0, 0), (0, 0), (0, n * block - t)), constant_values=fill).reshape(*x.shape[:2], n, block)


def _per_query_head(array, num_heads):
  """Plan arrays [B, Hp, ...] -> [B, H, ...]: query head h reads plan head h // (H // Hp)."""
  plan_heads = array.shape[1]
  return jnp.repeat(array, num_heads // plan_heads, axis=1)


def _gather_blocks(x, index):
  """x [B, H, n, ...], index [B, H, m] -> [B, H, m, ...]."""
  index = index.astype(jnp.int32).reshape(index.shape + (1,) * (x.ndim - 3))
  return jnp.take_along_axis(x, index, axis=2)


def _segments(plan, num_heads):
  """Segment ids as [B, H, nQ, bq] and [B, H, nK, bk] (or None)."""
  if plan.q_segment_ids is None:
    return None, None
  expand = lambda ids: jnp.broadcast_to(ids[:, None, :], (ids.shape[0], num_heads, ids.shape[1]))
  return (_row_blocks(expand(plan.q_segment_ids), plan.block_q, -1),
          _row_blocks(expand(plan.kv_segment_ids), plan.block_kv, -2))


def _ranks(plan, num_heads):
  """The rank rule's thresholds as [B, H, nQ, bq] and key ranks as [B, H, nK, bk] (or None)."""
  if not plan.has_rank_rule:
    return None, None
  return (_row_blocks(_per_query_head(plan.q_threshold, num_heads), plan.block_q, 0),
          _row_blocks(_per_query_head(plan.key_rank, num_heads), plan.block_kv, -1))


def _row_side(plan, num_heads):
  """Per-query side data of the element mask, (segments, thresholds) blocked, or Nones."""
  return _segments(plan, num_heads)[0], _ranks(plan, num_heads)[0]


def _column_side(plan, num_heads):
  """Per-key side data of the element mask, (segments, ranks) blocked, or Nones."""
  return _segments(plan, num_heads)[1], _ranks(plan, num_heads)[1]


def _gather_side(side, index):
  return tuple(None if x is None else _gather_blocks(x, index) for x in side)


def _tile_mask(plan, q_index, k_index, q_side, k_side, active, full):
  """[..., bq, bk] visited-and-allowed mask of a tile; q_side/k_side are the blocked
  (segments, thresholds) and (segments, ranks) of its queries and keys."""
  rows = [None if x is None else x[..., :, None] for x in q_side]
  columns = [None if x is None else x[..., None, :] for x in k_side]
  allowed = plan.element_mask(q_index[..., :, None], k_index[..., None, :], rows[0], columns[0], rows[1], columns[1])
  return active[..., None, None] & ((full[..., None, None] == 1) | allowed)


def _inputs(q, k, v, key_bias, plan):
  num_heads, group = q.shape[2], q.shape[2] // k.shape[2]
  f32 = lambda x: x.astype(jnp.float32)
  qb = _blocks(f32(q), 1, plan.block_q)  # [B, H, nQ, bq, D]
  kb = jnp.repeat(_blocks(f32(k), 1, plan.block_kv), group, axis=1)  # [B, H, nK, bk, D]
  vb = jnp.repeat(_blocks(f32(v), 1, plan.block_kv), group, axis=1)
  bias = None
  if key_bias is not None:
    bias = jnp.repeat(_row_blocks(f32(key_bias), plan.block_kv, 0.0), group, axis=1)  # [B, H, nK, bk]
  return qb, kb, vb, bias, num_heads, group


def forward(q, k, v, key_bias, plan, scale):
  """(out [B, Tq, H, D] in q.dtype, lse [B, H, Tq] float32, natural log)."""
  qb, kb, vb, bias, num_heads, _ = _inputs(q, k, v, key_bias, plan)
  kv_count = _per_query_head(plan.kv_count, num_heads)
  kv_index = _per_query_head(plan.kv_index, num_heads)
  kv_full = _per_query_head(plan.kv_full, num_heads)
  q_side, k_side = _row_side(plan, num_heads), _column_side(plan, num_heads)
  nq, bq, bk = qb.shape[2], plan.block_q, plan.block_kv
  q_index = jnp.arange(nq)[:, None] * bq + jnp.arange(bq)  # [nQ, bq]

  def step(carry, slot):
    m, l, acc = carry
    index = kv_index[..., slot]  # [B, H, nQ]
    k_tile, v_tile = _gather_blocks(kb, index), _gather_blocks(vb, index)  # [B, H, nQ, bk, D]
    s = jnp.einsum('bhnqd,bhnkd->bhnqk', qb, k_tile) * scale
    if bias is not None:
      s = s + _gather_blocks(bias, index)[..., None, :]
    k_index = index.astype(jnp.int32)[..., None] * bk + jnp.arange(bk)
    visible = _tile_mask(plan, q_index, k_index, q_side, _gather_side(k_side, index), slot < kv_count,
                         kv_full[..., slot])
    s = jnp.where(visible, s, -jnp.inf)
    m_new = jnp.maximum(m, s.max(-1))
    m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
    p = jnp.exp(s - m_safe[..., None])
    rescale = jnp.exp(m - m_safe)
    return (m_new, l * rescale + p.sum(-1), acc * rescale[..., None] + jnp.einsum('bhnqk,bhnkd->bhnqd', p, v_tile)), None

  shape = qb.shape[:-1]
  init = (jnp.full(shape, -jnp.inf), jnp.zeros(shape), jnp.zeros(qb.shape))
  (m, l, acc), _ = jax.lax.scan(step, init, jnp.arange(plan.num_kv_blocks))
  nonempty = l > 0
  out = jnp.where(nonempty[..., None], acc / jnp.where(nonempty, l, 1.0)[..., None], 0.0)
  lse = jnp.where(nonempty, m + jnp.log(jnp.where(nonempty, l, 1.0)), EMPTY_ROW_LSE)
  b, h = out.shape[:2]
  out = out.reshape(b, h, -1, out.shape[-1])[:, :, :plan.q_len].transpose(0, 2, 1, 3)
  return out.astype(q.dtype), lse.reshape(b, h, -1)[:, :, :plan.q_len]


def backward(q, k, v, key_bias, plan, scale, out, lse, d_out, d_lse):
  """(dq, dk, dv, d_key_bias) for cotangents of the output and of the LSE."""
  qb, kb, vb, bias, num_heads, group = _inputs(q, k, v, key_bias, plan)
  dob = _blocks(d_out.astype(jnp.float32), 1, plan.block_q)
  # delta = rowsum(dO * O), minus dLSE: d(lse)/d(s) = p joins the softmax gradient.
  delta = jnp.einsum('bthd,bthd->bht', d_out.astype(jnp.float32), out.astype(jnp.float32))
  if d_lse is not None:
    delta = delta - d_lse.astype(jnp.float32)
  delta_b = _row_blocks(delta, plan.block_q, 0.0)
  lse_b = _row_blocks(lse, plan.block_q, 0.0)
  q_side, k_side = _row_side(plan, num_heads), _column_side(plan, num_heads)
  bq, bk = plan.block_q, plan.block_kv

  def probabilities(q_tile, k_tile, bias_tile, lse_tile, visible):
    s = jnp.einsum('...qd,...kd->...qk', q_tile, k_tile) * scale
    if bias_tile is not None:
      s = s + bias_tile[..., None, :]
    return jnp.where(visible, jnp.exp(s - lse_tile[..., None]), 0.0)

  # dQ: q-major, like the forward.
  kv_count = _per_query_head(plan.kv_count, num_heads)
  kv_index = _per_query_head(plan.kv_index, num_heads)
  kv_full = _per_query_head(plan.kv_full, num_heads)
  q_index = jnp.arange(qb.shape[2])[:, None] * bq + jnp.arange(bq)

  def dq_step(dq, slot):
    index = kv_index[..., slot]
    k_tile, v_tile = _gather_blocks(kb, index), _gather_blocks(vb, index)
    k_index = index.astype(jnp.int32)[..., None] * bk + jnp.arange(bk)
    visible = _tile_mask(plan, q_index, k_index, q_side, _gather_side(k_side, index), slot < kv_count,
                         kv_full[..., slot])
    p = probabilities(qb, k_tile, None if bias is None else _gather_blocks(bias, index), lse_b, visible)
    ds = p * (jnp.einsum('bhnqd,bhnkd->bhnqk', dob, v_tile) - delta_b[..., None])
    return dq + jnp.einsum('bhnqk,bhnkd->bhnqd', ds, k_tile) * scale, None

  dq, _ = jax.lax.scan(dq_step, jnp.zeros(qb.shape), jnp.arange(plan.num_kv_blocks))

  # dK, dV, d(bias): kv-major over the transposed lists, per query head, then summed per group.
  q_count = _per_query_head(plan.q_count, num_heads)
  q_index_list = _per_query_head(plan.q_index, num_heads)
  q_full = _per_query_head(plan.q_full, num_heads)
  k_index = jnp.arange(kb.shape[2])[:, None] * bk + jnp.arange(bk)  # [nK, bk]

  def dkv_step(carry, slot):
    dk, dv, dbias = carry
    index = q_index_list[..., slot]  # [B, H, nK]: a q block for each kv block
    q_tile, do_tile = _gather_blocks(qb, index), _gather_blocks(dob, index)
    lse_tile, delta_tile = _gather_blocks(lse_b, index), _gather_blocks(delta_b, index)
    tile_q_index = index.astype(jnp.int32)[..., None] * bq + jnp.arange(bq)
    visible = _tile_mask(plan, tile_q_index, k_index, _gather_side(q_side, index), k_side, slot < q_count,
                         q_full[..., slot])
    p = probabilities(q_tile, kb, bias, lse_tile, visible)  # [B, H, nK, bq, bk]
    ds = p * (jnp.einsum('bhnqd,bhnkd->bhnqk', do_tile, vb) - delta_tile[..., None])
    dv = dv + jnp.einsum('bhnqk,bhnqd->bhnkd', p, do_tile)
    dk = dk + jnp.einsum('bhnqk,bhnqd->bhnkd', ds, q_tile) * scale
    return (dk, dv, dbias + ds.sum(-2)), None

  init = (jnp.zeros(kb.shape), jnp.zeros(vb.shape), jnp.zeros(kb.shape[:-1]))
  (dk, dv, dbias), _ = jax.lax.scan(dkv_step, init, jnp.arange(plan.num_q_blocks))

  def unblock(x, length, heads_out):
    b, h, n, blk = x.shape[:4]
    x = x.reshape(b, heads_out, h // heads_out, n * blk, *x.shape[4:]).sum(2)
    return x[:, :, :length]

  dq = unblock(dq, plan.q_len, num_heads).transpose(0, 2, 1, 3).astype(q.dtype)
  dk = unblock(dk, plan.kv_len, num_heads // group).transpose(0, 2, 1, 3).astype(k.dtype)
  dv = unblock(dv, plan.kv_len, num_heads // group).transpose(0, 2, 1, 3).astype(v.dtype)
  d_bias = None if key_bias is None else unblock(dbias, plan.kv_len, num_heads // group).astype(key_bias.dtype)
  return dq, dk, dv, d_bias


IMPLEMENTATIONS = (Implementation('reference', forward, backward),)
