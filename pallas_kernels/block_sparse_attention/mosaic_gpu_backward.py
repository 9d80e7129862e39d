"""Block-sparse flash attention backward on Hopper (Pallas Mosaic GPU, sm90).

Two deterministic kernels, both warp-specialised pipelines (one TMA warpgroup feeding one
or two compute warpgroups of 64 rows each) whose grid is the traced number of blocks to
visit and whose BlockSpec index maps read the block index from the plan in GMEM:

  dQ    q-major: per (batch, head, q block) walk the plan's kv list; P is recomputed from
        the saved LSE, dS = P (dO V^T - delta), dQ += dS K.
  dK/dV kv-major: per (batch, kv head, kv block) walk one merged list holding, for every
        query head of the GQA group, that head's transposed plan list, so dK, dV (and the
        key-bias gradient, the column sums of dS) accumulate over the group in registers.

Logits work in base 2: s2 = (q.k) scale log2(e) + bias log2(e), P = exp2(s2 - lse log2(e)).
Rows with no visible key carry LSE = +1e30 here, so their P underflows to 0 everywhere.
Partial blocks build the element mask from iotas with `plan.element_mask` (with the plan's
rank rule: thresholds of the queries against ranks of the keys, loaded like segment ids).
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse_attention import mosaic_gpu_common as common
from pallas_kernels.block_sparse_attention.dkv_lists import (LONG_LIST_ENTRIES, LONG_LIST_PARTS, MIN_PART_STEPS,  # noqa: F401
                                                             PROGRAMS_WANTED, dkv_splits, group_lists, pad_steps)
from pallas_kernels.block_sparse_attention.reference import EMPTY_ROW_LSE

LOG2E = math.log2(math.e)
ROWS = 64  # rows of a tile per compute warpgroup (one wgmma M)
EMPTY_ROW_LSE2 = 1e30  # base-2 LSE given to rows with no visible key: exp2(s - 1e30) = 0
SUPPORTED_DTYPES = (jnp.bfloat16, jnp.float16)


def unavailable(q, k, v, key_bias, plan):
  """None when these kernels can run on the inputs, else why not."""
  if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
    return f'needs bfloat16 or float16 q, k, v of one dtype, got {q.dtype}, {k.dtype}, {v.dtype}'
  if q.shape[-1] not in (64, 128) or k.shape[-1] != q.shape[-1] or v.shape[-1] != q.shape[-1]:
    return f'needs head_dim 64 or 128 for q, k and v, got {q.shape[-1]}, {k.shape[-1]}, {v.shape[-1]}'
  if plan.block_q not in (64, 128) or plan.block_kv not in (64, 128):
    return f'needs block_q and block_kv in (64, 128), got {plan.block_q}, {plan.block_kv}'
  if q.shape[2] % k.shape[2] or q.shape[2] % plan.plan_heads:
    return 'query heads must be a multiple of the kv heads and of the plan heads'
  if plan.plan_heads not in (1, k.shape[2], q.shape[2]):
    return f'plan heads must be 1, Hkv or H, got {plan.plan_heads}'
  return common.rank_rule_unavailable(q, k, plan)


def _row_vector(ref):
  return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(1))


def _col_vector(ref):
  return plgpu.load(ref, layout=plgpu.Layout.WGMMA.reduce(0))


def _tile_iota(shape, dimension):
  return plgpu.broadcasted_iota(jnp.int32, shape, dimension, layout=plgpu.Layout.WGMMA)


def _masked_probabilities(plan, s2, lse2, full, active, q_index, k_index, side, lse_axis):
  """P = exp2(s2 - lse2) on visible elements, 0 elsewhere. `lse_axis` is the tile axis of
  the queries (1 for the transposed dK/dV tile); q_index/k_index are lazily built tiles,
  side() the tiles (q segment, k segment, q threshold, k rank), None where absent."""
  shape = s2.shape
  lse_tile = lax.broadcast_in_dim(lse2, shape, [lse_axis])
  p = jnp.exp2(s2 - lse_tile)

  def masked(p):
    visible = plan.element_mask(q_index(), k_index(), *side())
    return jnp.where(visible & active, p, 0.0)

  return lax.cond(full & active, lambda p: p, masked, p)


def _broadcast(vector, shape, axis):
  return None if vector is None else lax.broadcast_in_dim(vector, shape, [axis])


def _dq_kernel(plan, scale, dtype, head_dim, group, plan_group, stages, has_bias, has_segments, interpret):
  """The dQ kernel body for plgpu.kernel; grid (q blocks, heads, batch)."""
  bq, bk = plan.block_q, plan.block_kv
  wgs = bq // ROWS
  has_ranks = plan.has_rank_rule
  waits = 6  # barriers per warpgroup: q, dO, lse, delta, q segments, q thresholds

  def kernel(*refs):
    (kv_count_ref, kv_index_ref, kv_full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref) = refs[:9]
    rest = list(refs[9:])
    bias_ref = rest.pop(0) if has_bias else None
    q_seg_ref, k_seg_ref = (rest.pop(0), rest.pop(0)) if has_segments else (None, None)
    q_thr_ref, k_rank_ref = (rest.pop(0), rest.pop(0)) if has_ranks else (None, None)
    dq_ref, q_smem2, do_smem2, rows_smem2, seg_smem2, thr_smem2, barriers = rest
    # Last q blocks first: under causal-like plans they have the longest lists, so the
    # short ones fill the tail of the schedule.
    q_block = plan.num_q_blocks - 1 - lax.axis_index('q_block')
    head, batch = lax.axis_index('heads'), lax.axis_index('batch')
    wg = lax.axis_index('wg')
    plan_head, kv_head = head // plan_group, head // group
    count = kv_count_ref[batch, plan_head, q_block]
    row0 = q_block * bq + wg * ROWS
    q_smem, do_smem, rows_smem, seg_smem = q_smem2.at[wg], do_smem2.at[wg], rows_smem2.at[wg], seg_smem2.at[wg]
    thr_smem = thr_smem2.at[wg]
    head_cols = pl.ds(head * head_dim, head_dim)
    num_q_rows = q_ref.shape[1]

    def compute_context(pipeline):
      rows = pl.ds(row0, ROWS)
      plgpu.copy_gmem_to_smem(q_ref.at[batch, rows, head_cols], q_smem, barriers.at[wg * waits])
      plgpu.copy_gmem_to_smem(do_ref.at[batch, rows, head_cols], do_smem, barriers.at[wg * waits + 1])
      plgpu.copy_gmem_to_smem(lse_ref.at[batch, pl.ds(head * num_q_rows + row0, ROWS)], rows_smem.at[0],
                              barriers.at[wg * waits + 2])
      plgpu.copy_gmem_to_smem(delta_ref.at[batch, pl.ds(head * num_q_rows + row0, ROWS)], rows_smem.at[1],
                              barriers.at[wg * waits + 3])
      used = [0, 1, 2, 3]
      if has_segments:
        plgpu.copy_gmem_to_smem(q_seg_ref.at[batch, rows], seg_smem, barriers.at[wg * waits + 4])
        used.append(4)
      if has_ranks:
        plgpu.copy_gmem_to_smem(q_thr_ref.at[batch, pl.ds(plan_head * num_q_rows + row0, ROWS)], thr_smem,
                                barriers.at[wg * waits + 5])
        used.append(5)
      for i in used:
        plgpu.barrier_wait(barriers.at[wg * waits + i])
      lse2, delta = _row_vector(rows_smem.at[0]), _row_vector(rows_smem.at[1])
      q_seg = _row_vector(seg_smem) if has_segments else None
      q_thr = _row_vector(thr_smem) if has_ranks else None
      dq = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
      dq = pipeline((dq, lse2, delta, q_seg, q_thr))[0]
      q_smem[...] = (dq * scale).astype(dtype)
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(q_smem, dq_ref.at[batch, rows, head_cols])
      plgpu.wait_smem_to_gmem(0)

    def step(indices, k_smem, v_smem, *rest):
      rest = list(rest)
      bias_smem = rest.pop(0) if has_bias else None
      k_seg_smem = rest.pop(0) if has_segments else None
      k_rank_smem = rest.pop(0) if has_ranks else None
      (dq, lse2, delta, q_seg, q_thr) = rest.pop()
      consumed = rest
      (i,) = indices
      kv_block = kv_index_ref[batch, plan_head, q_block, i]
      full = kv_full_ref[batch, plan_head, q_block, i] == 1

      s2 = _matmul(q_smem, k_smem.transpose((1, 0)), (ROWS, bk)) * (scale * LOG2E)
      shape = s2.shape

      def probabilities():
        logits = s2 + lax.broadcast_in_dim(_col_vector(bias_smem), shape, [1]) if has_bias else s2
        def side():
          k_seg = None if k_seg_smem is None else _col_vector(k_seg_smem)
          k_rank = None if k_rank_smem is None else _col_vector(k_rank_smem)
          return (_broadcast(q_seg, shape, 0), _broadcast(k_seg, shape, 1), _broadcast(q_thr, shape, 0),
                  _broadcast(k_rank, shape, 1))

        return _masked_probabilities(
            plan, logits, lse2, full, i < count,
            lambda: _tile_iota(shape, 0) + row0,
            lambda: _tile_iota(shape, 1) + kv_block * bk,
            side, 0)

      dp, p = _matmul_overlapped(do_smem, v_smem.transpose((1, 0)), shape, probabilities)
      for barrier in consumed[1:]:  # all but K's
        plgpu.barrier_arrive(barrier)
      ds = p * (dp - lax.broadcast_in_dim(delta, shape, [0]))
      dq = _accumulate(dq, ds.astype(dtype), k_smem, interpret)
      plgpu.barrier_arrive(consumed[0])
      return (dq, lse2, delta, q_seg, q_thr)

    def kv_block_of(i):
      return kv_index_ref[batch, plan_head, q_block, i]

    tile_spec = functools.partial(plgpu.BlockSpec, block_shape=(bk, head_dim),
                                  index_map=lambda i: (kv_block_of(i), kv_head),
                                  transforms=_tile_transforms())
    num_kv_blocks = k_ref.shape[1] // bk
    in_specs = [tile_spec(), tile_spec()]
    inputs = [k_ref.at[batch], v_ref.at[batch]]
    if has_bias:
      in_specs.append(plgpu.BlockSpec((bk,), lambda i: (kv_head * num_kv_blocks + kv_block_of(i),)))
      inputs.append(bias_ref.at[batch])
    if has_segments:
      in_specs.append(plgpu.BlockSpec((bk,), lambda i: (kv_block_of(i),)))
      inputs.append(k_seg_ref.at[batch])
    if has_ranks:
      in_specs.append(plgpu.BlockSpec((bk,), lambda i: (plan_head * num_kv_blocks + kv_block_of(i),)))
      inputs.append(k_rank_ref.at[batch])
    pipeline = plgpu.emit_pipeline_warp_specialized(
        step, grid=(jnp.maximum(count, stages),), max_concurrent_steps=stages, num_compute_wgs=wgs,
        memory_registers=40, wg_axis='wg', manual_consumed_barriers=True, compute_context=compute_context,
        in_specs=in_specs)
    pipeline(*inputs)

  return kernel


def _matmul(a, b, shape):
  """a @ b into a fresh float32 accumulator."""
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _accumulate(acc, a, b, interpret):
  """acc + a @ b for `a` in registers, accumulated in place by the wgmma. The interpreter
  has neither run_state nor register operands of wgmma, so there it is a plain dot."""
  if interpret:
    return acc + jnp.dot(a, b[...], preferred_element_type=jnp.float32)

  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
  return pl.run_state(body)(plgpu.ACC.init(acc))


def _matmul_overlapped(a, b, shape, work):
  """(a @ b into a fresh float32 accumulator, work()), work computed while the wgmma runs."""
  def body(acc_ref):
    plgpu.wgmma(acc_ref, a, b)
    result = work()
    return acc_ref[...], result
  return pl.run_scoped(body, plgpu.ACC(shape, jnp.float32))


def _accumulate_pair(first, second, interpret):
  """(acc + a @ b) for two (acc, a, b) with `a` in registers, both wgmmas in flight at once."""
  if interpret:
    return tuple(_accumulate(acc, a, b, True) for acc, a, b in (first, second))

  def body(acc_refs):
    for acc_ref, (_, a, b) in zip(acc_refs, (first, second)):
      plgpu.wgmma(acc_ref, a, b)
  return pl.run_state(body)((plgpu.ACC.init(first[0]), plgpu.ACC.init(second[0])))


def _tile_transforms():
  """128-byte swizzled tiles: rows of 64 bf16/f16 elements, as wgmma reads them."""
  return (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))


def _dkv_kernel(plan, scale, dtype, head_dim, group, stages, has_bias, has_segments, interpret, fused=False,
                splits=1):
  """The dK/dV kernel body for plgpu.kernel; grid (kv blocks, kv heads, batch x splits).
  `fused`: also add each step's dQ share dS^T K to a float32 GMEM buffer
  (mosaic_gpu_fused_backward); q blocks then stream in 64-row steps, which keeps head_dim
  128 within SMEM. `splits` > 1: each (kv block, kv head, batch row) list is cut into that
  many consecutive parts, one program each, which write partial dK, dV (and d bias) to
  [splits, ...] outputs that the caller sums (dkv_splits)."""
  bq, bk = plan.block_q, plan.block_kv
  wgs = bk // ROWS
  step_rows = ROWS if fused else bq  # query rows per pipeline step
  steps_per_block = bq // step_rows
  has_ranks = plan.has_rank_rule
  waits = 5  # barriers per warpgroup: k, v, bias, k segments, k ranks

  def kernel(*refs):
    (count_ref, entry_ref, full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref) = refs[:9]
    rest = list(refs[9:])
    bias_ref = rest.pop(0) if has_bias else None
    q_seg_ref, k_seg_ref = (rest.pop(0), rest.pop(0)) if has_segments else (None, None)
    q_thr_ref, k_rank_ref = (rest.pop(0), rest.pop(0)) if has_ranks else (None, None)
    dq_acc_ref = rest.pop(0) if fused else None
    dk_ref, dv_ref = rest.pop(0), rest.pop(0)
    dbias_ref = rest.pop(0) if has_bias else None
    k_smem2, v_smem2, bias_smem2, seg_smem2, rank_smem2 = rest[:5]
    ds_smem2, dq_smem2 = rest[5:7] if fused else (None, None)
    barriers = rest[-1]
    kv_block, kv_head, batch = lax.axis_index('kv_block'), lax.axis_index('kv_heads'), lax.axis_index('batch')
    batch, part = (lax.div(batch, splits), lax.rem(batch, splits)) if splits > 1 else (batch, 0)
    plan_head = kv_head if plan.plan_heads > 1 else 0  # rank rules come with 1 or Hkv plan heads
    wg = lax.axis_index('wg')
    count = count_ref[batch, kv_head, kv_block]
    start = 0
    if splits > 1:  # this program's part of the list: entries start .. start + count - 1
      per_part = lax.div(count + splits - 1, splits)
      start = part * per_part
      count = jnp.clip(count - start, 0, per_part)
    out_at = (lambda ref: ref.at[part]) if splits > 1 else (lambda ref: ref)
    row0 = kv_block * bk + wg * ROWS
    k_smem, v_smem, bias_smem, seg_smem = k_smem2.at[wg], v_smem2.at[wg], bias_smem2.at[wg], seg_smem2.at[wg]
    rank_smem = rank_smem2.at[wg]
    head_cols = pl.ds(kv_head * head_dim, head_dim)
    num_kv_rows = k_ref.shape[1]
    num_q_blocks = q_ref.shape[1] // bq

    def compute_context(pipeline):
      rows = pl.ds(row0, ROWS)
      plgpu.copy_gmem_to_smem(k_ref.at[batch, rows, head_cols], k_smem, barriers.at[wg * waits])
      plgpu.copy_gmem_to_smem(v_ref.at[batch, rows, head_cols], v_smem, barriers.at[wg * waits + 1])
      used = [0, 1]
      if has_bias:
        plgpu.copy_gmem_to_smem(bias_ref.at[batch, pl.ds(kv_head * num_kv_rows + row0, ROWS)], bias_smem,
                                barriers.at[wg * waits + 2])
        used.append(2)
      if has_segments:
        plgpu.copy_gmem_to_smem(k_seg_ref.at[batch, rows], seg_smem, barriers.at[wg * waits + 3])
        used.append(3)
      if has_ranks:
        plgpu.copy_gmem_to_smem(k_rank_ref.at[batch, pl.ds(plan_head * num_kv_rows + row0, ROWS)], rank_smem,
                                barriers.at[wg * waits + 4])
        used.append(4)
      for i in used:
        plgpu.barrier_wait(barriers.at[wg * waits + i])
      zeros = plgpu.layout_cast(jnp.zeros((ROWS, head_dim), jnp.float32), plgpu.Layout.WGMMA)
      bias2 = _row_vector(bias_smem) if has_bias else None
      k_seg = _row_vector(seg_smem) if has_segments else None
      k_rank = _row_vector(rank_smem) if has_ranks else None
      dbias = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)) if has_bias else None
      dk, dv, dbias, _, _, _ = pipeline((zeros, zeros, dbias, bias2, k_seg, k_rank))
      if fused:
        plgpu.wait_smem_to_gmem(0)  # the last dQ stores have read their staging tile
      k_smem[...] = (dk * scale).astype(dtype)
      v_smem[...] = dv.astype(dtype)
      if has_bias:
        bias_smem[...] = dbias
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, out_at(dk_ref).at[batch, rows, head_cols], commit_group=False)
      plgpu.copy_smem_to_gmem(v_smem, out_at(dv_ref).at[batch, rows, head_cols], commit_group=False)
      if has_bias:
        plgpu.copy_smem_to_gmem(bias_smem, out_at(dbias_ref).at[batch, pl.ds(kv_head * num_kv_rows + row0, ROWS)],
                                commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0)

    def add_dq(ds, q_row0, head):
      """dQ[q rows, head] += dS^T K of this warpgroup's keys (float32, reduce-add in GMEM)."""
      ds_smem, dq_smem = ds_smem2.at[wg], dq_smem2.at[wg]
      ds_smem[...] = ds.astype(dtype)
      plgpu.commit_smem()
      dq = _matmul(ds_smem.transpose((1, 0)), k_smem, (ROWS, head_dim))
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous step's store has read dq_smem
      dq_smem[...] = dq
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dq_smem, dq_acc_ref.at[batch, pl.ds(q_row0, ROWS), pl.ds(head * head_dim, head_dim)],
                              reduction_op='add')

    def chunk(q_row0, head, full, active, q_c, do_c, lse_c, delta_c, q_seg_c, q_thr_c, carry):
      """One 64-query slice at q_row0: the transposed tile [64 keys, 64 queries]."""
      dk, dv, dbias, bias2, k_seg, k_rank = carry
      s2 = _matmul(k_smem, q_c.transpose((1, 0)), (ROWS, ROWS)) * (scale * LOG2E)
      shape = s2.shape

      def probabilities():
        logits = s2 + lax.broadcast_in_dim(bias2, shape, [0]) if has_bias else s2

        def side():
          q_seg = None if q_seg_c is None else _col_vector(q_seg_c)
          q_thr = None if q_thr_c is None else _col_vector(q_thr_c)
          return (_broadcast(q_seg, shape, 1), _broadcast(k_seg, shape, 0), _broadcast(q_thr, shape, 1),
                  _broadcast(k_rank, shape, 0))

        return _masked_probabilities(
            plan, logits, _col_vector(lse_c), full, active,
            lambda: _tile_iota(shape, 1) + q_row0,
            lambda: _tile_iota(shape, 0) + row0,
            side, 1)

      dp, p = _matmul_overlapped(v_smem, do_c.transpose((1, 0)), shape, probabilities)
      ds = p * (dp - lax.broadcast_in_dim(_col_vector(delta_c), shape, [1]))
      dv, dk = _accumulate_pair((dv, p.astype(dtype), do_c), (dk, ds.astype(dtype), q_c), interpret)
      if fused:
        pl.when(active)(lambda: add_dq(ds, q_row0, head))
      if has_bias:
        dbias = dbias + ds.sum(axis=1)
      return dk, dv, dbias, bias2, k_seg, k_rank

    def slot_of(i):
      return lax.div(i, steps_per_block) if steps_per_block > 1 else i

    def step_of(i):
      """(head, index of the step's rows in units of step_rows) of pipeline step i."""
      entry = entry_ref[batch, kv_head, kv_block, start + slot_of(i)]
      part = lax.rem(i, steps_per_block) if steps_per_block > 1 else 0
      return kv_head * group + entry // num_q_blocks, (entry % num_q_blocks) * steps_per_block + part

    def step(indices, q_smem, do_smem, lse_smem, delta_smem, *rest):
      rest = list(rest)
      q_seg_smem = rest.pop(0) if has_segments else None
      q_thr_smem = rest.pop(0) if has_ranks else None
      carry = rest.pop()
      (i,) = indices
      slot = slot_of(i)
      full = full_ref[batch, kv_head, kv_block, start + slot] == 1
      head, rows_index = step_of(i)
      for c in range(step_rows // ROWS):
        cols = pl.ds(c * ROWS, ROWS)
        carry = chunk(rows_index * step_rows + c * ROWS, head, full, slot < count, q_smem.at[cols], do_smem.at[cols],
                      lse_smem.at[cols], delta_smem.at[cols], None if q_seg_smem is None else q_seg_smem.at[cols],
                      None if q_thr_smem is None else q_thr_smem.at[cols], carry)
      for barrier in rest:
        plgpu.barrier_arrive(barrier)
      return carry

    def q_tile_index(i):
      head, rows_index = step_of(i)
      return (rows_index, head)

    def row_index(i):  # lse/delta are [H * Tq']: head h's rows start at step h * Tq' / step_rows
      head, rows_index = step_of(i)
      return (head * num_q_blocks * steps_per_block + rows_index,)

    tile_spec = functools.partial(plgpu.BlockSpec, block_shape=(step_rows, head_dim), index_map=q_tile_index,
                                  transforms=_tile_transforms())
    in_specs = [tile_spec(), tile_spec(), plgpu.BlockSpec((step_rows,), row_index),
                plgpu.BlockSpec((step_rows,), row_index)]
    inputs = [q_ref.at[batch], do_ref.at[batch], lse_ref.at[batch], delta_ref.at[batch]]
    if has_segments:
      in_specs.append(plgpu.BlockSpec((step_rows,), lambda i: (step_of(i)[1],)))
      inputs.append(q_seg_ref.at[batch])
    if has_ranks:
      in_specs.append(plgpu.BlockSpec((step_rows,),
                                      lambda i: (plan_head * num_q_blocks * steps_per_block + step_of(i)[1],)))
      inputs.append(q_thr_ref.at[batch])
    pipeline = plgpu.emit_pipeline_warp_specialized(
        step, grid=(jnp.maximum(count * steps_per_block, stages),), max_concurrent_steps=stages, num_compute_wgs=wgs,
        memory_registers=40, wg_axis='wg', manual_consumed_barriers=True, compute_context=compute_context,
        in_specs=in_specs)
    pipeline(*inputs)

  return kernel


def _prepare(q, k, v, key_bias, plan, out, lse, d_out, d_lse):
  """Padded, flattened kernel operands: q/dO [B, Tq', H*D], k/v [B, Tk', Hkv*D],
  base-2 lse and delta [B, H*Tq'], base-2 bias [B, Hkv*Tk'], padded segment ids."""
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  tq_pad, tk_pad = plan.num_q_blocks * plan.block_q, plan.num_kv_blocks * plan.block_kv
  delta = jnp.einsum('bthd,bthd->bht', d_out.astype(jnp.float32), out.astype(jnp.float32))
  if d_lse is not None:
    delta = delta - d_lse.astype(jnp.float32)
  lse2 = jnp.where(lse > EMPTY_ROW_LSE / 2, lse.astype(jnp.float32) * LOG2E, EMPTY_ROW_LSE2)
  rows = lambda x: common.pad_axis(x, 2, plan.block_q).reshape(b, h * tq_pad)
  queries = lambda x: common.pad_axis(x, 1, plan.block_q).reshape(b, tq_pad, -1)
  keys = lambda x: common.pad_axis(x, 1, plan.block_kv).reshape(b, tk_pad, -1)
  operands = dict(q=queries(q), k=keys(k), v=keys(v), d_out=queries(d_out.astype(q.dtype)), lse=rows(lse2),
                  delta=rows(delta))
  if key_bias is not None:
    operands['bias'] = common.pad_axis(key_bias.astype(jnp.float32) * LOG2E, 2, plan.block_kv).reshape(b, hkv * tk_pad)
  if plan.q_segment_ids is not None:
    operands['q_seg'] = common.pad_axis(plan.q_segment_ids, 1, plan.block_q, common.Q_SEGMENT_PAD)
    operands['k_seg'] = common.pad_axis(plan.kv_segment_ids, 1, plan.block_kv, common.KV_SEGMENT_PAD)
  if plan.has_rank_rule:
    ranks = common.padded_ranks(plan)
    operands['q_thr'] = ranks['q_threshold'].reshape(b, -1)  # [B, Hp * Tq']
    operands['k_rank'] = ranks['key_rank'].reshape(b, -1)  # [B, Hp * Tk']
  return operands


def _extras(operands):
  return [operands[name] for name in ('bias', 'q_seg', 'k_seg', 'q_thr', 'k_rank') if name in operands]


def _interpret_params(interpret):
  return plgpu.InterpretGPUParams() if interpret else None


def _dq(operands, plan, scale, shapes, stages, interpret):
  b, h, hkv, d, dtype = shapes
  wgs = plan.block_q // ROWS
  has_bias, has_segments = 'bias' in operands, 'q_seg' in operands
  kernel = _dq_kernel(plan, scale, dtype, d, h // hkv, h // plan.plan_heads, stages, has_bias, has_segments, interpret)
  rows_scratch = plgpu.SMEM((wgs, 2, ROWS), jnp.float32)
  tile_scratch = plgpu.SMEM((wgs, ROWS, d), dtype, transforms=_tile_transforms())
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct(operands['q'].shape, dtype),
      scratch_types=[tile_scratch, tile_scratch, rows_scratch, plgpu.SMEM((wgs, ROWS), jnp.int32),
                     plgpu.SMEM((wgs, ROWS), jnp.int32), plgpu.Barrier(num_barriers=6 * wgs)],
      compiler_params=plgpu.CompilerParams(approx_math=True),
      grid=(plan.num_q_blocks, h, b), grid_names=('q_block', 'heads', 'batch'), num_threads=wgs + 1,
      thread_name='wg', interpret=_interpret_params(interpret), kernel_name='block_sparse_dq',
  )(plan.kv_count, pad_steps(plan.kv_index.astype(jnp.int32), stages),
    pad_steps(plan.kv_full.astype(jnp.int32), stages), operands['q'], operands['k'], operands['v'],
    operands['d_out'], operands['lse'], operands['delta'], *_extras(operands))


def _dkv(operands, plan, scale, shapes, stages, interpret, dq_acc=None, splits=None):
  """dK, dV (and d bias) of the kv-major kernel; with a float32 dq_acc Ref (the padded q's
  shape), the fused kernel that also adds dQ / scale into it. `splits` (default
  dkv_splits): parts per list, whose partial sums (in the inputs' dtype) are added in
  float32 here, in a fixed order: deterministic."""
  b, h, hkv, d, dtype = shapes
  wgs = plan.block_kv // ROWS
  has_bias, has_segments = 'bias' in operands, 'q_seg' in operands
  fused = dq_acc is not None
  count, entries, full = group_lists(plan, h, hkv, stages)
  if splits is None:
    splits = dkv_splits(plan.num_kv_blocks * hkv * b, entries.shape[-1], fused, plan.max_row_blocks() is not None)
  if splits > 1:  # a part's pipeline may run `stages` steps past its list: pad so they read valid entries
    entries, full = (pad_steps(x, x.shape[-1] + stages) for x in (entries, full))
  kernel = _dkv_kernel(plan, scale, dtype, d, h // hkv, stages, has_bias, has_segments, interpret, fused, splits)
  parts = (splits,) if splits > 1 else ()
  tile = jax.ShapeDtypeStruct(parts + operands['k'].shape, dtype)
  out_type = [tile, tile] + ([jax.ShapeDtypeStruct(parts + operands['bias'].shape, jnp.float32)] if has_bias else [])
  tile_scratch = plgpu.SMEM((wgs, ROWS, d), dtype, transforms=_tile_transforms())
  scratch = [tile_scratch, tile_scratch, plgpu.SMEM((wgs, ROWS), jnp.float32), plgpu.SMEM((wgs, ROWS), jnp.int32),
             plgpu.SMEM((wgs, ROWS), jnp.int32)]
  if fused:  # dS tiles (a wgmma operand) and float32 dQ staging tiles
    scratch += [plgpu.SMEM((wgs, ROWS, ROWS), dtype, transforms=_tile_transforms()),
                plgpu.SMEM((wgs, ROWS, d), jnp.float32)]
  outputs = plgpu.kernel(
      kernel, out_type=out_type, scratch_types=scratch + [plgpu.Barrier(num_barriers=5 * wgs)],
      compiler_params=plgpu.CompilerParams(approx_math=True),
      grid=(plan.num_kv_blocks, hkv, b * splits), grid_names=('kv_block', 'kv_heads', 'batch'), num_threads=wgs + 1,
      thread_name='wg', interpret=_interpret_params(interpret), kernel_name='block_sparse_dqkv' if fused else
      'block_sparse_dkv',
  )(count, entries, full, operands['q'], operands['k'], operands['v'], operands['d_out'], operands['lse'],
    operands['delta'], *_extras(operands), *([dq_acc] if fused else []))
  if splits == 1:
    return outputs
  return [x.astype(jnp.float32).sum(0).astype(x.dtype) for x in outputs]


def backward(q, k, v, key_bias, plan, scale, out, lse, d_out, d_lse, *, interpret=False, stages=2):
  """(dq, dk, dv, d_key_bias or None), as reference.backward."""
  reason = unavailable(q, k, v, key_bias, plan)
  if reason:
    raise ValueError(reason)
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  operands = _prepare(q, k, v, key_bias, plan, out, lse, d_out, d_lse)
  shapes = (b, h, hkv, d, q.dtype)
  dq = _dq(operands, plan, scale, shapes, stages, interpret)
  dk, dv, *d_bias = _dkv(operands, plan, scale, shapes, stages, interpret)
  return unpad_gradients(q, k, v, key_bias, dq, dk, dv, d_bias)


def unpad_gradients(q, k, v, key_bias, dq, dk, dv, d_bias):
  """The kernels' padded, flattened gradients back in the inputs' shapes and dtypes."""
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  dq = dq.reshape(b, -1, h, d)[:, :tq]
  dk, dv = (x.reshape(b, -1, hkv, d)[:, :tk] for x in (dk, dv))
  bias_grad = None
  if key_bias is not None:
    bias_grad = d_bias[0].reshape(b, hkv, -1)[:, :, :tk].astype(key_bias.dtype)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), bias_grad
