"""Block-sparse flash attention forward for Hopper (sm90) in Pallas Mosaic GPU.

FA3 layout: a CTA works on (batch, head, q block) tiles with block_q // 64 compute
warpgroups of 64 q rows each, plus one TMA producer warpgroup. For each tile the
producer walks the plan's list, i in [0, kv_count), and TMA-loads kv block kv_index[i]
into a ring of K/V SMEM stages; the consumers run QK^T and PV on wgmma (P from
registers) with an online softmax in base 2. kv_full[i] picks the unmasked path or the
masked one, whose mask is plan.element_mask on iotas (positions, segment ids, kv_len,
and the plan's rank rule: thresholds of the rows against ranks of the keys).
Both compute warpgroups walk the same list, so the barrier protocol is the same for
every count, 0 included.

Schedules: 'grid' launches one CTA per tile (the hardware hands tiles to free SMs);
'persistent' launches one CTA per SM, each walking tiles in waves (longest q blocks
first, alternate waves reversed so the totals even out), with the ring running on
across tiles and the next tile's Q loaded while this tile's output is written.

    out, lse = forward(q, k, v, key_bias, plan, scale)   # reference.forward's contract
"""

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels.block_sparse_attention import mosaic_gpu_common as common
from pallas_kernels.block_sparse_attention.reference import EMPTY_ROW_LSE

LOG2E = math.log2(math.e)
LN2 = math.log(2.0)
M_INIT = -1e30  # finite running max (base 2): fully masked steps give p = exp2(-inf) = 0, never NaN
MAX_STAGES = 4
ROWS = common.WARPGROUP_ROWS
WGMMA = plgpu.Layout.WGMMA
WGMMA_ROW = plgpu.Layout.WGMMA.reduce(1)
WGMMA_COL = plgpu.Layout.WGMMA.reduce(0)
INTERPRET_CTAS = 3  # persistent schedule in interpret mode: few CTAs, several tiles each
SHORT_ROW_BLOCKS = 16  # lists bounded by this (windows, chunks) run the persistent schedule


