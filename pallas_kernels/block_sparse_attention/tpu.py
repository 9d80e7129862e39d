"""Block-sparse flash attention as Pallas Mosaic TPU kernels, in the manner of splash attention.

Three pallas_calls walk the plan's compacted lists, scalar-prefetched into SMEM:
  forward  grid (batch, heads, q blocks, kv slots): online softmax, writes out and LSE;
  dQ       the same grid, accumulates dQ for one q block over its kv slots;
  dK/dV    grid (batch, kv heads, kv blocks, q heads of the group, q slots) over the
           transposed lists: dK, dV and d(key_bias) of a kv block stay resident while every
           query head of its GQA group adds to them, so the group sum happens in the kernel.
The K/V index maps read the slot's block from the lists; inactive slots repeat the last
active block, so the pipeline issues no new DMA for them, and the body is skipped. Full
blocks skip the element mask; partial ones compute it from iotas with plan.element_mask
(with the plan's rank rule: per-plan-head threshold and rank rows, moved like segment ids).

Layouts: q/k/v/dO are moved heads-major [B, heads, T, D] and padded to whole blocks;
per-row vectors (LSE, delta, key bias, segment ids) travel as [.., 1, T] rows and are
turned into columns in the kernel where the tile orientation needs it. Per-row statistics
(m, l, d(key_bias)) accumulate lane-replicated [n, 128] in VMEM and leave as rows through a
tile transpose. The dK/dV kernel works on transposed tiles [kv, q] (as splash does) so every
matmul is NN or NT. A real TPU needs block_q and block_kv multiples of 128 (`unavailable`
says so); interpret mode takes any block size.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.block_sparse_attention.implementation import Implementation, always_available
from pallas_kernels.block_sparse_attention.reference import EMPTY_ROW_LSE

LANES = 128  # a real TPU needs blocks whose lane dimension is a multiple of this
# One pass's lists (count, index, full) live in SMEM: 1 MiB per core from v4 on; half is left
# for Mosaic's padding of multi-dimensional SMEM arrays and its own scalars.
SMEM_BUDGET_BYTES = 512 * 1024
NT = (((1,), (1,)), ((), ()))  # a @ b.T
NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class _Shape:
  batch: int
  heads: int
  kv_heads: int
  plan_heads: int
  head_dim: int
  block_q: int
  block_kv: int
  num_q_blocks: int
  num_kv_blocks: int

  @property
  def group(self):
    return self.heads // self.kv_heads

  @property
  def heads_per_plan_head(self):
    return self.heads // self.plan_heads

  @property
  def padded_q_len(self):
    return self.num_q_blocks * self.block_q

  @property
  def padded_kv_len(self):
    return self.num_kv_blocks * self.block_kv


def _shape_of(q, k, plan):
  b, _, h, d = q.shape
  return _Shape(b, h, k.shape[2], plan.plan_heads, d, plan.block_q, plan.block_kv, plan.num_q_blocks,
                plan.num_kv_blocks)


def _heads_major(x, length):
  """[B, T, heads, D] -> [B, heads, length, D], zero-padded."""
  x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
  return x.transpose(0, 2, 1, 3)


def _from_heads_major(x, length):
  return x[:, :, :length].transpose(0, 2, 1, 3)


def _rows(x, length, fill=0.0):
  """[B, heads, T] -> [B, heads, 1, length]."""
  x = jnp.pad(x, ((0, 0), (0, 0), (0, length - x.shape[-1])), constant_values=fill)
  return x[:, :, None, :]


def _segment_rows(ids, length, fill):
  """[B, T] -> [B, 1, length] (or None)."""
  if ids is None:
    return None
  return jnp.pad(ids, ((0, 0), (0, length - ids.shape[-1])), constant_values=fill)[:, None, :]


def _column(row_ref):
  """A [1, n] row block as an [n, 1] column."""
  return row_ref[0][:, None]


def _lanes(column):
  """[n, 1] -> [n, LANES]: per-row scalars kept lane-replicated in VMEM scratch, as Mosaic prefers."""
  return jnp.broadcast_to(column, (column.shape[0], LANES))


def _as_row(lane_replicated):
  """[n, LANES] (equal lanes) -> [1, n], through a tile transpose rather than a reshape."""
  return lane_replicated.T[:1, :]


def _tile_visible(plan, q_start, k_start, shape, q_axis, side):
  """Bool [shape] element mask of a partial tile; q_axis says which axis holds queries;
  side = (q segment, k segment, q threshold, k rank), each None or broadcastable to the tile."""
  q_index = q_start + lax.broadcasted_iota(jnp.int32, shape, q_axis)
  k_index = k_start + lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
  side = [None if x is None else jnp.broadcast_to(x, shape) for x in side]
  return plan.element_mask(q_index, k_index, *side)


def _side_tiles(refs, q_axis):
  """(q segment, k segment, q threshold, k rank) of a tile from their row refs: rows of the
  tile axis 0 become columns. refs in that order, None where absent."""
  q_seg_ref, kv_seg_ref, q_thr_ref, k_rank_ref = refs
  query = lambda ref: None if ref is None else (_column(ref) if q_axis == 0 else ref[...])
  key = lambda ref: None if ref is None else (ref[...] if q_axis == 0 else _column(ref))
  return query(q_seg_ref), key(kv_seg_ref), query(q_thr_ref), key(k_rank_ref)


def _run_active(active, full, body):
  """body(masked) on an active slot: without the element mask on full blocks."""
  pl.when(active & full)(lambda: body(False))
  pl.when(active & jnp.logical_not(full))(lambda: body(True))


def _compiler_params(num_parallel, num_arbitrary):
  return pltpu.CompilerParams(dimension_semantics=('parallel',) * num_parallel + ('arbitrary',) * num_arbitrary)


def _interpret_mode(interpret):
  return pltpu.InterpretParams() if interpret else False


# ----------------------------------------------------------------------------------------
# Forward


def _forward_kernel(kv_count_ref, kv_index_ref, kv_full_ref, q_ref, k_ref, v_ref, bias_ref, q_seg_ref, kv_seg_ref,
                    q_thr_ref, k_rank_ref, out_ref, lse_ref, m_ref, l_ref, acc_ref, *, plan, shape, scale):
  b, h, i, slot = (pl.program_id(axis) for axis in range(4))
  plan_head = h // shape.heads_per_plan_head

  @pl.when(slot == 0)
  def init():
    m_ref[...] = jnp.full(m_ref.shape, -jnp.inf, jnp.float32)
    l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  kv_block = kv_index_ref[b, plan_head, i, slot].astype(jnp.int32)

  def body(masked):
    s = lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=jnp.float32) * scale
    if bias_ref is not None:
      s = s + bias_ref[...]
    if masked:
      side = _side_tiles((q_seg_ref, kv_seg_ref, q_thr_ref, k_rank_ref), 0)
      visible = _tile_visible(plan, i * shape.block_q, kv_block * shape.block_kv, s.shape, 0, side)
      s = jnp.where(visible, s, -jnp.inf)
    m_prev = m_ref[...]
    m_next = jnp.maximum(m_prev, s.max(axis=1, keepdims=True))
    m_safe = jnp.where(m_next == -jnp.inf, 0.0, m_next)  # a row that has seen no key yet
    p = jnp.exp(s - m_safe[:, :1])
    rescale = jnp.exp(m_prev - m_safe)
    m_ref[...] = m_next
    l_ref[...] = l_ref[...] * rescale + p.sum(axis=1, keepdims=True)
    pv = lax.dot_general(p.astype(v_ref.dtype), v_ref[...], NN, preferred_element_type=jnp.float32)
    acc_ref[...] = acc_ref[...] * rescale[:, :1] + pv

  count = kv_count_ref[b, plan_head, i]
  _run_active(slot < count, kv_full_ref[b, plan_head, i, slot] == 1, body)

  @pl.when(slot == shape.num_kv_blocks - 1)
  def finish():
    l = l_ref[...]
    nonempty = l > 0
    safe_l = jnp.where(nonempty, l, 1.0)
    out_ref[...] = jnp.where(nonempty[:, :1], acc_ref[...] / safe_l[:, :1], 0.0).astype(out_ref.dtype)
    lse_ref[...] = _as_row(jnp.where(nonempty, m_ref[...] + jnp.log(safe_l), EMPTY_ROW_LSE))


def _q_major_maps(shape):
  """Index maps of the forward and dQ grid (b, h, i, slot, *prefetched lists)."""
  plan_head = lambda h: h // shape.heads_per_plan_head

  def kv_block(b, h, i, slot, kv_index_ref):
    return kv_index_ref[b, plan_head(h), i, slot].astype(jnp.int32)

  return dict(
      q=lambda b, h, i, slot, count, index, full: (b, h, i, 0),
      kv=lambda b, h, i, slot, count, index, full: (b, h // shape.group, kv_block(b, h, i, slot, index), 0),
      q_row=lambda b, h, i, slot, count, index, full: (b, h, 0, i),
      bias=lambda b, h, i, slot, count, index, full: (b, h // shape.group, 0, kv_block(b, h, i, slot, index)),
      q_seg=lambda b, h, i, slot, count, index, full: (b, 0, i),
      kv_seg=lambda b, h, i, slot, count, index, full: (b, 0, kv_block(b, h, i, slot, index)),
      q_thr=lambda b, h, i, slot, count, index, full: (b, plan_head(h), 0, i),
      k_rank=lambda b, h, i, slot, count, index, full: (b, plan_head(h), 0, kv_block(b, h, i, slot, index)),
  )


def _optional_spec(array, spec):
  return None if array is None else spec


def _qkv_specs(shape, maps):
  bq, bk, d = shape.block_q, shape.block_kv, shape.head_dim
  return [pl.BlockSpec((None, None, bq, d), maps['q']), pl.BlockSpec((None, None, bk, d), maps['kv']),
          pl.BlockSpec((None, None, bk, d), maps['kv'])]


def _gradient_specs(shape, maps):
  """dO, LSE and delta."""
  bq, d = shape.block_q, shape.head_dim
  return [pl.BlockSpec((None, None, bq, d), maps['q']), pl.BlockSpec((None, None, 1, bq), maps['q_row']),
          pl.BlockSpec((None, None, 1, bq), maps['q_row'])]


def _side_specs(shape, maps, bias, q_seg, kv_seg, q_thr, k_rank):
  """Key bias, segment ids, thresholds and ranks, None where absent."""
  return [
      _optional_spec(bias, pl.BlockSpec((None, None, 1, shape.block_kv), maps['bias'])),
      _optional_spec(q_seg, pl.BlockSpec((None, 1, shape.block_q), maps['q_seg'])),
      _optional_spec(kv_seg, pl.BlockSpec((None, 1, shape.block_kv), maps['kv_seg'])),
      _optional_spec(q_thr, pl.BlockSpec((None, None, 1, shape.block_q), maps['q_thr'])),
      _optional_spec(k_rank, pl.BlockSpec((None, None, 1, shape.block_kv), maps['k_rank'])),
  ]


def _padded_side_inputs(key_bias, plan, shape):
  """(bias, q segments, kv segments, q thresholds [B, Hp, 1, Tq'], key ranks), None where absent."""
  bias = None if key_bias is None else _rows(key_bias.astype(jnp.float32), shape.padded_kv_len)
  q_seg = _segment_rows(plan.q_segment_ids, shape.padded_q_len, -1)
  kv_seg = _segment_rows(plan.kv_segment_ids, shape.padded_kv_len, -2)
  q_thr = k_rank = None
  if plan.has_rank_rule:
    q_thr = _rows(plan.q_threshold.astype(jnp.int32), shape.padded_q_len, 0)
    k_rank = _rows(plan.key_rank.astype(jnp.int32), shape.padded_kv_len, -1)
  return bias, q_seg, kv_seg, q_thr, k_rank


@functools.partial(jax.jit, static_argnames=('scale', 'interpret'))
def forward(q, k, v, key_bias, plan, scale, *, interpret=False):
  """(out [B, Tq, H, D] in q.dtype, lse [B, H, Tq] float32, natural log)."""
  shape = _shape_of(q, k, plan)
  bq, d = shape.block_q, shape.head_dim
  qh = _heads_major(q, shape.padded_q_len)
  kh, vh = _heads_major(k, shape.padded_kv_len), _heads_major(v, shape.padded_kv_len)
  side = _padded_side_inputs(key_bias, plan, shape)
  maps = _q_major_maps(shape)
  in_specs = _qkv_specs(shape, maps) + _side_specs(shape, maps, *side)
  out_specs = [pl.BlockSpec((None, None, bq, d), maps['q']), pl.BlockSpec((None, None, 1, bq), maps['q_row'])]
  out_shape = [jax.ShapeDtypeStruct(qh.shape, q.dtype),
               jax.ShapeDtypeStruct((shape.batch, shape.heads, 1, shape.padded_q_len), jnp.float32)]
  scratch = [pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
             pltpu.VMEM((bq, d), jnp.float32)]
  grid = (shape.batch, shape.heads, shape.num_q_blocks, shape.num_kv_blocks)
  out, lse = pl.pallas_call(
      functools.partial(_forward_kernel, plan=_static_plan(plan), shape=shape, scale=scale),
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=3, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=_compiler_params(3, 1),
      interpret=_interpret_mode(interpret),
      name='block_sparse_attention_forward',
  )(plan.kv_count, plan.kv_index, plan.kv_full, qh, kh, vh, *side)
  return _from_heads_major(out, plan.q_len), lse[:, :, 0, :plan.q_len]


def _static_plan(plan):
  """The plan with its arrays dropped: kernels only call element_mask, which reads static
  fields and whether the plan has a rank rule (a placeholder stands for the ranks)."""
  rank_marker = np.zeros((), np.int32) if plan.has_rank_rule else None
  return dataclasses.replace(plan, kv_count=None, kv_index=None, kv_full=None, q_count=None, q_index=None,
                             q_full=None, q_segment_ids=None, kv_segment_ids=None, q_threshold=None,
                             key_rank=rank_marker)


# ----------------------------------------------------------------------------------------
# Backward: dQ (q-major)


def _dq_kernel(kv_count_ref, kv_index_ref, kv_full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bias_ref,
               q_seg_ref, kv_seg_ref, q_thr_ref, k_rank_ref, dq_ref, acc_ref, *, plan, shape, scale):
  b, h, i, slot = (pl.program_id(axis) for axis in range(4))
  plan_head = h // shape.heads_per_plan_head

  @pl.when(slot == 0)
  def init():
    acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

  kv_block = kv_index_ref[b, plan_head, i, slot].astype(jnp.int32)

  def body(masked):
    k = k_ref[...]
    s = lax.dot_general(q_ref[...], k, NT, preferred_element_type=jnp.float32) * scale
    if bias_ref is not None:
      s = s + bias_ref[...]
    p = jnp.exp(s - _column(lse_ref))
    if masked:
      side = _side_tiles((q_seg_ref, kv_seg_ref, q_thr_ref, k_rank_ref), 0)
      visible = _tile_visible(plan, i * shape.block_q, kv_block * shape.block_kv, s.shape, 0, side)
      p = jnp.where(visible, p, 0.0)
    dp = lax.dot_general(do_ref[...], v_ref[...], NT, preferred_element_type=jnp.float32)
    ds = p * (dp - _column(delta_ref))
    acc_ref[...] += lax.dot_general(ds.astype(k.dtype), k, NN, preferred_element_type=jnp.float32)

  count = kv_count_ref[b, plan_head, i]
  _run_active(slot < count, kv_full_ref[b, plan_head, i, slot] == 1, body)

  @pl.when(slot == shape.num_kv_blocks - 1)
  def finish():
    dq_ref[...] = (acc_ref[...] * scale).astype(dq_ref.dtype)


def _backward_dq(plan, shape, scale, interpret, qh, kh, vh, doh, lse, delta, *side):
  bq, d = shape.block_q, shape.head_dim
  maps = _q_major_maps(shape)
  in_specs = _qkv_specs(shape, maps) + _gradient_specs(shape, maps) + _side_specs(shape, maps, *side)
  grid = (shape.batch, shape.heads, shape.num_q_blocks, shape.num_kv_blocks)
  return pl.pallas_call(
      functools.partial(_dq_kernel, plan=_static_plan(plan), shape=shape, scale=scale),
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=3, grid=grid, in_specs=in_specs,
                                             out_specs=pl.BlockSpec((None, None, bq, d), maps['q']),
                                             scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)]),
      out_shape=jax.ShapeDtypeStruct(qh.shape, qh.dtype),
      compiler_params=_compiler_params(3, 1),
      interpret=_interpret_mode(interpret),
      name='block_sparse_attention_dq',
  )(plan.kv_count, plan.kv_index, plan.kv_full, qh, kh, vh, doh, lse, delta, *side)


