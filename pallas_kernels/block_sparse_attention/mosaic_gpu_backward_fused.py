"""Block-sparse flash attention backward on Hopper as ONE kv-major kernel (Pallas Mosaic GPU).

The two-kernel backward (mosaic_gpu_backward.py) runs 7 tile matmuls per visited tile: 3 in
the q-major dQ kernel, 4 in the kv-major dK/dV kernel. Here the kv-major kernel also takes
each visited tile's dQ contribution, dQ_tile = dS^T K ([q rows, D], float32), so a tile
costs 5 matmuls (K Q^T, V dO^T, P^T dO, dS^T Q, and dS K), as in FA3 and cuDNN.

Per CTA (batch, kv head, kv block): the merged GQA list of mosaic_gpu_backward._dkv_kernel
(every query head of the group, every q block that visits this kv block), walked in
DESCENDING q block order. dK, dV and d key_bias accumulate in registers as there. For each
64-query chunk of a visited q block the warpgroups (one per 64 keys) write their dS rows
into one SMEM tile; the chunk's owner (warpgroup chunk % warpgroups) computes
dS^T K over all keys of the block and adds it into a float32 dQ accumulator in GMEM.

Deterministic order. The contributions to one (batch, query head, q block, chunk) are added
in ascending kv block order: contributor r (the r-th kv block in that q block's q-major
list, its "turn") waits on a GMEM semaphore until it reads >= r, adds, and signals +1.
Turn 0 stores instead of adding, so the accumulator needs no zeroing; q blocks nobody
visits are zeroed in XLA afterwards. The float32 adds to one element thus happen one at a
time in a fixed order: bitwise the same result on every run. The semaphores are Pallas
GMEM scratch (pl.get_global), zeroed by Pallas for every launch.

Why it cannot deadlock. Pallas maps the grid (kv block, kv head, batch) onto CUDA's with
batch as blockIdx.x and kv block as blockIdx.z, so a CTA's linear block id grows with its
kv block, and a CTA only ever waits on CTAs of the same (batch, kv head) with a smaller kv
block: smaller ids. The GPU dispatches CTAs in increasing id order (CUDA does not promise
it; NVIDIA GPUs do it in practice, and FA3's deterministic backward relies on it too), so
when a CTA is resident every smaller id is resident or finished. Take the smallest
unfinished id: every CTA it can wait on is finished, its other waits are on its own
warpgroups (mbarriers), so it finishes; by induction all do. Waiting never spins on a
later-launched CTA, whatever the number of resident CTAs.

Why descending q blocks. Turns go by ascending kv block. Were a CTA to visit its q blocks
in ascending order too, under a sliding window CTA j's first visit would wait for CTA j-1's
second, and so on: a chain of whole steps across all kv blocks. Descending, CTA j's s-th
visit is the q block where its turn is s, and the s earlier turns are CTAs j-1 .. j-s at
their visits s-1 .. 0: no chain. Under causal every CTA starts on the last q block; only the
adds queue there, one after another, while the tile math runs in parallel.

Interpret mode (CPU tests) has neither GMEM semaphores nor atomics, but it runs CTAs one
after another in grid order (row-major, kv block slowest), which is exactly the order the
turns enforce. There the turn wait and signal are left out and the add is a read-add-write;
everything else (the lists, turns, dS exchange, owner matmul, store-then-add) is the
hardware code. Not covered on CPU: the semaphore wait/signal, memory ordering, atomics.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse_attention import mosaic_gpu_backward as unfused
from pallas_kernels.block_sparse_attention.masks import EMPTY
from pallas_kernels.block_sparse_attention.mosaic_gpu_backward import (
    LOG2E, ROWS, _query_side_specs, _accumulate_pair, _broadcast, _col_vector, _masked_probabilities, _matmul, _matmul_overlapped,
    _row_vector, _tile_iota, _tile_transforms)

SMEM_LIMIT_BYTES = 227 * 1024  # H100's dynamic shared memory per CTA


def smem_bytes(block_q, block_kv, head_dim, itemsize, stages):
  """Shared memory of the fused kernel: K, V and key rows, the pipelined Q, dO and query
  rows, and the dS tile."""
  key_tiles = 2 * block_kv * head_dim * itemsize + 3 * block_kv * 4
  query_stages = stages * (2 * block_q * head_dim * itemsize + 4 * block_q * 4)
  return key_tiles + query_stages + block_kv * ROWS * itemsize


def unavailable(q, k, v, key_bias, plan, stages=2):
  """None when the fused kernel can run on the inputs, else why not."""
  reason = unfused.unavailable(q, k, v, key_bias, plan)
  if reason:
    return reason
  need = smem_bytes(plan.block_q, plan.block_kv, q.shape[-1], q.dtype.itemsize, stages)
  if need > SMEM_LIMIT_BYTES:
    return (f'block_q {plan.block_q}, block_kv {plan.block_kv}, head_dim {q.shape[-1]} need {need} bytes of '
            f'shared memory, more than {SMEM_LIMIT_BYTES}')
  return None


def _descending(count, entries, full):
  """The merged lists with their active prefix reversed (last q block first). Padding
  slots repeat the new last active entry (the old first), so prefetching them moves no
  new data."""
  slots = jnp.arange(entries.shape[-1])
  active = slots < count[..., None]
  order = jnp.where(active, count[..., None] - 1 - slots, 0)
  entries = jnp.take_along_axis(entries, order, -1)
  full = jnp.where(active, jnp.take_along_axis(full, order, -1), 0)
  return entries, full


def _visit_turns(plan, num_heads, num_kv_heads, entries):
  """[B, Hkv, nK, slots]: for each merged-list entry g * nQ + i of kv block j, the number of
  kv blocks before j in q block i's list for query head (kv head, g): its turn to add."""
  visited = (plan.block_kinds() != EMPTY).astype(jnp.int32)  # [B, Hp, nQ, nK]
  turns = jnp.cumsum(visited, axis=-1) - visited
  turns = jnp.repeat(turns, num_heads // plan.plan_heads, axis=1)  # [B, H, nQ, nK]
  b, _, nq, nk = turns.shape
  turns = turns.reshape(b, num_kv_heads, -1, nk).transpose(0, 1, 3, 2)  # [B, Hkv, nK, G * nQ]
  return jnp.take_along_axis(turns, entries, axis=-1)


def _add_in_turn(contribution, target, turn, semaphore, interpret):
  """target (GMEM, float32) = contribution at turn 0, else += contribution, after every
  earlier turn has added (the semaphore counts the turns done; None in interpret mode,
  where CTAs run in turn order)."""
  if semaphore is not None:
    plgpu.semaphore_wait(semaphore, turn, decrement=False, memory_scope='gpu')

  @pl.when(turn == 0)
  def _():
    target[...] = contribution

  @pl.when(turn != 0)
  def _():
    if interpret:
      target[...] = plgpu.load(target, (), layout=plgpu.Layout.WGMMA) + contribution
    else:
      plgpu.atomic_add(target, contribution)  # alone on these elements: the semaphore is ours

  if semaphore is not None:
    plgpu.semaphore_signal(semaphore, 1, memory_scope='gpu')


def _chunk_dq(ds_smem, k_smem2, head_dim, wgs):
  """dS^T K for one 64-query chunk over all keys of the block: [64 queries, D] float32."""
  def body(acc_ref):
    for w in range(wgs):
      plgpu.wgmma(acc_ref, ds_smem.at[pl.ds(w * ROWS, ROWS)].transpose((1, 0)), k_smem2.at[w])
    return acc_ref[...]
  return pl.run_scoped(body, plgpu.ACC((ROWS, head_dim), jnp.float32))


def _share_ds(ds, ds_smem, ds_barriers, wg, wgs, first):
  """Writes this warpgroup's dS rows [64 keys, 64 queries] into the CTA's dS tile and
  returns once every warpgroup's rows are there. Unless `first`, waits first for the owner
  of the previous chunk to be done reading the tile."""
  if wgs > 1:
    if first is False:
      plgpu.barrier_wait(ds_barriers.at[1])
    elif first is not True:
      pl.when(jnp.logical_not(first))(lambda: plgpu.barrier_wait(ds_barriers.at[1]))
  ds_smem.at[pl.ds(wg * ROWS, ROWS)][...] = ds
  plgpu.commit_smem()  # the generic-proxy writes, before the wgmma reads them
  if wgs > 1:
    plgpu.barrier_arrive(ds_barriers.at[0])
    plgpu.barrier_wait(ds_barriers.at[0])


def _fused_kernel(plan, scale, dtype, head_dim, num_heads, group, stages, has_bias, has_segments, interpret):
  """The fused kernel body for plgpu.kernel; grid (kv blocks, kv heads, batch)."""
  bq, bk = plan.block_q, plan.block_kv
  wgs, chunks = bk // ROWS, bq // ROWS
  has_ranks = plan.has_rank_rule
  waits = 5  # barriers per warpgroup: k, v, bias, k segments, k ranks

  def kernel(*refs):
    (count_ref, entry_ref, full_ref, turn_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref) = refs[:10]
    rest = list(refs[10:])
    bias_ref = rest.pop(0) if has_bias else None
    q_seg_ref, k_seg_ref = (rest.pop(0), rest.pop(0)) if has_segments else (None, None)
    q_thr_ref, k_rank_ref = (rest.pop(0), rest.pop(0)) if has_ranks else (None, None)
    dk_ref, dv_ref = rest.pop(0), rest.pop(0)
    dbias_ref = rest.pop(0) if has_bias else None
    dq_ref = rest.pop(0)
    k_smem2, v_smem2, bias_smem2, seg_smem2, rank_smem2, ds_smem, barriers, ds_barriers = rest
    kv_block, kv_head, batch = lax.axis_index('kv_block'), lax.axis_index('kv_heads'), lax.axis_index('batch')
    plan_head = kv_head if plan.plan_heads > 1 else 0  # rank rules come with 1 or Hkv plan heads
    wg = lax.axis_index('wg')
    count = count_ref[batch, kv_head, kv_block]
    row0 = kv_block * bk + wg * ROWS
    k_smem, v_smem, bias_smem, seg_smem = k_smem2.at[wg], v_smem2.at[wg], bias_smem2.at[wg], seg_smem2.at[wg]
    rank_smem = rank_smem2.at[wg]
    head_cols = pl.ds(kv_head * head_dim, head_dim)
    num_kv_rows = k_ref.shape[1]
    num_q_blocks = q_ref.shape[1] // bq
    turns = None
    if not interpret:
      turns = pl.get_global(plgpu.SemaphoreType.REGULAR((q_ref.shape[0] * num_heads * num_q_blocks * chunks,)))

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
      if wgs > 1:  # the owner of the last chunk may still read this warpgroup's K
        pl.when(count > 0)(lambda: plgpu.barrier_wait(ds_barriers.at[1]))
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

    def add_dq(ds, c, step, entry):
      """This chunk's dS joins the CTA's dS tile; its owner adds dS^T K into dQ in turn."""
      _share_ds(ds, ds_smem, ds_barriers, wg, wgs, (step == 0) if c == 0 else False)
      q_block, head = entry % num_q_blocks, kv_head * group + entry // num_q_blocks

      @pl.when(wg == c % wgs)
      def _():
        contribution = _chunk_dq(ds_smem, k_smem2, head_dim, wgs)
        target = dq_ref.at[batch, pl.ds(q_block * bq + c * ROWS, ROWS), pl.ds(head * head_dim, head_dim)]
        semaphore = None
        if turns is not None:
          semaphore = turns.at[((batch * num_heads + head) * num_q_blocks + q_block) * chunks + c]
        _add_in_turn(contribution, target, turn_ref[batch, kv_head, kv_block, step], semaphore, interpret)

      if wgs > 1:
        plgpu.barrier_arrive(ds_barriers.at[1])

    def chunk(c, step, entry, full, active, q_smem, do_smem, lse_smem, delta_smem, q_seg_smem, q_thr_smem, carry):
      """One 64-query slice of the q block: the transposed tile [64 keys, 64 queries]."""
      dk, dv, dbias, bias2, k_seg, k_rank = carry
      q_block = entry % num_q_blocks
      cols = pl.ds(c * ROWS, ROWS)
      q_c, do_c = q_smem.at[cols], do_smem.at[cols]

      s2 = _matmul(k_smem, q_c.transpose((1, 0)), (ROWS, ROWS)) * (scale * LOG2E)
      shape = s2.shape

      def probabilities():
        logits = s2 + lax.broadcast_in_dim(bias2, shape, [0]) if has_bias else s2
        def side():
          q_seg = None if q_seg_smem is None else _col_vector(q_seg_smem.at[cols])
          q_thr = None if q_thr_smem is None else _col_vector(q_thr_smem.at[cols])
          return (_broadcast(q_seg, shape, 1), _broadcast(k_seg, shape, 0), _broadcast(q_thr, shape, 1),
                  _broadcast(k_rank, shape, 0))

        return _masked_probabilities(
            plan, logits, _col_vector(lse_smem.at[cols]), full, active,
            lambda: _tile_iota(shape, 1) + (q_block * bq + c * ROWS),
            lambda: _tile_iota(shape, 0) + row0,
            side, 1)

      dp, p = _matmul_overlapped(v_smem, do_c.transpose((1, 0)), shape, probabilities)
      ds = p * (dp - lax.broadcast_in_dim(_col_vector(delta_smem.at[cols]), shape, [1]))
      dv, dk = _accumulate_pair((dv, p.astype(dtype), do_c), (dk, ds.astype(dtype), q_c), interpret)
      if has_bias:
        dbias = dbias + ds.sum(axis=1)
      pl.when(active)(lambda: add_dq(ds.astype(dtype), c, step, entry))
      return dk, dv, dbias, bias2, k_seg, k_rank

    def step(indices, q_smem, do_smem, lse_smem, delta_smem, *rest):
      rest = list(rest)
      q_seg_smem = rest.pop(0) if has_segments else None
      q_thr_smem = rest.pop(0) if has_ranks else None
      carry = rest.pop()
      (i,) = indices
      entry = entry_ref[batch, kv_head, kv_block, i]
      full = full_ref[batch, kv_head, kv_block, i] == 1
      for c in range(chunks):
        carry = chunk(c, i, entry, full, i < count, q_smem, do_smem, lse_smem, delta_smem, q_seg_smem, q_thr_smem,
                      carry)
      for barrier in rest:
        plgpu.barrier_arrive(barrier)
      return carry

    entry_of = lambda i: entry_ref[batch, kv_head, kv_block, i]  # noqa: E731
    in_specs, inputs = _query_side_specs(entry_of, batch, kv_head, plan_head, group, num_q_blocks, bq, head_dim,
                                         (q_ref, do_ref, lse_ref, delta_ref, q_seg_ref, q_thr_ref))
    pipeline = plgpu.emit_pipeline_warp_specialized(
        step, grid=(jnp.maximum(count, stages),), max_concurrent_steps=stages, num_compute_wgs=wgs,
        memory_registers=40, wg_axis='wg', manual_consumed_barriers=True, compute_context=compute_context,
        in_specs=in_specs)
    pipeline(*inputs)

  return kernel


def _fused(operands, plan, scale, shapes, stages, interpret):
  b, h, hkv, d, dtype = shapes
  wgs = plan.block_kv // ROWS
  has_bias, has_segments = 'bias' in operands, 'q_seg' in operands
  count, entries, full = unfused._group_lists(plan, h, hkv, stages)
  entries, full = _descending(count, entries, full)
  turns = _visit_turns(plan, h, hkv, entries)
  kernel = _fused_kernel(plan, scale, dtype, d, h, h // hkv, stages, has_bias, has_segments, interpret)
  tile = jax.ShapeDtypeStruct(operands['k'].shape, dtype)
  out_type = [tile, tile] + ([jax.ShapeDtypeStruct(operands['bias'].shape, jnp.float32)] if has_bias else [])
  out_type.append(jax.ShapeDtypeStruct(operands['q'].shape, jnp.float32))
  tile_scratch = plgpu.SMEM((wgs, ROWS, d), dtype, transforms=_tile_transforms())
  return plgpu.kernel(
      kernel, out_type=out_type,
      scratch_types=[tile_scratch, tile_scratch, plgpu.SMEM((wgs, ROWS), jnp.float32),
                     plgpu.SMEM((wgs, ROWS), jnp.int32), plgpu.SMEM((wgs, ROWS), jnp.int32),
                     plgpu.SMEM((plan.block_kv, ROWS), dtype, transforms=_tile_transforms()),
                     plgpu.Barrier(num_barriers=5 * wgs), plgpu.Barrier(num_arrivals=wgs, num_barriers=2)],
      compiler_params=plgpu.CompilerParams(approx_math=True),
      grid=(plan.num_kv_blocks, hkv, b), grid_names=('kv_block', 'kv_heads', 'batch'), num_threads=wgs + 1,
      thread_name='wg', interpret=unfused._interpret_params(interpret), kernel_name='block_sparse_fused_bwd',
  )(count, entries, full, turns, operands['q'], operands['k'], operands['v'], operands['d_out'], operands['lse'],
    operands['delta'], *unfused._extras(operands))


def _finish_dq(dq_acc, plan, scale, shapes):
  """The float32 accumulator [B, Tq', H*D] as q.dtype [B, Tq', H, D] times scale, zero in q
  blocks no kv block visits (turn 0 never wrote them)."""
  b, h, _, d, dtype = shapes
  visited = jnp.repeat(plan.kv_count, h // plan.plan_heads, axis=1) > 0  # [B, H, nQ]
  acc = dq_acc.reshape(b, plan.num_q_blocks, plan.block_q, h, d)
  acc = jnp.where(visited.transpose(0, 2, 1)[:, :, None, :, None], acc, 0.0)
  return (acc * scale).astype(dtype).reshape(b, -1, h, d)


def backward(q, k, v, key_bias, plan, scale, out, lse, d_out, d_lse, *, interpret=False, stages=2):
  """(dq, dk, dv, d_key_bias or None), as reference.backward."""
  reason = unavailable(q, k, v, key_bias, plan, stages)
  if reason:
    raise ValueError(reason)
  b, tq, h, d = q.shape
  tk, hkv = k.shape[1], k.shape[2]
  operands = unfused._prepare(q, k, v, key_bias, plan, out, lse, d_out, d_lse)
  shapes = (b, h, hkv, d, q.dtype)
  results = _fused(operands, plan, scale, shapes, stages, interpret)
  dq = _finish_dq(results[-1], plan, scale, shapes)[:, :tq]
  dk, dv = (x.reshape(b, -1, hkv, d)[:, :tk] for x in results[:2])
  d_bias = None
  if key_bias is not None:
    d_bias = results[2].reshape(b, hkv, -1)[:, :, :tk].astype(key_bias.dtype)
  return dq, dk.astype(k.dtype), dv.astype(v.dtype), d_bias
