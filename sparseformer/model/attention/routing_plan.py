"""Attention within clusters through the block-sparse kernels: gather each routing head's
tokens into cluster order, attend with a plan that keeps clusters (and documents) apart
and causal by ORIGINAL position, scatter back. No T x T mask, no per-token loop.

A routing head's gathered sequence is a list of slots, each a token's original index,
with a segment key cluster * span + document (span = largest document id + 1). Slots are
ordered by (segment key, original index), so each (cluster, document) is one contiguous
run and, inside a run, slot order is original order. Heads are folded into the batch:
the kernels see [B * Hr, L, 1, d] with segment ids [B * Hr, L].

  causal (default)  every token once, in the cluster of its own vector (L = T).
  balanced_topw     the paper's routing: each cluster takes the w tokens of the row most
                    similar to its centroid (L = K w); a token may sit in 0, 1 or more
                    clusters, and its output is the mean over them (0 when in none). The
                    choice looks at the whole row, future tokens included: which past
                    keys a query sees, and whether it is routed at all, leak information
                    about the future (values never do).

Visibility inside a run:
  shared QK   queries and keys share slots, so causal in slot order is causal in original
              order; the self pair is masked (a strictly causal plan) except for the
              first slot of a run, whose only key is itself: its output is its value.
  separate    queries and keys have their own slots; the plan's rank rule
              (key_rank = -key index >= q_threshold = -query index) keeps keys at or
              before the query. A query with no such key in its run gets 0.
"""

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import block_sparse_attention, masks, plan_from_mask
from pallas_kernels.block_sparse_attention.masks import EMPTY, FULL, PARTIAL
from pallas_kernels.block_sparse_attention.plan import (from_kinds, mask_block_kinds, num_blocks,
                                                        segment_block_kinds)

SELECTIONS = ('causal', 'balanced_topw')


@dataclasses.dataclass(frozen=True)
class StrictlyCausal(masks.Mask):
  """Keys strictly before the query (slot order)."""

  def elements(self, q_index, k_index):
    return k_index < q_index

  def block_kind(self, q0, q1, k0, k1):
    return jnp.where(k1 - 1 < q0, FULL, jnp.where(k0 < q1 - 1, PARTIAL, EMPTY))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Slots:
  """One side (queries or keys) of every routing head's gathered sequence."""
  index: jax.Array  # [B, Hr, L] int32: original token index of each slot
  segment: jax.Array  # [B, Hr, L] int32: cluster * span + document, non-decreasing along L


def documents(segment_ids, batch, length):
  """[B, T] int32 document ids (zeros when the rows are single documents)."""
  if segment_ids is None:
    return jnp.zeros((batch, length), jnp.int32)
  return segment_ids.astype(jnp.int32)


def segment_keys(clusters, docs):
  """cluster * span + document [B, T, Hr] for clusters [B, T, Hr] and docs [B, T]."""
  span = jnp.max(docs) + 1
  return clusters * span + docs[:, :, None]


def ordered_slots(index, keys):
  """Slots of token indices [B, Hr, L] with segment keys [B, Hr, T], stably sorted by key
  (index order within a key when `index` is ascending per key)."""
  segment = jnp.take_along_axis(keys, index, axis=-1)
  order = jnp.argsort(segment, axis=-1, stable=True)
  return Slots(jnp.take_along_axis(index, order, -1), jnp.take_along_axis(segment, order, -1))


def causal_slots(clusters, docs):
  """Each token once, in its own cluster: clusters [B, T, Hr] -> Slots with L = T."""
  keys = jnp.moveaxis(segment_keys(clusters, docs), 1, 2)  # [B, Hr, T]
  tokens = jnp.broadcast_to(jnp.arange(keys.shape[-1], dtype=jnp.int32), keys.shape)
  return ordered_slots(tokens, keys)


def topw_slots(scores, docs, window):
  """The paper's balanced routing: per cluster the `window` tokens of largest score
  [B, T, Hr, K]; Slots with L = K * window."""
  b, t, hr, k = scores.shape
  window = min(window, t)
  top = jax.lax.top_k(jnp.moveaxis(scores, 1, 3), window)[1]  # [B, Hr, K, w]
  top = jnp.sort(top, axis=-1).astype(jnp.int32)
  cluster = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[:, None], top.shape)
  span = jnp.max(docs) + 1
  doc = jnp.take_along_axis(jnp.broadcast_to(docs[:, None, None, :], (b, hr, k, t)), top, axis=-1)
  segment = (cluster * span + doc).reshape(b, hr, k * window)
  order = jnp.argsort(segment, axis=-1, stable=True)  # keeps index order inside a (cluster, document)
  return Slots(jnp.take_along_axis(top.reshape(b, hr, -1), order, -1), jnp.take_along_axis(segment, order, -1))


def gather(x, slots):
  """x [B, T, Hr, D] at the slots -> [B * Hr, L, 1, D]."""
  rows = jnp.take_along_axis(jnp.moveaxis(x, 2, 1), slots.index[..., None], axis=2)  # [B, Hr, L, D]
  return rows.reshape(-1, rows.shape[2], 1, rows.shape[3])


def folded(array):
  """[B, Hr, L] -> [B * Hr, L]."""
  return array.reshape(-1, array.shape[-1])


def run_starts(segment):
  """[B, Hr, L] bool: the first slot of each run of equal segment keys."""
  previous = jnp.pad(segment[..., :-1], ((0, 0), (0, 0), (1, 0)), constant_values=-1)
  return segment != previous