def num_stages(block_q, block_kv, head_dim, itemsize, persistent=False):
  """K/V ring depth that fits the SMEM budget (at most MAX_STAGES), or 0 if 2 do not fit.
  The persistent schedule keeps a separate output tile (the grid one reuses Q's)."""
  fixed = (2 if persistent else 1) * block_q * head_dim * itemsize + block_q * 4
  per_stage = 2 * block_kv * head_dim * itemsize
  if fixed + 2 * per_stage > common.SMEM_BUDGET_BYTES:
    return 0
  return min(MAX_STAGES, (common.SMEM_BUDGET_BYTES - fixed) // per_stage)


def unavailable(q, k, v, key_bias, plan, *, interpret=False):
  reason = common.common_unavailable(q, k, v, key_bias, plan, interpret)
  if reason:
    return reason
  if plan.block_q not in (64, 128):
    return f'block_q must be 64 or 128, got {plan.block_q}'
  if plan.block_kv not in (64, 128):
    return f'block_kv must be 64 or 128, got {plan.block_kv}'
  if not num_stages(plan.block_q, plan.block_kv, q.shape[-1], q.dtype.itemsize):
    return f'head_dim {q.shape[-1]} with block_kv {plan.block_kv} does not fit in shared memory'
  return common.rank_rule_unavailable(q, k, plan)


class _Ids(NamedTuple):
  """Where a compute warpgroup works: batch, query head, kv head, warpgroup, first q row."""
  b: jax.Array
  head: jax.Array
  kv_head: jax.Array
  wg: jax.Array
  q_base: jax.Array


class _Refs:
  """The kernel's refs by name (optional inputs are absent)."""

  def __init__(self, names, refs):
    for name, ref in zip(names, refs):
      setattr(self, name, ref)


class _Schedule:
  """Which (batch, head, q block) tiles CTA `cta` works on, in order."""

  def __init__(self, batch, num_heads, num_q_blocks, num_ctas):
    self.batch, self.num_heads, self.num_q_blocks = batch, num_heads, num_q_blocks
    self.num_tiles = batch * num_heads * num_q_blocks
    self.num_ctas = min(num_ctas, self.num_tiles) if num_ctas else self.num_tiles
    self.persistent = self.num_ctas < self.num_tiles

  def _position(self, cta, wave):
    """Place of a CTA in a wave: alternate waves run backwards, so that with tiles
    sorted longest first no CTA gets the longest tile of every wave."""
    return jnp.where(lax.rem(wave, 2) == 0, cta, self.num_ctas - 1 - cta)

  def count(self, cta):
    if not self.persistent:
      return 1
    full_waves, left = divmod(self.num_tiles, self.num_ctas)
    return full_waves + (self._position(cta, full_waves) < left).astype(jnp.int32)

  def tile(self, cta, j):
    """(batch, head, q block) of the j-th tile of a CTA. Longest q blocks (of causal-like
    plans) first; the grid schedule keeps one head's q blocks together for K/V reuse in L2."""
    q_blocks, heads = self.num_q_blocks, self.num_heads
    if not self.persistent:
      q_block, rest = lax.rem(cta, q_blocks), lax.div(cta, q_blocks)
      return lax.div(rest, heads), lax.rem(rest, heads), q_blocks - 1 - q_block
    t = j * self.num_ctas + self._position(cta, j)
    q_rank, rest = lax.div(t, heads * self.batch), lax.rem(t, heads * self.batch)
    return lax.div(rest, heads), lax.rem(rest, heads), q_blocks - 1 - q_rank


def _softmax_step(s, carry, dtype):
  """Online softmax update in base 2: (p in dtype, rescaled acc, m, l)."""
  acc, m, l = carry
  m_new = jnp.maximum(m, s.max(axis=1))
  alpha = jnp.exp2(m - m_new)
  p = jnp.exp2(s - lax.broadcast_in_dim(m_new, s.shape, [0]))
  acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
  l = l * alpha + p.sum(axis=1)
  return p.astype(dtype), acc, m_new, l


class _Kernel:
  """Static configuration and the warpgroup bodies of one kernel instance."""

  def __init__(self, plan, shapes, scale, dtype, options):
    (self.batch, _, self.num_heads, self.head_dim), self.num_kv_heads = shapes
    self.has_bias, self.has_segments, self.interpret, num_ctas = options
    self.has_ranks = plan.has_rank_rule
    self.plan = plan
    self.block_q, self.block_kv = plan.block_q, plan.block_kv
    self.compute_wgs = plan.block_q // ROWS
    self.schedule = _Schedule(self.batch, self.num_heads, plan.num_q_blocks, num_ctas)
    self.stages = num_stages(plan.block_q, plan.block_kv, self.head_dim, jnp.dtype(dtype).itemsize,
                             self.schedule.persistent)
    self.scale_log2 = scale * LOG2E
    self.dtype = dtype

  def _tile_list(self, r, tile):
    """(kv head, kv_count, packed steps row) of a tile."""
    b, head, q_block = tile
    plan_head = common.group_of(head, self.num_heads, self.plan.plan_heads)
    count = r.kv_count[b, plan_head, q_block]
    return common.group_of(head, self.num_heads, self.num_kv_heads), count, r.steps.at[b, plan_head, q_block]

  # Consumer (compute warpgroup) -------------------------------------------------------

  def _row_and_column(self, row_ref, column_ref, shape):
    """A per-query row and a per-key column of int32s, broadcast to the tile."""
    row = plgpu.load(row_ref, layout=WGMMA_ROW, optimized=False)
    column = plgpu.load(column_ref, layout=WGMMA_COL, optimized=False)
    return lax.broadcast_in_dim(row, shape, [0]), lax.broadcast_in_dim(column, shape, [1])

  def _element_mask(self, r, ids, kv_block):
    shape = (ROWS, self.block_kv)
    q_idx = ids.q_base + plgpu.broadcasted_iota(jnp.int32, shape, 0, layout=WGMMA)
    k_base = kv_block * self.block_kv
    k_idx = k_base + plgpu.broadcasted_iota(jnp.int32, shape, 1, layout=WGMMA)
    q_rows, k_cols = pl.ds(ids.q_base, ROWS), pl.ds(k_base, self.block_kv)
    q_seg = k_seg = q_threshold = k_rank = None
    if self.has_segments:
      q_seg, k_seg = self._row_and_column(r.q_seg.at[ids.b, q_rows], r.kv_seg.at[ids.b, k_cols], shape)
    if self.has_ranks:
      plan_head = common.group_of(ids.head, self.num_heads, self.plan.plan_heads)
      q_threshold, k_rank = self._row_and_column(r.q_threshold.at[ids.b, plan_head, q_rows],
                                                 r.key_rank.at[ids.b, plan_head, k_cols], shape)
    return self.plan.element_mask(q_idx, k_idx, q_seg, k_seg, q_threshold, k_rank)

  def _logits(self, r, scratch, ids, slot, kv_block, full, schedule):
    """Scaled base-2 logits of one step, masked where the block is partial."""
    bias = None
    if self.has_bias:
      bias = plgpu.load(r.bias.at[ids.b, ids.kv_head, pl.ds(kv_block * self.block_kv, self.block_kv)],
                        layout=WGMMA_COL, optimized=False)

    def qk_product(acc_ref):
      plgpu.wgmma(acc_ref, scratch.q.at[ids.wg], scratch.k.at[slot].T)
      schedule()
      return acc_ref[...]

    s = pl.run_scoped(qk_product, plgpu.ACC((ROWS, self.block_kv), jnp.float32))
    plgpu.barrier_arrive(scratch.k_consumed.at[slot])
    s = s * self.scale_log2
    if bias is not None:
      s = s + lax.broadcast_in_dim(bias * LOG2E, s.shape, [1])

    def masked():
      return jnp.where(self._element_mask(r, ids, kv_block), s, -jnp.inf)

    return lax.cond(full, lambda: s, masked)

  def _pv_product(self, acc, p, v_tile, while_running):
    """acc + p @ v_tile on wgmma with P from registers, `while_running` issued meanwhile.
    GPU interpret mode has neither register-A wgmma nor run_state: there it is a jnp dot."""
    if self.interpret:
      while_running()
      return acc + jnp.dot(p, v_tile[...], preferred_element_type=jnp.float32)

    def product(acc_ref):
      plgpu.wgmma(acc_ref, p, v_tile)
      while_running()

    return pl.run_state(product)(plgpu.ACC.init(acc))

  def _attend(self, r, scratch, ids, count, steps_row, base, schedule):
    """(acc, m, l) of one tile; `base` counts the ring steps of earlier tiles."""
    dual = self.compute_wgs == 2
    acc = plgpu.layout_cast(jnp.zeros((ROWS, self.head_dim), jnp.float32), WGMMA)
    m = plgpu.layout_cast(jnp.full((ROWS,), M_INIT, jnp.float32), WGMMA_ROW)
    l = plgpu.layout_cast(jnp.zeros((ROWS,), jnp.float32), WGMMA_ROW)
    plgpu.barrier_wait(scratch.q_ready.at[ids.wg])

    @pl.when(count > 0)
    def _():
      plgpu.barrier_wait(scratch.k_ready.at[lax.rem(base, self.stages)])

    if dual:
      pl.when(ids.wg == 1)(schedule)

    def step(i, carry):
      slot = lax.rem(base + i, self.stages)
      kv_block, full = common.unpack_step(steps_row[i])
      s = self._logits(r, scratch, ids, slot, kv_block, full, schedule)
      p, acc, m, l = _softmax_step(s, carry, self.dtype)
      if dual:
        acc, m, l, p = lax.optimization_barrier((acc, m, l, p))
        plgpu.barrier_arrive(scratch.schedule)
      plgpu.barrier_wait(scratch.v_ready.at[slot])
      if dual:
        plgpu.barrier_wait(scratch.schedule)

      def wait_next_k():
        @pl.when(i + 1 < count)
        def _():
          plgpu.barrier_wait(scratch.k_ready.at[lax.rem(base + i + 1, self.stages)])

      acc = self._pv_product(acc, p, scratch.v.at[slot], wait_next_k)
      plgpu.barrier_arrive(scratch.v_consumed.at[slot])
      return acc, m, l

    acc, m, l = lax.fori_loop(0, count, step, (acc, m, l))
    if dual:
      pl.when(ids.wg == 0)(schedule)
    return acc, m, l

  def _load_q(self, r, scratch, tile, wg):
    b, head, q_block = tile
    rows = pl.ds(q_block * self.block_q + wg * ROWS, ROWS)
    plgpu.copy_gmem_to_smem(r.q.at[b, rows, head], scratch.q.at[wg], scratch.q_ready.at[wg])

  def _write_out(self, r, scratch, ids, acc, m, l):
    visible = l > 0
    safe_l = jnp.where(visible, l, 1.0)
    out = acc * lax.broadcast_in_dim(1.0 / safe_l, acc.shape, [0])
    lse = jnp.where(visible, (m + jnp.log2(safe_l)) * LN2, EMPTY_ROW_LSE)
    out_tile = scratch.o if self.schedule.persistent else scratch.q  # grid: Q is no longer read
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's output has left SMEM
    out_tile[ids.wg] = out.astype(self.dtype)
    scratch.lse[ids.wg] = lse
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(out_tile.at[ids.wg], r.out.at[ids.b, pl.ds(ids.q_base, ROWS), ids.head])
    plgpu.copy_smem_to_gmem(scratch.lse.at[ids.wg], r.lse.at[ids.b, ids.head, pl.ds(ids.q_base, ROWS)])

  def consumer(self, r, scratch, cta, wg):
    dual = self.compute_wgs == 2

    def schedule():
      if dual:
        plgpu.barrier_arrive(scratch.schedule)
        plgpu.barrier_wait(scratch.schedule)

    if dual:  # 2 x 232 + 40 registers per thread fill the register file; one compute WG needs no split
      plgpu.set_max_registers(232, action='increase')
    num_tiles = self.schedule.count(cta)
    self._load_q(r, scratch, self.schedule.tile(cta, 0), wg)

    def tile_body(j, base):
      tile = self.schedule.tile(cta, j)
      kv_head, count, steps_row = self._tile_list(r, tile)
      ids = _Ids(tile[0], tile[1], kv_head, wg, tile[2] * self.block_q + wg * ROWS)
      acc, m, l = self._attend(r, scratch, ids, count, steps_row, base, schedule)
      if self.schedule.persistent:  # the last QK product has read Q: fetch the next tile's
        @pl.when(j + 1 < num_tiles)
        def _():
          self._load_q(r, scratch, self.schedule.tile(cta, j + 1), wg)
      self._write_out(r, scratch, ids, acc, m, l)
      return base + count

    # A loop even for the grid schedule's single tile: the ring position stays a traced value
    # (a constant captured by the PV run_state does not lower).
    lax.fori_loop(0, num_tiles, tile_body, jnp.int32(0))
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)

  # Producer (TMA warpgroup) -----------------------------------------------------------

  def producer(self, r, scratch, cta):
    if self.compute_wgs == 2:
      plgpu.set_max_registers(40, action='decrease')

    def tile_body(j, base):
      tile = self.schedule.tile(cta, j)
      kv_head, count, steps_row = self._tile_list(r, tile)

      @pl.loop(0, count)
      def _(i):
        slot = lax.rem(base + i, self.stages)
        rows = pl.ds(common.unpack_step(steps_row[i])[0] * self.block_kv, self.block_kv)
        refilling = base + i >= self.stages

        @pl.when(refilling)
        def _():
          plgpu.barrier_wait(scratch.k_consumed.at[slot])

        plgpu.copy_gmem_to_smem(r.k.at[tile[0], rows, kv_head], scratch.k.at[slot], scratch.k_ready.at[slot])

        @pl.when(refilling)
        def _():
          plgpu.barrier_wait(scratch.v_consumed.at[slot])

        plgpu.copy_gmem_to_smem(r.v.at[tile[0], rows, kv_head], scratch.v.at[slot], scratch.v_ready.at[slot])

      return base + count

    total = lax.fori_loop(0, self.schedule.count(cta), tile_body, jnp.int32(0))

    # Observe the last release of every slot, so that each barrier ends fully observed
    # (GPU interpret mode checks this; on hardware it only delays this idle warpgroup).
    @pl.loop(jnp.maximum(total - self.stages, 0), total)
    def _(g):
      slot = lax.rem(g, self.stages)
      plgpu.barrier_wait(scratch.k_consumed.at[slot])
      plgpu.barrier_wait(scratch.v_consumed.at[slot])

  # Entry ------------------------------------------------------------------------------

  SCRATCH_NAMES = ('q', 'k', 'v', 'o', 'lse', 'q_ready', 'k_ready', 'v_ready', 'k_consumed', 'v_consumed',
                   'schedule')

  def body(self, names, *refs):
    r = _Refs(names, refs[:len(names)])
    scratch = _Refs(self.SCRATCH_NAMES, refs[len(names):])
    cta, wg = lax.axis_index('cta'), lax.axis_index('wg')

    @pl.when(wg < self.compute_wgs)
    def _():
      self.consumer(r, scratch, cta, wg)

    @pl.when(wg == self.compute_wgs)
    def _():
      self.producer(r, scratch, cta)

  def scratch_types(self):
    tiled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    wgs, stages = self.compute_wgs, self.stages
    q_tile = plgpu.SMEM((wgs, ROWS, self.head_dim), self.dtype, transforms=tiled)
    kv_tile = plgpu.SMEM((stages, self.block_kv, self.head_dim), self.dtype, transforms=tiled)
    return (
        q_tile, kv_tile, kv_tile, q_tile if self.schedule.persistent else None,
        plgpu.SMEM((wgs, ROWS), jnp.float32),
        plgpu.Barrier(num_barriers=wgs),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_barriers=stages),
        plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
        plgpu.Barrier(num_arrivals=wgs, num_barriers=stages),
        plgpu.Barrier(num_arrivals=wgs),
    )


