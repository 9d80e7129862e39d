"""The router of sparse state expansion (sse.py): top-k partitions per token, the balance
loss and load statistics, and the packing of each partition's tokens for the varlen mode.

Everything here is elementwise per token or an XLA sort: no dynamic shapes.
"""

import dataclasses

import jax
import jax.numpy as jnp


def top_k_mask(probs, k):
  """bool [..., N]: the k largest of probs [..., N], ties to the lower index.

  A partition's rank is the number of partitions that beat it (larger, or equal and
  earlier); it is chosen when its rank is below k. Counting instead of sorting makes the
  tie rule explicit and the same on every platform, so forward and backward see one mask."""
  n = probs.shape[-1]
  index = jnp.arange(n)
  other, this = probs[..., None, :], probs[..., :, None]  # [..., i, j]: compare j against i
  beats = (other > this) | ((other == this) & (index[None, :] < index[:, None]))
  return jnp.sum(beats, axis=-1) < k


def chosen_partitions(mask, k):
  """int32 [..., k]: the indices of the k True entries of mask [..., N], increasing."""
  return jnp.argsort(jnp.where(mask, 0, 1), axis=-1, stable=True)[..., :k].astype(jnp.int32)


def balance_terms(probs, mask, weights):
  """(P, f) [N]: the mean router probability and the fraction of tokens writing to each
  partition, over the tokens of weights [B, T] (padding left out)."""
  total = jnp.maximum(weights.sum(), 1.0)
  mean_probs = jnp.einsum('bt,btn->n', weights, probs) / total
  write_fraction = jnp.einsum('bt,btn->n', weights, mask.astype(jnp.float32)) / total
  return mean_probs, write_fraction


def balance_loss(probs, mask, weights, k):
  """(N / k) * sum_i P_i f_i: 1 for a uniform router, larger as it collapses. The
  gradient reaches the router through P only (f counts a discrete choice)."""
  mean_probs, write_fraction = balance_terms(probs, mask, weights)
  return probs.shape[-1] / k * jnp.sum(mean_probs * write_fraction)


def document_runs(segment_ids, batch, length):
  """[B, T] int32: 0 in the row's first document, +1 at every id change (the kernel's
  reset rule: a segment is a run of equal ids)."""
  if segment_ids is None:
    return jnp.zeros((batch, length), jnp.int32)
  changes = (segment_ids[:, 1:] != segment_ids[:, :-1]).astype(jnp.int32)
  return jnp.concatenate([jnp.zeros((batch, 1), jnp.int32), jnp.cumsum(changes, axis=1)], axis=1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Packing:
  """Where each (token, chosen partition) pair goes in a row sorted by (partition, position).

  A pair is numbered t * k + j (token t, its j-th chosen partition); packed slot s holds
  pair order[s]. All arrays are [B, T * k] int32."""
  token: jax.Array  # the token of each packed slot
  partition: jax.Array  # its partition
  pair: jax.Array  # order: the pair each slot holds
  slot: jax.Array  # inverse: the slot of each pair
  segment_ids: jax.Array  # increasing ids, a new one at every (partition, document) change


def pack_by_partition(chosen, runs):
  """Packing of chosen [B, T, k] (distinct partitions per token) and document runs [B, T].

  The sort key partition * T + t is unique, so the order is total; inside a partition the
  tokens keep their order, so its state evolves exactly as in the whole row where the
  tokens routed elsewhere are identity transitions."""
  b, t, k = chosen.shape
  keys = (chosen * t + jnp.arange(t, dtype=jnp.int32)[None, :, None]).reshape(b, t * k)
  order = jnp.argsort(keys, axis=1).astype(jnp.int32)
  token = order // k
  partition = jnp.take_along_axis(chosen.reshape(b, t * k), order, axis=1)
  token_runs = jnp.take_along_axis(runs, token, axis=1)
  starts = (partition[:, 1:] != partition[:, :-1]) | (token_runs[:, 1:] != token_runs[:, :-1])
  segment_ids = jnp.cumsum(jnp.concatenate([jnp.ones((b, 1), jnp.int32), starts.astype(jnp.int32)], axis=1), axis=1)
  return Packing(token, partition, order, jnp.argsort(order, axis=1).astype(jnp.int32), segment_ids)


def gather_tokens(x, token):
  """x [B, T, ...] at the tokens of packed slots token [B, S] -> [B, S, ...]."""
  index = token.reshape(token.shape + (1,) * (x.ndim - 2))
  return jnp.take_along_axis(x, index, axis=1)