# ----------------------------------------------------------------------------------------
# Backward: dK, dV, d(key_bias) (kv-major, GQA group reduced in the resident output block)


def _dkv_kernel(q_count_ref, q_index_ref, q_full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, bias_ref,
                q_seg_ref, kv_seg_ref, q_thr_ref, k_rank_ref, dk_ref, dv_ref, dbias_ref, dk_acc, dv_acc, dbias_acc, *,
                plan, shape, scale):
  b, kv_head, j, member, slot = (pl.program_id(axis) for axis in range(5))
  plan_head = (kv_head * shape.group + member) // shape.heads_per_plan_head

  @pl.when((member == 0) & (slot == 0))
  def init():
    dk_acc[...] = jnp.zeros(dk_acc.shape, jnp.float32)
    dv_acc[...] = jnp.zeros(dv_acc.shape, jnp.float32)
    if dbias_acc is not None:
      dbias_acc[...] = jnp.zeros(dbias_acc.shape, jnp.float32)

  q_block = q_index_ref[b, plan_head, j, slot].astype(jnp.int32)

  def body(masked):
    q, do = q_ref[...], do_ref[...]
    s = lax.dot_general(k_ref[...], q, NT, preferred_element_type=jnp.float32) * scale  # [bk, bq]
    if bias_ref is not None:
      s = s + _column(bias_ref)
    p = jnp.exp(s - lse_ref[...])
    if masked:
      side = _side_tiles((q_seg_ref, kv_seg_ref, q_thr_ref, k_rank_ref), 1)
      visible = _tile_visible(plan, q_block * shape.block_q, j * shape.block_kv, s.shape, 1, side)
      p = jnp.where(visible, p, 0.0)
    dv_acc[...] += lax.dot_general(p.astype(do.dtype), do, NN, preferred_element_type=jnp.float32)
    dp = lax.dot_general(v_ref[...], do, NT, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_ref[...])
    dk_acc[...] += lax.dot_general(ds.astype(q.dtype), q, NN, preferred_element_type=jnp.float32)
    if dbias_acc is not None:
      dbias_acc[...] += _lanes(ds.sum(axis=1, keepdims=True))

  count = q_count_ref[b, plan_head, j]
  _run_active(slot < count, q_full_ref[b, plan_head, j, slot] == 1, body)

  @pl.when((member == shape.group - 1) & (slot == shape.num_q_blocks - 1))
  def finish():
    dk_ref[...] = (dk_acc[...] * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)
    if dbias_ref is not None:
      dbias_ref[...] = _as_row(dbias_acc[...])