def _kernel_call(kernel, inputs, q_padded, interpret):
  names = tuple(inputs)
  b, t, h, _ = q_padded.shape
  out_types = (jax.ShapeDtypeStruct(q_padded.shape, q_padded.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32))
  call = plgpu.kernel(
      functools.partial(kernel.body, names + ('out', 'lse')),
      out_type=out_types,
      scratch_types=kernel.scratch_types(),
      grid=(kernel.schedule.num_ctas,),
      grid_names=('cta',),
      num_threads=kernel.compute_wgs + 1,
      thread_name='wg',
      kernel_name='block_sparse_fwd',
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=plgpu.InterpretGPUParams() if interpret else None,
  )
  return call(*inputs.values())


def _num_ctas(persistent, interpret, plan, head_dim, itemsize):
  """CTAs of the persistent schedule (None: one per tile)."""
  if not persistent or not num_stages(plan.block_q, plan.block_kv, head_dim, itemsize, persistent=True):
    return None
  return INTERPRET_CTAS if interpret else common.sm_count()



def uses_persistent_schedule(plan):
  """The default schedule: persistent when the mask bounds every list to a few blocks.
  On H100 (B=1, H=16, D=128) persistent was 5-10 % faster for causal windows of 1024 and
  slower for long causal rows at 32k and for per-head random plans, whose uneven lists
  its static tile order cannot balance (benchmarks/forward_probe.py)."""
  bound = plan.max_row_blocks()
  return bound is not None and bound <= SHORT_ROW_BLOCKS


