"""Mask functions over (query index, key index), known at trace time.

Each mask answers two questions with the same rule: element by element (inside a
kernel's partial block, from iotas) and block by block (is a [q0, q1) x [k0, k1) tile
empty, partial or full?). Block answers are exact for each primitive and conservative
for combinations: a tile called partial may turn out empty, never the reverse.

Masks combine with `&` and `|`. Documents (segment ids) are data, not masks: the plan
applies them on top (see plan.py).
"""

import dataclasses
import functools

import jax.numpy as jnp

EMPTY, PARTIAL, FULL = 0, 1, 2


class Mask:

  def __and__(self, other):
    return And((self, other))

  def __or__(self, other):
    return Or((self, other))

  def elements(self, q_index, k_index):
    """Bool array, broadcast of the two int arrays."""
    raise NotImplementedError

  def block_kind(self, q0, q1, k0, k1):
    """EMPTY / PARTIAL / FULL for the tile [q0, q1) x [k0, k1) (int arrays, broadcast)."""
    raise NotImplementedError

  def key_span(self):
    """The most keys one query can see, or None when that grows with the length. Kernels
    use it to pick a schedule for short rows (a static bound: documents only shrink it)."""
    return None

  def shift_invariant(self):
    """True when the rule depends only on q - k (elements(q + s, k + s) == elements(q, k)
    for every s): then positions in the packed row and within a document give one mask."""
    return False


def _kind(all_true, any_true):
  return jnp.where(all_true, FULL, jnp.where(any_true, PARTIAL, EMPTY))


@dataclasses.dataclass(frozen=True)
class Full(Mask):
  """Every key (bidirectional attention)."""

  def elements(self, q_index, k_index):
    return jnp.ones(jnp.broadcast_shapes(jnp.shape(q_index), jnp.shape(k_index)), bool)

  def block_kind(self, q0, q1, k0, k1):
    return jnp.full(jnp.broadcast_shapes(*map(jnp.shape, (q0, q1, k0, k1))), FULL)

  def shift_invariant(self):
    return True


@dataclasses.dataclass(frozen=True)
class Causal(Mask):
  """Keys at or before the query."""

  def elements(self, q_index, k_index):
    return k_index <= q_index

  def block_kind(self, q0, q1, k0, k1):
    return _kind(k1 - 1 <= q0, k0 <= q1 - 1)

  def shift_invariant(self):
    return True


@dataclasses.dataclass(frozen=True)
class SlidingWindow(Mask):
  """Keys at most `left` before and `right` after the query (the query itself included):
  q - left <= k <= q + right. A causal window of w tokens is SlidingWindow(w - 1) & Causal()."""
  left: int
  right: int = 0

  def elements(self, q_index, k_index):
    return (k_index >= q_index - self.left) & (k_index <= q_index + self.right)

  def key_span(self):
    return self.left + self.right + 1

  def shift_invariant(self):
    return True

  def block_kind(self, q0, q1, k0, k1):
    lo_all, hi_all = (q1 - 1) - self.left, q0 + self.right  # bounds every query of the tile allows
    lo_any, hi_any = q0 - self.left, (q1 - 1) + self.right  # bounds some query allows
    return _kind((k0 >= lo_all) & (k1 - 1 <= hi_all), (k1 - 1 >= lo_any) & (k0 <= hi_any))


@dataclasses.dataclass(frozen=True)
class Chunked(Mask):
  """Block-local attention: query and key in the same chunk of `size` tokens."""
  size: int

  def elements(self, q_index, k_index):
    return q_index // self.size == k_index // self.size

  def key_span(self):
    return self.size

  def block_kind(self, q0, q1, k0, k1):
    c = self.size
    same_single_chunk = (q0 // c == (q1 - 1) // c) & (k0 // c == (k1 - 1) // c) & (q0 // c == k0 // c)
    overlap = ((q1 - 1) // c >= k0 // c) & ((k1 - 1) // c >= q0 // c)
    return _kind(same_single_chunk, overlap)


@dataclasses.dataclass(frozen=True)
class GlobalPrefix(Mask):
  """The first `count` keys, seen by every query (attention sinks / global tokens)."""
  count: int

  def elements(self, q_index, k_index):
    return k_index < self.count

  def key_span(self):
    return self.count

  def block_kind(self, q0, q1, k0, k1):
    return _kind(k1 <= self.count, k0 < self.count) + 0 * q0


@dataclasses.dataclass(frozen=True)
class CompressedCausal(Mask):
  """Queries over compressed keys (NSA's compression branch): key k summarises the tokens
  [k stride, k stride + length) and is visible once they are all at or before the query,
  k stride + length - 1 <= q."""
  length: int
  stride: int

  def elements(self, q_index, k_index):
    return k_index * self.stride + self.length - 1 <= q_index

  def block_kind(self, q0, q1, k0, k1):
    last_complete = lambda k: k * self.stride + self.length - 1
    return _kind(last_complete(k1 - 1) <= q0, last_complete(k0) <= q1 - 1)


@dataclasses.dataclass(frozen=True)
class _Combination(Mask):
  """Parts folded element by element with `combine` and tile by tile with `fold_kinds`."""
  parts: tuple

  def elements(self, q_index, k_index):
    return functools.reduce(self.combine, (part.elements(q_index, k_index) for part in self.parts))

  def block_kind(self, q0, q1, k0, k1):
    return functools.reduce(self.fold_kinds, (part.block_kind(q0, q1, k0, k1) for part in self.parts))

  def shift_invariant(self):
    return all(part.shift_invariant() for part in self.parts)


class And(_Combination):
  combine = staticmethod(jnp.logical_and)
  fold_kinds = staticmethod(jnp.minimum)  # EMPTY < PARTIAL < FULL: the tile is as full as its emptiest part

  def key_span(self):
    spans = [span for span in (part.key_span() for part in self.parts) if span is not None]
    return min(spans) if spans else None


class Or(_Combination):
  combine = staticmethod(jnp.logical_or)
  fold_kinds = staticmethod(jnp.maximum)  # the tile is as full as its fullest part

  def key_span(self):
    spans = [part.key_span() for part in self.parts]
    return None if None in spans else sum(spans)


def shift_invariant_part(mask):
  """A shift-invariant mask that allows every element `mask` allows (the invariant parts
  of an And), or None when there is none."""
  if mask.shift_invariant():
    return mask
  parts = [part for part in mask.parts if part.shift_invariant()] if isinstance(mask, And) else []
  return None if not parts else parts[0] if len(parts) == 1 else And(tuple(parts))


def causal_window(window):
  """Causal attention to the last `window` tokens (the query included)."""
  return Causal() & SlidingWindow(window - 1)