def _kv_major_maps(shape):
  """Index maps of the dK/dV grid (b, kv head, j, member of the group, slot, *prefetched lists)."""
  head = lambda kv_head, member: kv_head * shape.group + member
  plan_head = lambda kv_head, member: head(kv_head, member) // shape.heads_per_plan_head

  def q_block(b, kv_head, j, member, slot, q_index_ref):
    return q_index_ref[b, plan_head(kv_head, member), j, slot].astype(jnp.int32)

  return dict(
      q=lambda b, g, j, m, slot, count, index, full: (b, head(g, m), q_block(b, g, j, m, slot, index), 0),
      kv=lambda b, g, j, m, slot, count, index, full: (b, g, j, 0),
      q_row=lambda b, g, j, m, slot, count, index, full: (b, head(g, m), 0, q_block(b, g, j, m, slot, index)),
      bias=lambda b, g, j, m, slot, count, index, full: (b, g, 0, j),
      q_seg=lambda b, g, j, m, slot, count, index, full: (b, 0, q_block(b, g, j, m, slot, index)),
      kv_seg=lambda b, g, j, m, slot, count, index, full: (b, 0, j),
      q_thr=lambda b, g, j, m, slot, count, index, full: (b, plan_head(g, m), 0, q_block(b, g, j, m, slot, index)),
      k_rank=lambda b, g, j, m, slot, count, index, full: (b, plan_head(g, m), 0, j),
  )


