"""Block-sparse flash attention backward on Hopper in one kernel, with atomic dQ.

The kv-major walk of mosaic_gpu_backward's dK/dV kernel (per batch, kv head and kv block,
one merged list of the q blocks that every query head of the GQA group visits), which
also produces dQ: each step's dS, already in registers for dK, goes to SMEM, one more
wgmma gives that step's dQ contribution dS^T K, and a TMA store with reduce-add adds it
to a float32 dQ accumulator in GMEM. P and dS are computed once instead of twice (five
matmuls per tile instead of seven), at the price of a dQ whose float32 sums are added in
whatever order the blocks finish: not bitwise reproducible, as cuDNN's and
FlashAttention-3's backward. mosaic_gpu_backward.backward(deterministic=True) keeps the
two-kernel path.

Queries stream in 64-row chunks (one wgmma M) whatever the plan's block_q: a 128-row q
block is two pipeline steps. That keeps the SMEM of head_dim 128 within Hopper's 227 KiB:
two stages of q and dO chunks (64 KiB), K and V of the kv block (64 KiB), the dS tiles
(16 KiB) and the float32 dQ staging tiles (64 KiB).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse_attention import mosaic_gpu_backward as two_kernel
from pallas_kernels.mosaic_gpu_interpret import allow_tma_reduce_add

ROWS = two_kernel.ROWS
LOG2E = two_kernel.LOG2E


def _fused_kernel(plan, scale, dtype, head_dim, group, stages, has_bias, has_segments, interpret):
  """The kernel body for plgpu.kernel; grid (kv blocks, kv heads, batch)."""
  bq, bk = plan.block_q, plan.block_kv
  wgs, chunks = bk // ROWS, bq // ROWS
  has_ranks = plan.has_rank_rule
  waits = 5  # barriers per warpgroup: k, v, bias, k segments, k ranks

  def kernel(*refs):
    (count_ref, entry_ref, full_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref) = refs[:9]
    rest = list(refs[9:])
    bias_ref = rest.pop(0) if has_bias else None
    q_seg_ref, k_seg_ref = (rest.pop(0), rest.pop(0)) if has_segments else (None, None)
    q_thr_ref, k_rank_ref = (rest.pop(0), rest.pop(0)) if has_ranks else (None, None)
    dq_acc_ref, dk_ref, dv_ref = rest.pop(0), rest.pop(0), rest.pop(0)
    dbias_ref = rest.pop(0) if has_bias else None
    k_smem2, v_smem2, bias_smem2, seg_smem2, rank_smem2, ds_smem2, dq_smem2, barriers = rest
    kv_block, kv_head, batch = lax.axis_index('kv_block'), lax.axis_index('kv_heads'), lax.axis_index('batch')
    plan_head = kv_head if plan.plan_heads > 1 else 0  # rank rules come with 1 or Hkv plan heads
    wg = lax.axis_index('wg')
    count = count_ref[batch, kv_head, kv_block]
    row0 = kv_block * bk + wg * ROWS
    k_smem, v_smem, bias_smem, seg_smem = k_smem2.at[wg], v_smem2.at[wg], bias_smem2.at[wg], seg_smem2.at[wg]
    rank_smem, ds_smem, dq_smem = rank_smem2.at[wg], ds_smem2.at[wg], dq_smem2.at[wg]
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
      bias2 = two_kernel._row_vector(bias_smem) if has_bias else None
      k_seg = two_kernel._row_vector(seg_smem) if has_segments else None
      k_rank = two_kernel._row_vector(rank_smem) if has_ranks else None
      dbias = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), plgpu.Layout.WGMMA.reduce(1)) if has_bias else None
      dk, dv, dbias, _, _, _ = pipeline((zeros, zeros, dbias, bias2, k_seg, k_rank))
      plgpu.wait_smem_to_gmem(0)  # the last dQ stores have read the staging tile
      k_smem[...] = (dk * scale).astype(dtype)
      v_smem[...] = dv.astype(dtype)
      if has_bias:
        bias_smem[...] = dbias
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(k_smem, dk_ref.at[batch, rows, head_cols], commit_group=False)
      plgpu.copy_smem_to_gmem(v_smem, dv_ref.at[batch, rows, head_cols], commit_group=False)
      if has_bias:
        plgpu.copy_smem_to_gmem(bias_smem, dbias_ref.at[batch, pl.ds(kv_head * num_kv_rows + row0, ROWS)],
                                commit_group=False)
      plgpu.commit_smem_to_gmem_group()
      plgpu.wait_smem_to_gmem(0)

    def add_dq(ds, q_row0, head):
      """dQ[q rows, head] += dS^T K of this warpgroup's keys (float32, reduce-add in GMEM)."""
      ds_smem[...] = ds.astype(dtype)
      plgpu.commit_smem()
      dq = two_kernel._matmul(ds_smem.transpose((1, 0)), k_smem, (ROWS, head_dim))
      plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous step's store has read dq_smem
      dq_smem[...] = dq
      plgpu.commit_smem()
      plgpu.copy_smem_to_gmem(dq_smem, dq_acc_ref.at[batch, pl.ds(q_row0, ROWS), pl.ds(head * head_dim, head_dim)],
                              reduction_op='add')

    def chunk(q_row0, head, full, active, q_c, do_c, lse_smem, delta_smem, q_seg_smem, q_thr_smem, carry):
      """One 64-query chunk: the transposed tile [64 keys, 64 queries]."""
      dk, dv, dbias, bias2, k_seg, k_rank = carry
      s2 = two_kernel._matmul(k_smem, q_c.transpose((1, 0)), (ROWS, ROWS)) * (scale * LOG2E)
      shape = s2.shape

      def probabilities():
        logits = s2 + lax.broadcast_in_dim(bias2, shape, [0]) if has_bias else s2

        def side():
          q_seg = None if q_seg_smem is None else two_kernel._col_vector(q_seg_smem)
          q_thr = None if q_thr_smem is None else two_kernel._col_vector(q_thr_smem)
          return (two_kernel._broadcast(q_seg, shape, 1), two_kernel._broadcast(k_seg, shape, 0),
                  two_kernel._broadcast(q_thr, shape, 1), two_kernel._broadcast(k_rank, shape, 0))

        return two_kernel._masked_probabilities(
            plan, logits, two_kernel._col_vector(lse_smem), full, active,
            lambda: two_kernel._tile_iota(shape, 1) + q_row0,
            lambda: two_kernel._tile_iota(shape, 0) + row0,
            side, 1)

      dp, p = two_kernel._matmul_overlapped(v_smem, do_c.transpose((1, 0)), shape, probabilities)
      ds = p * (dp - lax.broadcast_in_dim(two_kernel._col_vector(delta_smem), shape, [1]))
      dv, dk = two_kernel._accumulate_pair((dv, p.astype(dtype), do_c), (dk, ds.astype(dtype), q_c), interpret)
      pl.when(active)(lambda: add_dq(ds, q_row0, head))
      if has_bias:
        dbias = dbias + ds.sum(axis=1)
      return dk, dv, dbias, bias2, k_seg, k_rank

    def slot_of(i):
      return lax.div(i, chunks) if chunks > 1 else i

    def entry_of(i):
      return entry_ref[batch, kv_head, kv_block, slot_of(i)]

    def chunk_of(i):
      """(q block, head, query chunk index over Tq' / 64) of pipeline step i."""
      entry = entry_of(i)
      q_block = entry % num_q_blocks
      half = lax.rem(i, chunks) if chunks > 1 else 0
      return q_block, kv_head * group + entry // num_q_blocks, q_block * chunks + half

    def step(indices, q_smem, do_smem, lse_smem, delta_smem, *rest):
      rest = list(rest)
      q_seg_smem = rest.pop(0) if has_segments else None
      q_thr_smem = rest.pop(0) if has_ranks else None
      carry = rest.pop()
      (i,) = indices
      slot = slot_of(i)
      full = full_ref[batch, kv_head, kv_block, slot] == 1
      _, head, q_chunk = chunk_of(i)
      carry = chunk(q_chunk * ROWS, head, full, slot < count, q_smem, do_smem, lse_smem, delta_smem, q_seg_smem,
                    q_thr_smem, carry)
      for barrier in rest:
        plgpu.barrier_arrive(barrier)
      return carry

    def q_tile_index(i):
      _, head, q_chunk = chunk_of(i)
      return (q_chunk, head)

    def row_index(i):  # lse/delta are [H * Tq']: 64-row chunk c of head h is chunk h * Tq' / 64 + c
      _, head, q_chunk = chunk_of(i)
      return (head * num_q_blocks * chunks + q_chunk,)

    tile_spec = functools.partial(plgpu.BlockSpec, block_shape=(ROWS, head_dim), index_map=q_tile_index,
                                  transforms=two_kernel._tile_transforms())
    in_specs = [tile_spec(), tile_spec(), plgpu.BlockSpec((ROWS,), row_index), plgpu.BlockSpec((ROWS,), row_index)]
    inputs = [q_ref.at[batch], do_ref.at[batch], lse_ref.at[batch], delta_ref.at[batch]]
    if has_segments:
      in_specs.append(plgpu.BlockSpec((ROWS,), lambda i: (chunk_of(i)[2],)))
      inputs.append(q_seg_ref.at[batch])
    if has_ranks:
      in_specs.append(plgpu.BlockSpec((ROWS,), lambda i: (plan_head * num_q_blocks * chunks + chunk_of(i)[2],)))
      inputs.append(q_thr_ref.at[batch])
    pipeline = plgpu.emit_pipeline_warp_specialized(
        step, grid=(jnp.maximum(count * chunks, stages),), max_concurrent_steps=stages, num_compute_wgs=wgs,
        memory_registers=40, wg_axis='wg', manual_consumed_barriers=True, compute_context=compute_context,
        in_specs=in_specs)
    pipeline(*inputs)

  return kernel


