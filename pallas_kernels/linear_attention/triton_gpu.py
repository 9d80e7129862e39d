"""Chunked gated linear attention on CUDA GPUs: Triton kernels (triton_gpu_kernels.py) called
through jax_triton, forward and backward.

Forward, per batch row and head (chunks of C = 64 tokens, sub-chunks of 16 by default):
  decayed_qk     parallel over chunks: q decayed since the chunk start, k decayed to the
                 chunk end and each chunk's decay, so that the sequential passes only
                 update the state;
  chunk_states   sequential over chunks, one program per (Dk block, Dv block): the state
                 entering every chunk ([B*H, N, Dk, Dv]) and the final state (float32);
  chunk_scores   one program per sub-chunk (and Dk block, BK < Dk): its rows of the
                 intra-chunk score matrix A ([B, T, H, C]; per Dk block a float32 part,
                 summed): one matmul per earlier sub-chunk, pairwise decays within; or
                 (chunk_scores:blocks=1) one program per [sub-chunk, sub-chunk] block;
  chunk_output   parallel over chunks and Dv blocks: q decayed since the chunk start against
                 the entering state, plus A @ v.
Backward (decayed_qk, the entering states and A recomputed, as FLA does):
  state_grads    sequential over chunks backwards: the gradient of the state leaving every
                 chunk, of the initial state, and per chunk rowsum(leaving state * its
                 gradient), the carry of dg across chunks;
  chunk_dscores  dA = scale * do @ v^T over the visible pairs of each chunk (float32);
  chunk_dqk      one program per sub-chunk and Dk block: dq, dk and dlog = q*dq - k*dk
                 (the gradient of each token's cumulative log decay); within the sub-chunk
                 one walk over its rows, or (chunk_dqk:two_walks=1) two;
  chunk_dv       dv = scale * A^T @ do + (k decayed to the chunk end) @ d_state;
  log_decay_grads  dg: dlog summed over the later tokens of each token's segment within its
                 chunk (a 0/1-mask matmul), plus the carry for the chunk's last segment.
The states, A and the decayed q and k are stored in bfloat16 when the kernels' matmuls
take bf16 operands (inputs not float32): the values they would be rounded to anyway.
Launch settings (chunk sizes, num_warps, num_stages, block sizes) are in triton_launch.py,
overridable through SPARSEFORMER_GLA_LAUNCH.
triton and jax_triton are imported only when a kernel is first called, so this module
imports anywhere; `unavailable` reports why it cannot run off a CUDA GPU.
"""

import dataclasses
import functools
import importlib

import jax
import jax.numpy as jnp

from pallas_kernels.implementations import Implementation
from pallas_kernels.linear_attention import reference, triton_launch

CHUNK = reference.CHUNK
HEAD_DIMS = (16, 32, 64, 128, 256)


