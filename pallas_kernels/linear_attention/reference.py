"""Exact gated linear attention (GLA) in jnp: the oracle every kernel is tested against.

Per batch row and head, with a per-key-channel log decay g_t <= 0 and state S [Dk, Dv]:

    S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T          (S_{t-1} = 0 at a segment start)
    o_t = scale * S_t^T q_t

q, k, g are [B, T, H, Dk], v is [B, T, H, Dv]. `segment_ids` [B, T] packs documents: the
state resets wherever the id differs from the previous token's (a run of equal ids is one
segment; the id values themselves mean nothing). `initial_state` [B, H, Dk, Dv] seeds the
row's first segment only. The final state is the state after the row's last token, i.e.
the last segment's state (it contains the initial state only when the row is one segment).

Three versions, all computing in float32 (o in q.dtype, the final state in float32):
  naive      materialises the decayed causal [T, T, Dk] matrix: the oracle, small T only;
  recurrent  lax.scan token by token;
  chunked    chunks of 64: intra-chunk a masked decayed matmul, inter-chunk the carried state.
Every exponent is a sum of log decays over the tokens it spans, formed directly (a cumsum,
a reverse cumsum or a 0/1-mask matmul), never as a difference of two cumulative sums: a
strong decay early in a row would otherwise swamp the small decays after it (catastrophic
cancellation). So every exponent is <= 0; where a pair is masked out it is replaced by 0
before exp, so no exp ever sees a large positive number and the gradients carry no NaN.
g may be -inf (forget everything): it is floored at LOG_DECAY_FLOOR, whose exp is 0.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.implementations import Implementation

CHUNK = 64
SUB_CHUNK = 16
PRECISION = lax.Precision.HIGHEST
LOG_DECAY_FLOOR = -1e30  # finite, so 0/1-mask matmuls over g never form 0 * inf


def log_decay(g):
  """float32, floored (-inf -> LOG_DECAY_FLOOR)."""
  return jnp.maximum(g.astype(jnp.float32), LOG_DECAY_FLOOR)


def default_scale(q):
  return q.shape[-1] ** -0.5


def segment_runs(segment_ids, batch, length):
  """[B, T] int32: 0 for the first segment of the row, +1 at every id change."""
  if segment_ids is None:
    return jnp.zeros((batch, length), jnp.int32)
  starts = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), jnp.cumsum(starts, axis=1)], axis=1)


def _heads_major(x):
  """[B, T, H, D] -> [B, H, T, D] float32."""
  return x.astype(jnp.float32).transpose(0, 2, 1, 3)


def _zero_state(q, v, initial_state):
  if initial_state is not None:
    return initial_state.astype(jnp.float32)
  return jnp.zeros((q.shape[0], q.shape[2], q.shape[3], v.shape[3]), jnp.float32)


def _suffix_sums(g, axis):
  """sum of g over the positions strictly after each one along axis (0 at the end)."""
  inclusive = jnp.flip(jnp.cumsum(jnp.flip(g, axis), axis), axis)
  after = lax.slice_in_dim(inclusive, 1, g.shape[axis], axis=axis)
  return jnp.concatenate([after, jnp.zeros_like(lax.slice_in_dim(g, 0, 1, axis=axis))], axis=axis)


def _span_sums(g, axis_size):
  """[.., t, s, Dk]: sum of g[.., u, :] over s < u <= t (0 where t <= s), g [.., n, Dk]."""
  positions = jnp.arange(axis_size)
  spans = ((positions[None, None, :] > positions[None, :, None]) &
           (positions[None, None, :] <= positions[:, None, None])).astype(jnp.float32)  # [t, s, u]
  return jnp.einsum('tsu,...ud->...tsd', spans, g, precision=PRECISION)


def _masked_exp(mask, exponent):
  """exp(exponent) where mask, else 0; the exponent is never evaluated where masked out."""
  return jnp.where(mask, jnp.exp(jnp.where(mask, exponent, 0.0)), 0.0)


# ----------------------------------------------------------------------------------------
# naive: the oracle


def naive(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None):
  """(o [B,T,H,Dv] q.dtype, final state [B,H,Dk,Dv] f32), via the [T, T, Dk] decay matrix."""
  scale = default_scale(q) if scale is None else scale
  b, t = q.shape[:2]
  runs = segment_runs(segment_ids, b, t)
  qh, kh, vh = (_heads_major(x) for x in (q, k, v))
  gh = log_decay(g).transpose(0, 2, 1, 3)
  state0 = _zero_state(q, v, initial_state)
  decay = jnp.cumsum(gh, axis=2)  # [B, H, T, Dk], log decay since the row start
  positions = jnp.arange(t)
  visible = (positions[None, :, None] >= positions[None, None, :]) & (runs[:, :, None] == runs[:, None, :])
  visible = visible[:, None, :, :, None]  # [B, 1, T, T, 1]
  pair_decay = _masked_exp(visible, _span_sums(gh, t))
  scores = jnp.einsum('bhtd,bhsd,bhtsd->bhts', qh, kh, pair_decay, precision=PRECISION)
  in_first_run = (runs == 0)[:, None, :, None]
  q_from_state = jnp.where(in_first_run, qh * jnp.exp(decay), 0.0)
  o = jnp.einsum('bhts,bhsv->bhtv', scores, vh, precision=PRECISION)
  o = o + jnp.einsum('bhtd,bhdv->bhtv', q_from_state, state0, precision=PRECISION)
  in_last_run = (runs == runs[:, -1:])[:, None, :, None]
  k_to_end = _masked_exp(in_last_run, _suffix_sums(gh, axis=2))
  final = jnp.einsum('bhsd,bhsv->bhdv', kh * k_to_end, vh, precision=PRECISION)
  one_segment = (runs[:, -1] == 0)[:, None, None, None]
  final = final + jnp.where(one_segment, jnp.exp(decay[:, :, -1, :])[..., None] * state0, 0.0)
  return (scale * o).transpose(0, 2, 1, 3).astype(q.dtype), final


# ----------------------------------------------------------------------------------------
# recurrent: one token at a time


def recurrent(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None):
  """(o, final state) by lax.scan over tokens; memory O(B H Dk Dv) besides inputs/outputs."""
  scale = default_scale(q) if scale is None else scale
  b, t = q.shape[:2]
  runs = segment_runs(segment_ids, b, t)
  resets = jnp.concatenate([jnp.zeros((b, 1), bool), runs[:, 1:] != runs[:, :-1]], axis=1)
  time_major = [x.astype(jnp.float32).transpose(1, 0, 2, 3) for x in (q, k, v, log_decay(g))]

  def step(state, inputs):
    q_t, k_t, v_t, g_t, reset_t = inputs
    state = jnp.where(reset_t[:, None, None, None], 0.0, state)
    state = jnp.exp(g_t)[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
    o_t = jnp.einsum('bhd,bhdv->bhv', q_t, state, precision=PRECISION)
    return state, o_t

  final, o = lax.scan(step, _zero_state(q, v, initial_state), (*time_major, resets.T))
  return (scale * o).transpose(1, 0, 2, 3).astype(q.dtype), final


# ----------------------------------------------------------------------------------------
# chunked


def _chunks(x, chunk):
  """[B, T, H, D] -> [B, H, N, chunk, D] float32, zero-padded: padded tokens have k = v = g = 0,
  an identity transition, so the state at the padded end is the state after the last token."""
  b, t, h, d = x.shape
  n = -(-t // chunk)
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, n * chunk - t), (0, 0), (0, 0)))
  return x.reshape(b, n, chunk, h, d).transpose(0, 3, 1, 2, 4)


def _run_chunks(runs, chunk):
  """[B, T] -> [B, N, chunk], padded tokens continuing the last segment."""
  b, t = runs.shape
  n = -(-t // chunk)
  return jnp.pad(runs, ((0, 0), (0, n * chunk - t)), mode='edge').reshape(b, n, chunk)


def _intra_chunk_scores(q, k, g, visible, sub_chunk):
  """[B, H, N, C, C] decayed scores q_t . (exp(sum of g over s < u <= t) * k_s) of visible pairs.

  Pairwise decays ([c, c, Dk] tensors) only inside each sub-chunk of `sub_chunk` tokens;
  across sub-chunks the decay splits at the query sub-chunk's start: the query's part
  (from that start to t) scales q, the key's part (from s to that start) scales k, so two
  ordinary matmuls suffice."""
  *lead, c, dk = q.shape
  m = c // sub_chunk
  g_sub = g.reshape(*lead, m, sub_chunk, dk)
  q_rel = q * jnp.exp(jnp.cumsum(g_sub, axis=-2).reshape(q.shape))
  positions = jnp.arange(c)
  sub_starts = jnp.arange(m) * sub_chunk
  gaps = ((positions[None, None, :] > positions[None, :, None]) &
          (positions[None, None, :] < sub_starts[:, None, None])).astype(jnp.float32)  # [i, s, u]
  key_before = (positions[None, :] < sub_starts[:, None])[:, :, None]  # [i, s, 1]
  k_rel = k[..., None, :, :] * _masked_exp(key_before, jnp.einsum('isu,...ud->...isd', gaps, g,
                                                                  precision=PRECISION))
  across = jnp.einsum('...icd,...isd->...ics', q_rel.reshape(*lead, m, sub_chunk, dk), k_rel,
                      precision=PRECISION).reshape(*lead, c, c)
  causal = (jnp.arange(sub_chunk)[:, None] >= jnp.arange(sub_chunk)[None, :])[:, :, None]
  pair_decay = _masked_exp(causal, _span_sums(g_sub, sub_chunk))
  within = jnp.einsum('...itd,...isd,...itsd->...its', q.reshape(*lead, m, sub_chunk, dk),
                      k.reshape(*lead, m, sub_chunk, dk), pair_decay, precision=PRECISION)
  within = jnp.einsum('...its,ij->...itjs', within, jnp.eye(m, dtype=within.dtype)).reshape(*lead, c, c)
  return jnp.where(visible, across + within, 0.0)


def chunked(q, k, v, g, *, scale=None, initial_state=None, segment_ids=None, chunk=CHUNK, sub_chunk=SUB_CHUNK):
  """(o, final state) in chunks of `chunk` tokens; memory O(T chunk) besides the per-chunk states."""
  scale = default_scale(q) if scale is None else scale
  if chunk % sub_chunk:
    raise ValueError(f'chunk {chunk} must be a multiple of sub_chunk {sub_chunk}')
  b, t = q.shape[:2]
  runs = _run_chunks(segment_runs(segment_ids, b, t), chunk)  # [B, N, C]
  qc, kc, vc, gc = (_chunks(x, chunk) for x in (q, k, v, log_decay(g)))
  decay = jnp.cumsum(gc, axis=3)  # [B, H, N, C, Dk], log decay since the chunk start
  run_before = jnp.concatenate([runs[:, :1, 0], runs[:, :-1, -1]], axis=1)  # run entering each chunk
  continues = (runs == run_before[:, :, None])[:, None, :, :, None]  # [B, 1, N, C, 1]
  positions = jnp.arange(chunk)
  visible = (positions[:, None] >= positions[None, :]) & (runs[..., :, None] == runs[..., None, :])
  scores = _intra_chunk_scores(qc, kc, gc, visible[:, None], sub_chunk)
  o_intra = jnp.einsum('bhnts,bhnsv->bhntv', scores, vc, precision=PRECISION)
  # What each chunk adds to the state, and how it decays the state it receives.
  in_last_run = (runs == runs[..., -1:])[:, None, :, :, None]
  k_to_end = kc * _masked_exp(in_last_run, _suffix_sums(gc, axis=3))
  chunk_update = jnp.einsum('bhnsd,bhnsv->bhndv', k_to_end, vc, precision=PRECISION)
  chunk_decay = jnp.where(continues[..., -1, :], jnp.exp(decay[..., -1, :]), 0.0)  # [B, H, N, Dk]

  def carry_state(state, inputs):
    update, decay_n = inputs
    return decay_n[..., None] * state + update, state

  final, entering = lax.scan(carry_state, _zero_state(q, v, initial_state),
                             (jnp.moveaxis(chunk_update, 2, 0), jnp.moveaxis(chunk_decay, 2, 0)))
  q_from_state = jnp.where(continues, qc * jnp.exp(decay), 0.0)
  o_inter = jnp.einsum('bhntd,nbhdv->bhntv', q_from_state, entering, precision=PRECISION)
  o = scale * (o_intra + o_inter)
  o = o.transpose(0, 2, 3, 1, 4).reshape(b, -1, q.shape[2], v.shape[3])[:, :t]
  return o.astype(q.dtype), final


# ----------------------------------------------------------------------------------------
# Implementation records (see api.py): forward(q, k, v, g, initial_state, segment_ids, scale)
# -> (o, final_state); backward(..., o, final_state, d_o, d_final_state) -> (dq, dk, dv, dg,
# d_initial_state or None).


def _forward_with(version):
  def forward(q, k, v, g, initial_state, segment_ids, scale):
    return version(q, k, v, g, scale=scale, initial_state=initial_state, segment_ids=segment_ids)
  return forward


def _backward_through(version):
  def backward(q, k, v, g, initial_state, segment_ids, scale, o, final_state, d_o, d_final_state):
    del o, final_state
    forward = functools.partial(version, scale=scale, segment_ids=segment_ids)
    _, pullback = jax.vjp(lambda q, k, v, g, s0: forward(q, k, v, g, initial_state=s0), q, k, v, g, initial_state)
    return pullback((d_o.astype(q.dtype), d_final_state.astype(jnp.float32)))
  return backward


chunked_backward = _backward_through(chunked)  # kernels without a backward of their own use this

IMPLEMENTATIONS = (
    Implementation('reference', _forward_with(chunked), chunked_backward),
    Implementation('reference_recurrent', _forward_with(recurrent), _backward_through(recurrent)),
)