def fused_backward(operands, plan, scale, shapes, stages, interpret):
  """(dq, dk, dv, dbias or absent) of the padded operands of mosaic_gpu_backward._prepare."""
  b, h, hkv, d, dtype = shapes
  if interpret:
    allow_tma_reduce_add()
  wgs = plan.block_kv // ROWS
  has_bias, has_segments = 'bias' in operands, 'q_seg' in operands
  count, entries, full = two_kernel._group_lists(plan, h, hkv, stages)
  kernel = _fused_kernel(plan, scale, dtype, d, h // hkv, stages, has_bias, has_segments, interpret)
  tile = jax.ShapeDtypeStruct(operands['k'].shape, dtype)
  out_type = [tile, tile] + ([jax.ShapeDtypeStruct(operands['bias'].shape, jnp.float32)] if has_bias else [])
  tile_scratch = plgpu.SMEM((wgs, ROWS, d), dtype, transforms=two_kernel._tile_transforms())
  dq_acc = jax.new_ref(jnp.zeros(operands['q'].shape, jnp.float32))
  dkv = plgpu.kernel(
      kernel, out_type=out_type,
      scratch_types=[tile_scratch, tile_scratch, plgpu.SMEM((wgs, ROWS), jnp.float32),
                     plgpu.SMEM((wgs, ROWS), jnp.int32), plgpu.SMEM((wgs, ROWS), jnp.int32),
                     plgpu.SMEM((wgs, ROWS, ROWS), dtype, transforms=two_kernel._tile_transforms()),
                     plgpu.SMEM((wgs, ROWS, d), jnp.float32), plgpu.Barrier(num_barriers=5 * wgs)],
      compiler_params=plgpu.CompilerParams(approx_math=True),
      grid=(plan.num_kv_blocks, hkv, b), grid_names=('kv_block', 'kv_heads', 'batch'), num_threads=wgs + 1,
      thread_name='wg', interpret=two_kernel._interpret_params(interpret), kernel_name='block_sparse_dqkv',
  )(count, entries, full, operands['q'], operands['k'], operands['v'], operands['d_out'], operands['lse'],
    operands['delta'], *two_kernel._extras(operands), dq_acc)
  return ((dq_acc[...] * scale).astype(dtype), *dkv)


def backward(q, k, v, key_bias, plan, scale, out, lse, d_out, d_lse, *, interpret=False, stages=2):
  """(dq, dk, dv, d_key_bias or None), as reference.backward; dq's float32 sums are added
  atomically, in no fixed order."""
  reason = two_kernel.unavailable(q, k, v, key_bias, plan)
  if reason:
    raise ValueError(reason)
  b, _, h, d = q.shape
  operands = two_kernel._prepare(q, k, v, key_bias, plan, out, lse, d_out, d_lse)
  dq, dk, dv, *d_bias = fused_backward(operands, plan, scale, (b, h, k.shape[2], d, q.dtype), stages, interpret)
  return two_kernel.unpad_gradients(q, k, v, key_bias, dq, dk, dv, d_bias)
