"""A dilated causal neighborhood (patterns.Neighborhood(..., dilation d, causal=True)) as d
undilated ones (DiNAT; NATTEN computes it so): row index p is in group p % d at place
p // d, and a query sees the keys of its group at most K - 1 places before its own. With
the groups gathered one after the other (group_major) that is a sliding window of K over
the new order, groups and documents kept apart by one segment id per (group, document):
tiles hold only keys in use, where over the row the dilated window touches every tile of a
d-times-wider band.

    plan = grouped_plan(kernel, dilation, length=T, block=128, segment_ids=ids)
    out = grouped_attention(lambda q, k, v: block_sparse_attention(q, k, v, plan), q, k, v, dilation)
"""

import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.plan import plan_from_mask


def group_major(x, dilation):
  """[B, T, ...] -> [B, Tp, ...], Tp = T rounded up to the dilation (zeros after T): token p
  of the row moves to (p % d) * (Tp // d) + p // d, so each dilation group is contiguous and
  in order. Padding comes after every real token of its group, so causality hides it."""
  b, t = x.shape[:2]
  padded = -(-t // dilation) * dilation
  x = jnp.pad(x, [(0, 0), (0, padded - t)] + [(0, 0)] * (x.ndim - 2))
  return x.reshape(b, padded // dilation, dilation, *x.shape[2:]).swapaxes(1, 2).reshape(x.shape)


def row_major(x, dilation, length):
  """group_major's inverse, cut back to `length` tokens."""
  b, padded = x.shape[:2]
  x = x.reshape(b, dilation, padded // dilation, *x.shape[2:]).swapaxes(1, 2).reshape(x.shape)
  return x[:, :length]


def group_segment_ids(segment_ids, batch, length, dilation):
  """[B, Tp] int32 in group-major order: one id per (dilation group, document), increasing
  along the row where the documents' ids do, so tiles of different groups are skipped."""
  rows = jnp.arange(length, dtype=jnp.int32)[None, :] % dilation
  groups = group_major(jnp.broadcast_to(rows, (batch, length)), dilation)
  if segment_ids is None:
    return groups
  documents = group_major(segment_ids.astype(jnp.int32), dilation)
  return groups * (jnp.max(documents) + 1) + documents


def grouped_plan(kernel, dilation, *, length, block, segment_ids=None, batch=1):
  """The plan over the group-major layout of a row of `length` tokens (documents from
  segment_ids [B, T], else `batch` rows of one document)."""
  batch = batch if segment_ids is None else segment_ids.shape[0]
  padded = -(-length // dilation) * dilation
  return plan_from_mask(masks.causal_window(kernel), q_len=padded, block_q=block, block_kv=block,
                        segment_ids=group_segment_ids(segment_ids, batch, length, dilation))


def grouped_attention(attend, q, k, v, dilation):
  """attend(q, k, v) over the group-major layout, its output back in row order."""
  return row_major(attend(*(group_major(x, dilation) for x in (q, k, v))), dilation, q.shape[1])