def forward(q, k, v, key_bias, plan, scale, *, interpret=False, persistent=None):
  """(out [B, Tq, H, D] in q.dtype, lse [B, H, Tq] float32 natural log), as reference.forward.
  `persistent`: one CTA per SM walking tiles (True), one CTA per tile (False), or the
  choice of `uses_persistent_schedule` (None)."""
  reason = unavailable(q, k, v, key_bias, plan, interpret=interpret)
  if reason:
    raise ValueError(f'mosaic_gpu forward cannot run: {reason}')
  q_p, k_p, v_p, bias_p, q_seg, kv_seg = common.padded_inputs(q, k, v, key_bias, plan)
  inputs = dict(q=q_p, k=k_p, v=v_p, kv_count=plan.kv_count.astype(jnp.int32),
                steps=common.packed_steps(plan.kv_index, plan.kv_full))
  if bias_p is not None:
    inputs['bias'] = bias_p
  if q_seg is not None:
    inputs.update(q_seg=q_seg, kv_seg=kv_seg)
  if plan.has_rank_rule:
    inputs.update(common.padded_ranks(plan))
  if persistent is None:
    persistent = uses_persistent_schedule(plan)
  num_ctas = _num_ctas(persistent, interpret, plan, q.shape[-1], q.dtype.itemsize)
  options = (bias_p is not None, q_seg is not None, interpret, num_ctas)
  kernel = _Kernel(plan, (q.shape, k.shape[2]), scale, q.dtype, options)
  out, lse = _kernel_call(kernel, inputs, q_p, interpret)
  return out[:, :plan.q_len], lse[:, :, :plan.q_len]