def shared_qk_attention(q, v, slots, block, scale):
  """Outputs [B, Hr, L, D] of the slots, keys := queries, self pair masked but for run starts."""
  b, _, hr, d = q.shape
  qg, vg = gather(q, slots), gather(v, slots)
  plan = plan_from_mask(StrictlyCausal(), q_len=qg.shape[1], block_q=block, block_kv=block,
                        segment_ids=folded(slots.segment))
  out = block_sparse_attention(qg, qg, vg, plan, scale=scale)
  out = jnp.where(run_starts(slots.segment).reshape(-1, qg.shape[1])[..., None, None], vg.astype(out.dtype), out)
  return out.reshape(b, hr, -1, d)


def blocked_range(values, block):
  """(min, max) over blocks of [N, L] -> [N, nBlocks] each (the last block padded by its edge)."""
  n, length = values.shape
  blocks = num_blocks(length, block)
  padded = jnp.pad(values, ((0, 0), (0, blocks * block - length)), mode='edge').reshape(n, blocks, block)
  return padded.min(-1), padded.max(-1)


def causal_index_kinds(q_index, k_index, block):
  """[N, nQ, nK] tile kinds of the rule key index <= query index over slots [N, L]."""
  q_lo, q_hi = blocked_range(q_index, block)
  k_lo, k_hi = blocked_range(k_index, block)
  full = k_hi[:, None, :] <= q_lo[:, :, None]
  some = k_lo[:, None, :] <= q_hi[:, :, None]
  return jnp.where(full, FULL, jnp.where(some, PARTIAL, EMPTY))


def separate_qk_plan(q_slots, k_slots, block):
  """The plan over folded slots: same segment key, key index <= query index (rank rule)."""
  q_index, k_index = folded(q_slots.index), folded(k_slots.index)
  q_segment, k_segment = folded(q_slots.segment), folded(k_slots.segment)
  length = q_index.shape[1]
  kinds = jnp.minimum(segment_block_kinds(q_segment, k_segment, block, block),
                      causal_index_kinds(q_index, k_index, block))
  kinds = jnp.minimum(kinds, mask_block_kinds(masks.Full(), length, length, block, block)[None])
  return from_kinds(kinds[:, None], masks.Full(), length, length, block, block, q_segment, k_segment,
                    q_threshold=-q_index[:, None], key_rank=-k_index[:, None])


def separate_qk_attention(q, k, v, q_slots, k_slots, block, scale):
  """Outputs [B, Hr, L, D] of the query slots over the key slots."""
  b, _, hr, d = q.shape
  plan = separate_qk_plan(q_slots, k_slots, block)
  out = block_sparse_attention(gather(q, q_slots), gather(k, k_slots), gather(v, k_slots), plan, scale=scale)
  return out.reshape(b, hr, -1, d)


def scatter_mean(out, slots, length):
  """Per-token outputs [B, T, Hr, D]: the mean of a token's slot outputs [B, Hr, L, D],
  zero for a token in no slot."""
  b, hr, _, d = out.shape
  batch, head = jnp.indices(slots.index.shape)[:2]
  total = jnp.zeros((b, hr, length, d), jnp.float32).at[batch, head, slots.index].add(out.astype(jnp.float32))
  count = jnp.zeros((b, hr, length), jnp.float32).at[batch, head, slots.index].add(1.0)
  return jnp.moveaxis(total / jnp.maximum(count, 1.0)[..., None], 1, 2).astype(out.dtype)


def unsort(out, slots):
  """Per-token outputs [B, T, Hr, D] of slots that hold every token once."""
  inverse = jnp.argsort(slots.index, axis=-1)
  return jnp.moveaxis(jnp.take_along_axis(out, inverse[..., None], axis=2), 1, 2)


def cluster_attention(q, k, v, q_clusters, k_clusters, segment_ids, *, block, scale, shared_qk):
  """The causal variant: q [B, T, Hr, D], keys k and values v [B, T, Hr, D] (per routing
  head), clusters [B, T, Hr] -> outputs [B, T, Hr, D]. With shared_qk, k is ignored
  (keys are the queries) and k_clusters must be q_clusters."""
  docs = documents(segment_ids, q.shape[0], q.shape[1])
  q_slots = causal_slots(q_clusters, docs)
  if shared_qk:
    return unsort(shared_qk_attention(q, v, q_slots, block, scale), q_slots)
  k_slots = causal_slots(k_clusters, docs)
  return unsort(separate_qk_attention(q, k, v, q_slots, k_slots, block, scale), q_slots)


def topw_attention(q, k, v, q_scores, k_scores, segment_ids, *, window, block, scale, shared_qk):
  """The balanced top-w variant from similarity scores [B, T, Hr, K]; outputs [B, T, Hr, D]."""
  docs = documents(segment_ids, q.shape[0], q.shape[1])
  q_slots = topw_slots(q_scores, docs, window)
  if shared_qk:
    out = shared_qk_attention(q, v, q_slots, block, scale)
  else:
    out = separate_qk_attention(q, k, v, q_slots, topw_slots(k_scores, docs, window), block, scale)
  return scatter_mean(out, q_slots, q.shape[1])


# ---------------------------------------------------------------------------------------
# Decoding (the causal variant)


def decode_visible(query_cluster, key_clusters, length, shared_qk):
  """bool [B, Hr, L]: the cached keys the newest query (position length - 1, its own key
  already written there) sees: those of its cluster among the first `length` entries of
  key_clusters [B, Hr, L]; with shared QK the self pair only when it is the only one."""
  index = jnp.arange(key_clusters.shape[-1])
  same = (key_clusters == query_cluster[..., None]) & (index < length)
  if not shared_qk:
    return same
  others = same & (index < length - 1)
  alone = ~others.any(-1, keepdims=True)
  return others | (alone & (index == length - 1))