def _backward_dkv(plan, shape, scale, interpret, qh, kh, vh, doh, lse, delta, *side):
  bias = side[0]
  bk, d = shape.block_kv, shape.head_dim
  maps = _kv_major_maps(shape)
  in_specs = _qkv_specs(shape, maps) + _gradient_specs(shape, maps) + _side_specs(shape, maps, *side)
  out_specs = [pl.BlockSpec((None, None, bk, d), maps['kv']), pl.BlockSpec((None, None, bk, d), maps['kv']),
               _optional_spec(bias, pl.BlockSpec((None, None, 1, bk), maps['bias']))]
  out_shape = [jax.ShapeDtypeStruct(kh.shape, kh.dtype), jax.ShapeDtypeStruct(vh.shape, vh.dtype),
               None if bias is None else jax.ShapeDtypeStruct(bias.shape, jnp.float32)]
  scratch = [pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32),
             None if bias is None else pltpu.VMEM((bk, LANES), jnp.float32)]
  grid = (shape.batch, shape.kv_heads, shape.num_kv_blocks, shape.group, shape.num_q_blocks)
  return pl.pallas_call(
      functools.partial(_dkv_kernel, plan=_static_plan(plan), shape=shape, scale=scale),
      grid_spec=pltpu.PrefetchScalarGridSpec(num_scalar_prefetch=3, grid=grid, in_specs=in_specs,
                                             out_specs=out_specs, scratch_shapes=scratch),
      out_shape=out_shape,
      compiler_params=_compiler_params(3, 2),
      interpret=_interpret_mode(interpret),
      name='block_sparse_attention_dkv',
  )(plan.q_count, plan.q_index, plan.q_full, qh, kh, vh, doh, lse, delta, *side)


