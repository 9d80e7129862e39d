"""Chunked gated linear attention forward as a Pallas Mosaic TPU kernel.

Grid (batch, heads, chunks); the chunk axis is sequential ('arbitrary') and carries the
state in VMEM scratch, stored transposed (S^T [Dv, Dk]) so the per-key-channel decay, a
[1, Dk] row, scales it along lanes. Per chunk of C tokens, in sub-chunks of c rows, it
computes what reference.chunked computes, with the same numerics: every exponent is a sum
of log decays formed by a 0/1-mask matmul over g (never a difference of cumulative sums):
  within a sub-chunk  the pairwise decays, one key column per loop step;
  across sub-chunks   q scaled by its decay since its sub-chunk's start, k by its decay up
                      to that start: one NT matmul per sub-chunk;
  from the state      q scaled by its decay since the chunk start, where its segment began
                      before the chunk.
Segment resets come as per-token run indices (row and column layouts) and a per-token
`continues` column (1 where the token's segment began before its chunk).
The backward runs through the reference (jax.vjp of reference.chunked) until a kernel
backward exists.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.implementations import Implementation
from pallas_kernels.linear_attention import reference

LANES = 128
NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
PRECISION = lax.Precision.HIGHEST


def _dot(a, b, dims=(((1,), (0,)), ((), ()))):
  return lax.dot_general(a, b, dims, precision=PRECISION, preferred_element_type=jnp.float32)


def _mask(shape, rule):
  """float32 0/1 matrix from rule(row_iota, col_iota)."""
  rows, cols = lax.broadcasted_iota(jnp.int32, shape, 0), lax.broadcasted_iota(jnp.int32, shape, 1)
  return rule(rows, cols).astype(jnp.float32)


def _masked_exp(mask, exponent):
  return jnp.where(mask, jnp.exp(jnp.where(mask, exponent, 0.0)), 0.0)


def _within_sub_chunk(q_sub, g_sub, k_ref, first_key, sub_chunk):
  """[c, c] scores q_t . (exp(sum of g over s < u <= t) * k_s), t >= s, one key column per step."""
  rows = lax.broadcasted_iota(jnp.int32, (sub_chunk, 1), 0)
  cols = lax.broadcasted_iota(jnp.int32, (sub_chunk, sub_chunk), 1)

  def add_column(s, scores):
    spans = _mask((sub_chunk, sub_chunk), lambda t, u: (u > s) & (u <= t))
    exponent = _dot(spans, g_sub)  # [c, Dk]
    k_s = k_ref[pl.ds(first_key + s, 1), :].astype(jnp.float32)  # [1, Dk]
    column = jnp.sum(q_sub * k_s * _masked_exp(rows >= s, exponent), axis=-1, keepdims=True)
    return jnp.where(cols == s, column, scores)

  return lax.fori_loop(0, sub_chunk, add_column, jnp.zeros((sub_chunk, sub_chunk), jnp.float32))


def _kernel(q_ref, k_ref, v_ref, g_ref, run_col_ref, run_row_ref, continues_ref, state0_ref, o_ref, final_ref,
            state_ref, *, scale, chunk, sub_chunk):
  n = pl.program_id(2)

  @pl.when(n == 0)
  def _():
    state_ref[...] = state0_ref[...].astype(jnp.float32)

  q = q_ref[...].astype(jnp.float32)
  k = k_ref[...].astype(jnp.float32)
  v = v_ref[...].astype(jnp.float32)
  g = g_ref[...]
  run_col, run_row = run_col_ref[...], run_row_ref[...]  # [C, 1], [1, C]
  continues = continues_ref[...]  # [C, 1] float32 0/1
  state_t = state_ref[...]  # [Dv, Dk]
  visible = (run_col == run_row) & (lax.broadcasted_iota(jnp.int32, (chunk, chunk), 0) >=
                                    lax.broadcasted_iota(jnp.int32, (chunk, chunk), 1))
  q_rel = q * jnp.exp(_dot(_mask((chunk, chunk), lambda t, u: (t // sub_chunk == u // sub_chunk) & (u <= t)), g))
  q_from_state = q * jnp.exp(_dot(_mask((chunk, chunk), lambda t, u: u <= t), g)) * continues
  key_rows = lax.broadcasted_iota(jnp.int32, (chunk, 1), 0)
  for i in range(chunk // sub_chunk):
    rows = slice(i * sub_chunk, (i + 1) * sub_chunk)
    start = i * sub_chunk
    o_rows = _dot(q_from_state[rows], state_t, NT)
    within = _within_sub_chunk(q[rows], g[rows], k_ref, start, sub_chunk)
    o_rows += _dot(jnp.where(visible[rows, rows], within, 0.0), v[rows])
    if i:
      gaps = _dot(_mask((chunk, chunk), lambda s, u: (u > s) & (u < start)), g)
      k_rel = k * _masked_exp(key_rows < start, gaps)
      across = _dot(q_rel[rows], k_rel, NT)  # [c, C]
      o_rows += _dot(jnp.where(visible[rows], across, 0.0), v)
    o_ref[rows, :] = (scale * o_rows).astype(o_ref.dtype)
  in_last_run = run_col == run_col[chunk - 1:, :]
  k_to_end = k * _masked_exp(in_last_run, _dot(_mask((chunk, chunk), lambda s, u: u > s), g))
  chunk_decay = jnp.exp(jnp.sum(g, axis=0, keepdims=True)) * continues[chunk - 1:, :]  # [1, Dk]
  state_ref[...] = chunk_decay * state_t + _dot(v, k_to_end, TN)

  @pl.when(n == pl.num_programs(2) - 1)
  def _():
    final_ref[...] = state_ref[...]


def _heads_major(x, length):
  """[B, T, H, D] -> [B, H, length, D], zero-padded."""
  x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0)))
  return x.transpose(0, 2, 1, 3)


def _segment_layouts(segment_ids, batch, length, padded, chunk):
  """Run indices as columns [B, Tp, 1] and rows per chunk [B, N, 1, C] int32 (a row block must
  span its array's last axis, or 128 lanes), and the `continues` column [B, Tp, 1] f32."""
  runs = jnp.pad(reference.segment_runs(segment_ids, batch, length), ((0, 0), (0, padded - length)), mode='edge')
  by_chunk = runs.reshape(batch, -1, chunk)
  run_before = jnp.concatenate([by_chunk[:, :1, 0], by_chunk[:, :-1, -1]], axis=1)
  continues = (by_chunk == run_before[:, :, None]).astype(jnp.float32).reshape(batch, padded, 1)
  return runs[:, :, None], by_chunk[:, :, None, :], continues


@functools.partial(jax.jit, static_argnames=('scale', 'chunk', 'sub_chunk', 'interpret'))
def forward(q, k, v, g, initial_state, segment_ids, scale, *, chunk=reference.CHUNK, sub_chunk=reference.SUB_CHUNK,
            interpret=False):
  """(o [B,T,H,Dv] q.dtype, final state [B,H,Dk,Dv] f32), as reference.chunked."""
  if chunk % sub_chunk:
    raise ValueError(f'chunk {chunk} must be a multiple of sub_chunk {sub_chunk}')
  b, t, h, dk = q.shape
  dv = v.shape[3]
  padded = -(-t // chunk) * chunk
  qh, kh, vh = (_heads_major(x, padded) for x in (q, k, v))
  gh = _heads_major(reference.log_decay(g), padded)
  state0 = jnp.zeros((b, h, dk, dv), jnp.float32) if initial_state is None else initial_state
  state0_t = state0.astype(jnp.float32).swapaxes(2, 3)
  run_col, run_row, continues = _segment_layouts(segment_ids, b, t, padded, chunk)
  token_block = lambda d: pl.BlockSpec((None, None, chunk, d), lambda i, j, n: (i, j, n, 0))
  column_block = pl.BlockSpec((None, chunk, 1), lambda i, j, n: (i, n, 0))
  state_block = pl.BlockSpec((None, None, dv, dk), lambda i, j, n: (i, j, 0, 0))
  in_specs = [token_block(dk), token_block(dk), token_block(dv), token_block(dk), column_block,
              pl.BlockSpec((None, None, 1, chunk), lambda i, j, n: (i, n, 0, 0)), column_block, state_block]
  o, final_t = pl.pallas_call(
      functools.partial(_kernel, scale=scale, chunk=chunk, sub_chunk=sub_chunk),
      grid=(b, h, padded // chunk),
      in_specs=in_specs,
      out_specs=[token_block(dv), state_block],
      out_shape=[jax.ShapeDtypeStruct((b, h, padded, dv), q.dtype), jax.ShapeDtypeStruct((b, h, dv, dk), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((dv, dk), jnp.float32)],
      compiler_params=pltpu.CompilerParams(dimension_semantics=('parallel', 'parallel', 'arbitrary')),
      interpret=pltpu.InterpretParams() if interpret else False,
      name='gated_linear_attention_forward',
  )(qh, kh, vh, gh, run_col, run_row, continues, state0_t)
  return o.transpose(0, 2, 1, 3)[:, :t], final_t.swapaxes(2, 3)


def _unavailable_anywhere(q, k, v, g, initial_state, segment_ids):
  return None


def _unavailable_on_tpu(q, k, v, g, initial_state, segment_ids):
  if q.shape[3] % LANES or v.shape[3] % LANES:
    return f'Mosaic TPU needs Dk and Dv multiples of {LANES}, got {q.shape[3]} and {v.shape[3]}'
  return None


IMPLEMENTATIONS = (
    Implementation('tpu', functools.partial(forward, interpret=False), reference.chunked_backward, platforms=('tpu',),
                   unavailable=_unavailable_on_tpu),
    Implementation('tpu_interpret', functools.partial(forward, interpret=True), reference.chunked_backward,
                   unavailable=_unavailable_anywhere),
)
