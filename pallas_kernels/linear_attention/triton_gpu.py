"""Chunked gated linear attention on CUDA GPUs: Triton kernels (triton_gpu_kernels.py) called
through jax_triton, forward and backward.

Forward, per batch row and head (chunks of C = 64 tokens, sub-chunks of 16):
  chunk_states   sequential over chunks, one program per (Dk block, Dv block): the state
                 entering every chunk (float32 [B*H, N, Dk, Dv]) and the final state;
  chunk_output   parallel over chunks: o from the entering state, from earlier sub-chunks
                 (one matmul per sub-chunk) and within each sub-chunk (pairwise decays).
Backward (the entering states recomputed by chunk_states, as FLA does):
  state_grads    sequential over chunks backwards: the gradient of the state leaving every
                 chunk, and of the initial state;
  chunk_dqk      dq, dk and dlog = q*dq - k*dk (the gradient of each token's cumulative log
                 decay) per chunk;  chunk_dv  dv per chunk;
  log_decay_grads  dg: dlog summed over the later tokens of each token's segment, plus the
                 final state's share (rowsum(final * d_final)) for the row's last segment.
triton and jax_triton are imported only when a kernel is first called, so this module
imports anywhere; `unavailable` reports why it cannot run off a CUDA GPU.
"""

import functools
import importlib

import jax
import jax.numpy as jnp

from pallas_kernels.implementations import Implementation
from pallas_kernels.linear_attention import reference

CHUNK = reference.CHUNK
SUB_CHUNK = reference.SUB_CHUNK
MAX_BLOCK = 64  # Dk / Dv columns per program of the chunk-parallel kernels
# ... and of the kernels sequential over chunks: narrower, for more programs in flight
MAX_SEQUENTIAL_BLOCK = 32
HEAD_DIMS = (16, 32, 64, 128, 256)
NUM_WARPS = 4


def chunk_count(length, chunk=CHUNK):
  return -(-length // chunk)


def block_size(head_dim):
  return min(head_dim, MAX_BLOCK)


def sequential_block_size(head_dim):
  return min(head_dim, MAX_SEQUENTIAL_BLOCK)


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
  """Runs kernel `kernel_name` of triton_gpu_kernels through jax_triton.triton_call."""
  import jax_triton
  kernels = importlib.import_module('pallas_kernels.linear_attention.triton_gpu_kernels')
  return jax_triton.triton_call(*inputs, kernel=getattr(kernels, kernel_name), out_shape=out_shapes, grid=grid,
                                num_warps=NUM_WARPS, name=f'gla_{kernel_name}', **meta)


def _dims(q, v, chunk):
  """(compile-time sizes, run-time lengths (T, Tp, N): the kernels' scalar arguments, so
  one compiled kernel serves every length)."""
  b, t, h, dk = q.shape
  n = chunk_count(t, chunk)
  return dict(H=h, DK=dk, DV=v.shape[3], C=chunk), (t, n * chunk, n)


def _f32(shape):
  return jax.ShapeDtypeStruct(shape, jnp.float32)


def _chunk_states(launch, k, v, g, state0, runs, continues, dims, lengths, precise):
  bh, n, dk, dv = dims['H'] * k.shape[0], lengths[2], dims['DK'], dims['DV']
  bk, bv = sequential_block_size(dk), sequential_block_size(dv)
  return launch('chunk_states_kernel', (bh, dk // bk, dv // bv), (k, v, g, runs, continues, state0, *lengths),
                (_f32((bh, n, dk, dv)), _f32((bh, dk, dv))), BK=bk, BV=bv, PRECISE=precise, **dims)


def _initial_state(q, v, initial_state):
  b, _, h, dk = q.shape
  if initial_state is None:
    return jnp.zeros((b * h, dk, v.shape[3]), jnp.float32)
  return initial_state.astype(jnp.float32).reshape(b * h, dk, v.shape[3])


def forward_with(launch, q, k, v, g, initial_state, segment_ids, scale, chunk=CHUNK):
  """(o [B,T,H,Dv] q.dtype, final state [B,H,Dk,Dv] f32)."""
  b, t, h, dk = q.shape
  dims, lengths = _dims(q, v, chunk)
  dv = dims['DV']
  precise = q.dtype == jnp.float32
  runs, continues = segment_layout(segment_ids, b, t, chunk)
  states, final = _chunk_states(launch, k, v, g, _initial_state(q, v, initial_state), runs, continues, dims,
                                lengths, precise)
  bv = block_size(dv)
  o = launch('chunk_output_kernel', (lengths[2], b * h, dv // bv), (q, k, v, g, runs, continues, states, *lengths),
             jax.ShapeDtypeStruct(v.shape, q.dtype), SUB=SUB_CHUNK, BV=bv, SCALE=float(scale), PRECISE=precise,
             **dims)
  return o, final.reshape(b, h, dk, dv)


def backward_with(launch, q, k, v, g, initial_state, segment_ids, scale, o, final_state, d_o, d_final_state,
                  chunk=CHUNK):
  """(dq, dk, dv, dg, d_initial_state or None), each in its input's dtype."""
  del o
  b, t, h, dk = q.shape
  dims, lengths = _dims(q, v, chunk)
  bh, dv, n = b * h, dims['DV'], lengths[2]
  bk, bv = block_size(dk), block_size(dv)
  precise = q.dtype == jnp.float32
  kernel_options = dict(SCALE=float(scale), PRECISE=precise, **dims)
  runs, continues = segment_layout(segment_ids, b, t, chunk)
  d_o = d_o.astype(q.dtype)
  states, _ = _chunk_states(launch, k, v, g, _initial_state(q, v, initial_state), runs, continues, dims, lengths,
                            precise)
  d_final = d_final_state.astype(jnp.float32).reshape(bh, dk, dv)
  sk, sv = sequential_block_size(dk), sequential_block_size(dv)
  d_states, d_state0 = launch('state_grads_kernel', (bh, dk // sk, dv // sv),
                              (q, d_o, g, continues, d_final, *lengths),
                              (_f32((bh, n, dk, dv)), _f32((bh, dk, dv))), BK=sk, BV=sv, **kernel_options)
  dq, dk_, dlog = launch('chunk_dqk_kernel', (n, bh, dk // bk),
                         (q, k, v, g, d_o, runs, continues, states, d_states, *lengths),
                         (jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct(k.shape, k.dtype),
                          _f32(q.shape)), SUB=SUB_CHUNK, BK=bk, **kernel_options)
  dv_ = launch('chunk_dv_kernel', (n, bh, dv // bv), (q, k, g, d_o, runs, d_states, *lengths),
               jax.ShapeDtypeStruct(v.shape, v.dtype), SUB=SUB_CHUNK, BV=bv, **kernel_options)
  final_share = jnp.sum(final_state.astype(jnp.float32) * d_final_state.astype(jnp.float32), axis=-1)
  dg_floored = launch('log_decay_grads_kernel', (bh, dk // sk),
                      (dlog, runs, continues, final_share.reshape(bh, dk), *lengths), _f32(q.shape), BK=sk,
                      H=h, DK=dk, C=chunk)
  _, through_floor = jax.vjp(reference.log_decay, g)
  (dg,) = through_floor(dg_floored)
  d_initial = None if initial_state is None else d_state0.reshape(initial_state.shape).astype(initial_state.dtype)
  return dq, dk_, dv_, dg, d_initial


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