@functools.partial(jax.jit, static_argnames=('scale', 'interpret'))
def backward(q, k, v, key_bias, plan, scale, out, lse, d_out, d_lse, *, interpret=False):
  """(dq, dk, dv, d_key_bias or None) for cotangents of the output and of the LSE."""
  shape = _shape_of(q, k, plan)
  # delta = rowsum(dO * O) - dLSE: d(lse)/d(s) = p joins the softmax gradient.
  delta = jnp.einsum('bthd,bthd->bht', d_out.astype(jnp.float32), out.astype(jnp.float32))
  if d_lse is not None:
    delta = delta - d_lse.astype(jnp.float32)
  qh = _heads_major(q, shape.padded_q_len)
  kh, vh = _heads_major(k, shape.padded_kv_len), _heads_major(v, shape.padded_kv_len)
  doh = _heads_major(d_out.astype(q.dtype), shape.padded_q_len)
  lse_rows, delta_rows = _rows(lse, shape.padded_q_len), _rows(delta, shape.padded_q_len)
  operands = (qh, kh, vh, doh, lse_rows, delta_rows) + _padded_side_inputs(key_bias, plan, shape)
  dq = _backward_dq(plan, shape, scale, interpret, *operands)
  dk, dv, d_bias = _backward_dkv(plan, shape, scale, interpret, *operands)
  dq = _from_heads_major(dq, plan.q_len)
  dk, dv = _from_heads_major(dk, plan.kv_len), _from_heads_major(dv, plan.kv_len)
  if d_bias is not None:
    d_bias = d_bias[:, :, 0, :plan.kv_len].astype(key_bias.dtype)
  return dq, dk, dv, d_bias


def _unavailable_on_tpu(q, k, v, key_bias, plan):
  if plan.block_q % LANES or plan.block_kv % LANES:
    return f'Mosaic TPU needs block_q and block_kv multiples of {LANES}, got {plan.block_q} and {plan.block_kv}'
  list_bytes = sum(x.size * x.dtype.itemsize for x in (plan.kv_count, plan.kv_index, plan.kv_full))
  if list_bytes > SMEM_BUDGET_BYTES:
    return (f'the plan lists take {list_bytes} bytes of SMEM, over the {SMEM_BUDGET_BYTES} budget: '
            'use larger blocks or fewer plan heads')
  return None


IMPLEMENTATIONS = (
    Implementation('tpu', functools.partial(forward, interpret=False), functools.partial(backward, interpret=False),
                   platforms=('tpu',), unavailable=_unavailable_on_tpu),
    Implementation('tpu_interpret', functools.partial(forward, interpret=True),
                   functools.partial(backward, interpret=True), platforms=('cpu', 'gpu', 'tpu'),
                   unavailable=always_available),
)
