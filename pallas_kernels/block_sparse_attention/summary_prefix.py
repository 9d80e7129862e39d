"""Sparse Transformer's fixed pattern (patterns.Fixed & Causal) with its summary keys gathered
in front of the keys, so that the kernel visits the tiles it uses.

Over the row the pattern's summary columns (the last c of every chunk of l tokens) put a
few allowed elements in every tile below the diagonal, and the plan visits them all. The
same attention, exactly, over a key axis of P + T positions:

    keys [0, P)      the summary positions of every chunk, chunk after chunk (c slots a
                     chunk, P = c * ceil(T / l) rounded up to `align`; slots past the row
                     are never allowed): query i sees slot m iff m // c < i // l, the
                     summaries of the chunks before its own;
    keys [P, P + T)  the row itself: query i sees key j = k - P iff j // l == i // l and
                     j <= i, its own chunk up to itself (the own chunk's summary tokens
                     among them).

The two parts are disjoint and their union is Fixed(l, c) & Causal(). summary_positions
gives the row index of each slot (for gathering k, v and segment ids); SummaryPrefix is the
mask over (query, key axis) with an exact block_kind, the two parts' answers folded for a
tile that spans both.

    slots, plan = gathered_plan(stride, summary, length=T, block=128, segment_ids=ids)
    out = block_sparse_attention(q, with_summary_keys(k, slots), with_summary_keys(v, slots), plan)
"""

import dataclasses

import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.masks import _kind
from pallas_kernels.block_sparse_attention.plan import plan_from_mask


def prefix_length(length, stride, summary, align=1):
  """P: summary slots for a row of `length` tokens, rounded up to `align`."""
  slots = summary * -(-length // stride)
  return -(-slots // align) * align


def summary_positions(length, stride, summary, align=1):
  """int32 [P]: the row index of each summary slot (slot m: chunk m // c, position
  l - c + m % c in it), clamped into the row (slots past it are never allowed)."""
  slot = jnp.arange(prefix_length(length, stride, summary, align), dtype=jnp.int32)
  position = (slot // summary) * stride + stride - summary + slot % summary
  return jnp.minimum(position, length - 1)


@dataclasses.dataclass(frozen=True)
class SummaryPrefix(masks.Mask):
  """Fixed(stride, summary) & Causal() over keys = [P summary slots; the row] (module doc)."""
  stride: int
  summary: int
  prefix: int

  def __post_init__(self):
    if self.stride < 1 or not 1 <= self.summary <= self.stride or self.prefix < 0:
      raise ValueError(f'SummaryPrefix needs stride >= 1, 1 <= summary <= stride and prefix >= 0, '
                       f'got {self.stride}, {self.summary}, {self.prefix}')

  def _own_chunk(self):
    return masks.Chunked(self.stride) & masks.Causal()

  def elements(self, q_index, k_index):
    in_prefix = k_index < self.prefix
    earlier_summary = (k_index // self.summary) < (q_index // self.stride)
    own_chunk = self._own_chunk().elements(q_index, k_index - self.prefix)
    return jnp.where(in_prefix, earlier_summary, own_chunk)

  def block_kind(self, q0, q1, k0, k1):
    p = self.prefix
    # The prefix part [k0, min(k1, P)): slot m allowed iff m // c < q // l, monotone in both.
    a, b = k0, jnp.minimum(k1, p)
    has_prefix = a < b
    prefix_any = has_prefix & (a // self.summary < (q1 - 1) // self.stride)
    prefix_all = ~has_prefix | ((b - 1) // self.summary < q0 // self.stride)
    # The row part [max(k0, P), k1), in row indices.
    c, d = jnp.maximum(k0, p) - p, k1 - p
    has_row = c < d
    row_kind = self._own_chunk().block_kind(q0, q1, c, jnp.maximum(d, c + 1))
    row_any = has_row & (row_kind != masks.EMPTY)
    row_all = ~has_row | (row_kind == masks.FULL)
    return _kind(prefix_all & row_all, prefix_any | row_any)


def with_summary_keys(x, slots):
  """[B, T, ...] keys, values or segment ids -> [B, P + T, ...]: the summary slots, then the row."""
  return jnp.concatenate([x[:, slots], x], axis=1)


def gathered_plan(stride, summary, *, length, block, segment_ids=None):
  """(slots, plan): the summary slots' row indices (aligned to the block) and the plan over
  [slots; the row], documents from segment_ids [B, T] when given."""
  slots = summary_positions(length, stride, summary, align=block)
  segments = {} if segment_ids is None else dict(q_segment_ids=segment_ids,
                                                 kv_segment_ids=with_summary_keys(segment_ids, slots))
  plan = plan_from_mask(SummaryPrefix(stride, summary, slots.shape[0]), q_len=length, kv_len=slots.shape[0] + length,
                        block_q=block, block_kv=block, **segments)
  return slots, plan