def chunk_count(length, chunk=CHUNK):
  return -(-length // chunk)


def segment_layout(segment_ids, batch, length, chunk=CHUNK):
  """(runs, continues), int32 [B, Tp] with Tp = length padded to the chunk: each token's
  segment index (0 for the row's first segment; padded tokens continue the last one) and 1
  where the token's segment began before the token's chunk (it reads the entering state)."""
  padded = chunk_count(length, chunk) * chunk
  runs = jnp.pad(reference.segment_runs(segment_ids, batch, length), ((0, 0), (0, padded - length)), mode='edge')
  by_chunk = runs.reshape(batch, -1, chunk)
  run_before = jnp.concatenate([by_chunk[:, :1, 0], by_chunk[:, :-1, -1]], axis=1)
  continues = (by_chunk == run_before[:, :, None]).astype(jnp.int32).reshape(batch, padded)
  return runs.astype(jnp.int32), continues


def _shape_reason(q, v):
  dk, dv = q.shape[3], v.shape[3]
  if dk not in HEAD_DIMS or dv not in HEAD_DIMS:
    return f'the Triton kernel needs Dk and Dv in {HEAD_DIMS}, got {dk} and {dv}'
  return None


def _platform_reason():
  device = jax.devices()[0]
  if device.platform != 'gpu':
    return f'needs a CUDA GPU, the default device is {device.platform}'
  if 'rocm' in getattr(device.client, 'platform_version', '').lower():
    return 'needs a CUDA GPU, not ROCm'
  try:
    importlib.import_module('jax_triton')
  except Exception as error:  # ImportError, or triton's own failure to load
    return f'jax_triton cannot be imported ({type(error).__name__}: {str(error)[:120]})'
  return None


def unavailable(q, k, v, g, initial_state, segment_ids):
  return _shape_reason(q, v) or _platform_reason()


# ----------------------------------------------------------------------------------------
# launching


def jax_triton_launch(kernel_name, grid, inputs, out_shapes, **meta):
  """Runs kernel `kernel_name` of triton_gpu_kernels through jax_triton.triton_call (meta:
  num_warps, num_stages and the kernel's compile-time arguments)."""
  import jax_triton
  kernels = importlib.import_module('pallas_kernels.linear_attention.triton_gpu_kernels')
  return jax_triton.triton_call(*inputs, kernel=getattr(kernels, kernel_name), out_shape=out_shapes, grid=grid,
                                name=f'gla_{kernel_name}', **meta)


@dataclasses.dataclass(frozen=True)
class _Problem:
  """One call's sizes and settings; `launch` runs a kernel with its settings' num_warps and
  num_stages. T, Tp and N are run-time scalars of the kernels, so one compiled kernel
  serves every length."""
  launch: object
  settings: triton_launch.LaunchSettings
  b: int
  t: int
  h: int
  dk: int
  dv: int
  precise: bool

  @property
  def chunk(self):
    return self.settings.chunk

  @property
  def n(self):
    return chunk_count(self.t, self.chunk)

  @property
  def lengths(self):
    return self.t, self.n * self.chunk, self.n

  @property
  def stored(self):
    """dtype of the states, A and the decayed q and k: what the matmuls round them to anyway."""
    return jnp.float32 if self.precise else jnp.bfloat16

  def block(self, name, key):
    return self.settings.block(name, key, self.dk if key == 'BK' else self.dv)

  def run(self, name, grid, inputs, out_shapes, variant=None, **constants):
    """Runs kernel `variant` (default `name`) with the launch settings of `name`."""
    kernel = self.settings.kernel(name)
    return self.launch(variant or name, grid, (*inputs, *self.lengths), out_shapes, num_warps=kernel.num_warps,
                       num_stages=kernel.num_stages, H=self.h, C=self.chunk, **constants)


def _problem(launch, settings, q, v):
  b, t, h, dk = q.shape
  settings = triton_launch.from_environment() if settings is None else settings
  return _Problem(launch, settings, b, t, h, dk, v.shape[3], q.dtype == jnp.float32)


def _f32(shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _decayed_qk(p, q, k, g, runs, continues):
  """(q decayed since the chunk start, k decayed to the chunk end, the chunks' decays)."""
  name = 'decayed_qk_kernel'
  bk = p.block(name, 'BK')
  return p.run(name, (p.n, p.b * p.h, p.dk // bk), (q, k, g, runs, continues),
               (jax.ShapeDtypeStruct(q.shape, p.stored), jax.ShapeDtypeStruct(k.shape, p.stored),
                _f32((p.b * p.h, p.n, p.dk))), DK=p.dk, BK=bk)


def _chunk_states(p, k_to_end, v, chunk_decay, state0):
  name = 'chunk_states_kernel'
  bk, bv = p.block(name, 'BK'), p.block(name, 'BV')
  bh = p.b * p.h
  return p.run(name, (bh, p.dk // bk, p.dv // bv), (k_to_end, v, chunk_decay, state0),
               (jax.ShapeDtypeStruct((bh, p.n, p.dk, p.dv), p.stored), _f32((bh, p.dk, p.dv))),
               DK=p.dk, DV=p.dv, BK=bk, BV=bv, PRECISE=p.precise)


def _chunk_scores(p, q, k, g, runs):
  """A [B, T, H, C] in the stored dtype; with Dk in several blocks, the float32 sum of the
  blocks' parts."""
  name = 'chunk_scores_kernel'
  sub, bk = p.settings.sub_chunk, p.block(name, 'BK')
  parts = p.dk // bk
  shape = (p.b, p.t, p.h, p.chunk)
  launch = p.settings.kernel(name)
  if launch.blocks:
    return p.run(name, (p.n * (p.chunk // sub) ** 2, p.b * p.h), (q, k, g, runs), jax.ShapeDtypeStruct(shape, p.stored),
                 variant='chunk_score_blocks_kernel', DK=p.dk, SUB=sub, BK=bk, PRECISE=p.precise, UNROLL=launch.unroll,
                 HALVES=launch.halves)
  scores = p.run(name, (p.n * (p.chunk // sub), p.b * p.h, parts), (q, k, g, runs),
                 jax.ShapeDtypeStruct(shape, p.stored) if parts == 1 else _f32((parts,) + shape),
                 DK=p.dk, SUB=sub, BK=bk, PRECISE=p.precise, UNROLL=launch.unroll)
  return scores if parts == 1 else jnp.sum(scores, axis=0).astype(p.stored)


def _initial_state(q, v, initial_state):
  b, _, h, dk = q.shape
  if initial_state is None:
    return jnp.zeros((b * h, dk, v.shape[3]), jnp.float32)
  return initial_state.astype(jnp.float32).reshape(b * h, dk, v.shape[3])


@dataclasses.dataclass
class _Parts:
  """What both passes compute: the segment layout, the decayed q and k, the chunks' decays,
  the entering states, the final state and the intra-chunk scores A."""
  runs: jax.Array
  continues: jax.Array
  q_from_state: jax.Array
  k_to_end: jax.Array
  chunk_decay: jax.Array
  states: jax.Array
  final: jax.Array
  scores: jax.Array


def _parts(p, q, k, v, g, initial_state, segment_ids):
  runs, continues = segment_layout(segment_ids, p.b, p.t, p.chunk)
  q_from_state, k_to_end, chunk_decay = _decayed_qk(p, q, k, g, runs, continues)
  states, final = _chunk_states(p, k_to_end, v, chunk_decay, _initial_state(q, v, initial_state))
  return _Parts(runs, continues, q_from_state, k_to_end, chunk_decay, states, final, _chunk_scores(p, q, k, g, runs))


def forward_with(launch, q, k, v, g, initial_state, segment_ids, scale, settings=None):
  """(o [B,T,H,Dv] q.dtype, final state [B,H,Dk,Dv] f32); settings: LaunchSettings, by
  default those of the environment (triton_launch.from_environment)."""
  p = _problem(launch, settings, q, v)
  parts = _parts(p, q, k, v, g, initial_state, segment_ids)
  name = 'chunk_output_kernel'
  bk, bv = p.block(name, 'BK'), p.block(name, 'BV')
  o = p.run(name, (p.n, p.b * p.h, p.dv // bv), (parts.q_from_state, v, parts.states, parts.scores),
            jax.ShapeDtypeStruct(v.shape, q.dtype), DK=p.dk, DV=p.dv, BK=bk, BV=bv, SCALE=float(scale),
            PRECISE=p.precise)
  return o, parts.final.reshape(p.b, p.h, p.dk, p.dv)


def _state_grads(p, parts, d_o, d_final, scale):
  name = 'state_grads_kernel'
  bk, bv = p.block(name, 'BK'), p.block(name, 'BV')
  bh = p.b * p.h
  d_states, d_state0, carries = p.run(
      name, (bh, p.dk // bk, p.dv // bv),
      (parts.q_from_state, d_o, parts.chunk_decay, parts.states, parts.final, d_final),
      (jax.ShapeDtypeStruct(parts.states.shape, p.stored), _f32((bh, p.dk, p.dv)), _f32((bh, p.n, p.dv // bv, p.dk))),
      DK=p.dk, DV=p.dv, BK=bk, BV=bv, SCALE=float(scale), PRECISE=p.precise)
  return d_states, d_state0, jnp.sum(carries, axis=2)


def _query_key_grads(p, q, k, v, g, d_o, parts, d_states, d_scores, scale):
  name = 'chunk_dqk_kernel'
  bk, bv = p.block(name, 'BK'), p.block(name, 'BV')
  sub = p.settings.sub_chunk
  return p.run(name, (p.n * (p.chunk // sub), p.b * p.h, p.dk // bk),
               (q, k, v, g, d_o, parts.runs, parts.continues, parts.states, d_states, d_scores),
               (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype), _f32(q.shape)),
               DK=p.dk, DV=p.dv, SUB=sub, BK=bk, BV=bv, SCALE=float(scale), PRECISE=p.precise,
               UNROLL=p.settings.kernel(name).unroll, TWO_WALKS=p.settings.kernel(name).two_walks)


def backward_with(launch, q, k, v, g, initial_state, segment_ids, scale, o, final_state, d_o, d_final_state,
                  settings=None):
  """(dq, dk, dv, dg, d_initial_state or None), each in its input's dtype."""
  del o, final_state  # recomputed (the final state in float32, as the carry of dg needs it)
  p = _problem(launch, settings, q, v)
  bh = p.b * p.h
  d_o = d_o.astype(q.dtype)
  parts = _parts(p, q, k, v, g, initial_state, segment_ids)
  d_final = d_final_state.astype(jnp.float32).reshape(bh, p.dk, p.dv)
  d_states, d_state0, carries = _state_grads(p, parts, d_o, d_final, scale)
  bv = p.block('chunk_dscores_kernel', 'BV')
  d_scores = p.run('chunk_dscores_kernel', (p.n, bh), (v, d_o, parts.runs), _f32((p.b, p.t, p.h, p.chunk)), DV=p.dv,
                   BV=bv, SCALE=float(scale), PRECISE=p.precise)
  dq, dk, dlog = _query_key_grads(p, q, k, v, g, d_o, parts, d_states, d_scores, scale)
  name = 'chunk_dv_kernel'
  bk, bv = p.block(name, 'BK'), p.block(name, 'BV')
  dv = p.run(name, (p.n, bh, p.dv // bv), (parts.k_to_end, d_o, d_states, parts.scores),
             jax.ShapeDtypeStruct(v.shape, v.dtype), DK=p.dk, DV=p.dv, BK=bk, BV=bv, SCALE=float(scale),
             PRECISE=p.precise)
  bk = p.block('log_decay_grads_kernel', 'BK')
  dg_floored = p.run('log_decay_grads_kernel', (p.n, bh, p.dk // bk), (dlog, parts.runs, carries), _f32(q.shape),
                     DK=p.dk, BK=bk)
  _, through_floor = jax.vjp(reference.log_decay, g)
  (dg,) = through_floor(dg_floored)
  d_initial = None if initial_state is None else d_state0.reshape(initial_state.shape).astype(initial_state.dtype)
  return dq, dk, dv, dg, d_initial


@functools.partial(jax.jit, static_argnames=('scale',))
def forward(q, k, v, g, initial_state, segment_ids, scale):
  return forward_with(jax_triton_launch, q, k, v, g, initial_state, segment_ids, scale)


@functools.partial(jax.jit, static_argnames=('scale',))
def backward(q, k, v, g, initial_state, segment_ids, scale, o, final_state, d_o, d_final_state):
  return backward_with(jax_triton_launch, q, k, v, g, initial_state, segment_ids, scale, o, final_state, d_o,
                       d_final_state)


IMPLEMENTATIONS = (
    Implementation('triton', forward, backward, platforms=('gpu',), unavailable=unavailable),
)
