"""Gated linear attention over a sequence sharded across devices: state passing.

Shard s of N holds rows [s * T/N, (s + 1) * T/N) of every sequence. Each device

  1. runs the kernel on its shard from a zero state: outputs o0 and its final state L_s;
  2. forms its transition: the state leaving the shard is A_s * C_s + L_s, with C_s the
     state entering it and A_s = exp(sum of the shard's log decays) per key channel if
     the whole shard is one segment (no document starts inside it), else 0 (a reset cuts
     the entering state off);
  3. all-gathers the (A, L) pairs of every shard and combines them in shard order:
     C_0 = 0, C_{s+1} = A_s * C_s' + L_s, where C_s' = C_s if the shard's first token
     continues the previous shard's document (equal segment ids), else 0;
  4. adds what its entering state C_s' contributes to the outputs of its first segment
     (the tokens before its first document start): scale * (exp(G_t) * q_t)^T C_s', with
     G_t the sum of the log decays from the shard's start to t inclusive.

That is the recurrence S_t = diag(exp(g_t)) S_{t-1} + k_t v_t^T split at the shard
boundaries: exact, with no second kernel call. The gathered states are N x [B, H, Dk, Dv]
float32 per device, and the combine is N small steps: fine for the shard counts of a
mesh (a ring of permutes would move 1 / N of that, sequentially). Gradients flow through
the gather (its transpose is a reduce-scatter) and the correction.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.linear_attention import gated_linear_attention
from pallas_kernels.linear_attention.reference import LOG_DECAY_FLOOR, PRECISION, segment_runs


def first_segment(segment_ids, batch, length):
  """bool [B, T]: the tokens of the shard's first segment (all of them without ids)."""
  return segment_runs(segment_ids, batch, length) == 0


def continues_previous(segment_ids, axes, batch):
  """bool [B]: whether the shard's first token is in the document the previous shard's
  last token is in (False on shard 0, whose entering state is zero anyway)."""
  if segment_ids is None:
    return jnp.ones((batch,), bool)
  last_ids = jax.lax.all_gather(segment_ids[:, -1], axes, axis=0)  # [N, B]
  previous = jax.lax.axis_index(axes) - 1
  return (jax.lax.axis_index(axes) > 0) & (jnp.take(last_ids, jnp.maximum(previous, 0), axis=0) == segment_ids[:, 0])


def entering_state(decay, local_state, continues, axes, shards):
  """C_s' [B, H, Dk, Dv] float32 of this device's shard from every shard's transition
  (decay [B, H, Dk], local final state [B, H, Dk, Dv], continues [B])."""
  decays = jax.lax.all_gather(decay, axes, axis=0)
  states = jax.lax.all_gather(local_state, axes, axis=0)
  continues = jax.lax.all_gather(continues, axes, axis=0)
  carried = jnp.zeros_like(local_state)
  entering = []
  for shard in range(shards):
    entered = jnp.where(continues[shard][:, None, None, None], carried, 0.0)
    entering.append(entered)
    carried = decays[shard][..., None] * entered + states[shard]
  return jnp.take(jnp.stack(entering), jax.lax.axis_index(axes), axis=0)


def linear_attention_across_shards(q, k, v, g, segment_ids, *, scale, axes, shards):
  """The per-device body: q, k, g [B, Tl, H, Dk], v [B, Tl, H, Dv], segment_ids [B, Tl]
  or None -> o [B, Tl, H, Dv] in q.dtype, as the kernel over the whole sequence gives."""
  o, local_state = gated_linear_attention(q, k, v, g, scale=scale, segment_ids=segment_ids, return_final_state=True)
  if shards == 1:
    return o
  b, t = q.shape[:2]
  in_first = first_segment(segment_ids, b, t)
  cumulative = jnp.cumsum(jnp.maximum(g.astype(jnp.float32), LOG_DECAY_FLOOR), axis=1)  # G_t [B, Tl, H, Dk]
  one_segment = in_first[:, -1][:, None, None]
  decay = jnp.where(one_segment, jnp.exp(cumulative[:, -1]), 0.0)
  entering = entering_state(decay, local_state, continues_previous(segment_ids, axes, b), axes, shards)
  decayed_q = jnp.where(in_first[..., None, None], jnp.exp(cumulative) * q.astype(jnp.float32), 0.0)
  correction = scale * jnp.einsum('bthk,bhkv->bthv', decayed_q, entering, precision=PRECISION)
  return (o.astype(jnp.float32) + correction).astype(o.dtype)
