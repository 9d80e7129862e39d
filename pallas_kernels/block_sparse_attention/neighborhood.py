"""Neighborhood Attention as mask functions (masks.py): NA (Hassani et al., arXiv
2204.07143) and its dilated form DiNAT (Hassani & Shi, arXiv 2209.15001), in 1-D
(`Neighborhood`) and over a grid of any rank (`NeighborhoodGrid`: 2-D for image tokens,
3-D for video tokens), with block_kind exact and analytic like the rest of patterns.py.
"""

import dataclasses
import math

import jax.numpy as jnp

from pallas_kernels.block_sparse_attention.masks import Mask, _kind


def _na_window(i, n, kernel, causal):
  """[lo, hi) of the keys query i sees in a 1-D sequence of n positions (group coordinates).

  Non-causal (NA, arXiv 2204.07143): the `kernel` nearest positions, the window centred on
  i and shifted (not shrunk) at the edges: lo = clamp(i - kernel // 2, 0, n - kernel).
  Causal (NATTEN's causal 1-D NA): the last `kernel` positions, lo = max(i - kernel + 1, 0),
  hi = i + 1. Both lo and hi are nondecreasing in i."""
  if causal:
    return jnp.maximum(i - kernel + 1, 0), i + 1
  lo = jnp.maximum(jnp.minimum(i - kernel // 2, n - kernel), 0)
  return lo, jnp.minimum(lo + kernel, n)


def _na_elements(i, j, n, kernel, dilation, causal):
  """Key j visible to query i (both in [0, n)) under dilated 1-D neighborhood attention."""
  d = dilation
  group = i % d
  group_len = (n - group + d - 1) // d
  lo, hi = _na_window(i // d, group_len, kernel, causal)
  inside = (i >= 0) & (i < n) & (j >= 0) & (j < n)
  return inside & (j % d == group) & (j // d >= lo) & (j // d < hi)


def _na_tile(i0, i1, j0, j1, n, kernel, dilation, causal):
  """(any, all) of dilated 1-D neighborhood attention over the tile [i0, i1) x [j0, j1),
  exact. Per dilation group g (a trailing axis), the group's queries and keys in the tile
  are runs a'..b' and c'..e' in group coordinates; windows are monotone in the query, so
  the union of their windows is [lo(a'), hi(b')) and their intersection [lo(b'), hi(a'))."""
  d = dilation
  full_inside = (i1 <= n) & (j1 <= n) & (i0 >= 0) & (j0 >= 0)
  i0, j0 = jnp.maximum(i0, 0), jnp.maximum(j0, 0)
  i1, j1 = jnp.minimum(i1, n), jnp.minimum(j1, n)
  nonempty = (i0 < i1) & (j0 < j1)
  g = jnp.arange(d)
  i0, i1, j0, j1 = (jnp.asarray(x)[..., None] for x in (i0, i1, j0, j1))
  first = lambda a: a + (g - a) % d  # first index >= a in group g
  last = lambda b: (b - 1) - (b - 1 - g) % d  # last index < b in group g
  qa, qb, kc, ke = first(i0), last(i1), first(j0), last(j1)
  valid = (qa <= qb) & (kc <= ke)
  qa, qb, kc, ke = qa // d, qb // d, kc // d, ke // d
  group_len = (n - g + d - 1) // d
  lo_a, hi_a = _na_window(qa, group_len, kernel, causal)
  lo_b, hi_b = _na_window(qb, group_len, kernel, causal)
  any_in = (valid & (kc < hi_b) & (ke >= lo_a)).any(-1)
  if d == 1:
    all_in = (valid & (lo_b <= kc) & (ke < hi_a))[..., 0]
  else:  # two positions of the tile in different groups never see each other
    all_in = any_in & (i1[..., 0] - i0[..., 0] == 1) & (j1[..., 0] - j0[..., 0] == 1)
  return any_in & nonempty, all_in & nonempty & full_inside


@dataclasses.dataclass(frozen=True)
class Neighborhood(Mask):
  """1-D (dilated) Neighborhood Attention: NA (Hassani et al., arXiv 2204.07143) and
  DiNAT (Hassani & Shi, arXiv 2209.15001), over a sequence of `length` tokens.

  Dilation d splits the sequence into d groups (index mod d); a query attends only inside
  its group, whose positions it counts in group coordinates i' = i // d (the group of g
  has ceil((length - g) / d) positions, n_g). There the query sees the `kernel` nearest
  positions: its window is centred on it and, at the sequence edges, shifted rather than
  shrunk, so every query sees exactly `kernel` keys:

      lo = clamp(i' - kernel // 2, 0, n_g - kernel), keys j with j % d == i % d and
      lo <= j // d < lo + kernel.

  (`kernel` must be odd, as in the papers. A group shorter than the kernel is seen whole.)

  causal=True is NATTEN's causal 1-D neighborhood: the last `kernel` positions of the
  group up to and including the query, lo = max(i' - kernel + 1, 0), no shift: early
  queries see fewer keys. (The papers define the non-causal form; the causal one is
  NATTEN's.)

  Queries or keys at or past `length` see nothing.
  """
  length: int
  kernel: int
  dilation: int = 1
  causal: bool = False

  def __post_init__(self):
    if self.kernel < 1 or self.dilation < 1 or (not self.causal and self.kernel % 2 == 0):
      raise ValueError(f'Neighborhood needs an odd kernel >= 1 (any >= 1 when causal) and dilation >= 1, '
                       f'got kernel {self.kernel}, dilation {self.dilation}')

  def elements(self, q_index, k_index):
    return _na_elements(q_index, k_index, self.length, self.kernel, self.dilation, self.causal)

  def key_span(self):
    return self.kernel

  def shift_invariant(self):
    return self.causal  # the last `kernel` keys of the group, for queries below `length`

  def block_kind(self, q0, q1, k0, k1):
    any_in, all_in = _na_tile(q0, q1, k0, k1, self.length, self.kernel, self.dilation, self.causal)
    return _kind(all_in, any_in)


def _unravel(index, grid):
  """Row-major coordinates of a token index on the grid (the last axis fastest)."""
  coords = []
  for size in reversed(grid[1:]):
    coords.append(index % size)
    index = index // size
  return [index] + coords[::-1]


def grid_boxes(a, b, grid):
  """Split the token range [a, b) of a row-major grid into boxes, 2 * rank - 1 of them:
  the first partial row of the last axis, the whole rows between (a range of the grid
  without its last axis, split the same way), the last partial row. Each box is
  (present, [(lo, hi) per axis]); an absent box's ranges are meaningless. Only the inner
  axes' sizes are read (grid[0] may be None: no end)."""
  if len(grid) == 1:
    return [(a < b, [(a, b)])]
  width, outer = grid[-1], grid[:-1]
  first, last = a // width, (b - 1) // width
  one = first == last
  point = lambda index: [(c, c + 1) for c in _unravel(index, outer)]  # noqa: E731
  top = (a < b, point(first) + [(a % width, jnp.where(one, (b - 1) % width + 1, width))])
  bottom = ((a < b) & ~one, point(last) + [(jnp.zeros_like(a), (b - 1) % width + 1)])
  middle = [(present & (a < b), ranges + [(jnp.zeros_like(a), jnp.full_like(a, width))])
            for present, ranges in grid_boxes(first + 1, last, outer)]
  return [top] + middle + [bottom]


def stacked_grid_boxes(a, b, grid, shape, axis):
  """grid_boxes(a, b, grid) as arrays with the boxes on a new axis (-1 or -2, the other
  trailing axis of size 1, so that query and key boxes broadcast into all pairs):
  (present, [(lo, hi) per grid axis])."""
  boxes = grid_boxes(a, b, grid)
  stack = lambda values: jnp.expand_dims(jnp.stack([jnp.broadcast_to(v, shape) for v in values], -1),  # noqa: E731
                                         -1 if axis == -2 else -2)
  present = stack([box_present for box_present, _ in boxes])
  ranges = [(stack([ranges[d][0] for _, ranges in boxes]), stack([ranges[d][1] for _, ranges in boxes]))
            for d in range(len(grid))]
  return present, ranges


@dataclasses.dataclass(frozen=True)
class NeighborhoodGrid(Mask):
  """(Dilated) Neighborhood Attention (arXiv 2204.07143, 2209.15001) over tokens laid out
  row-major on a grid (H x W for an image, T x H x W for a video): token t sits at
  `_unravel(t, grid)`, the last axis fastest. A query sees a key when the 1-D neighborhood
  rule (see Neighborhood: same dilation group, window of `kernel` positions centred and
  shifted at the edges) holds along every axis, each with its own kernel and dilation: a
  kh x kw (x ...) window of keys.

  block_kind is exact: a token range of a row-major grid is a few boxes (`grid_boxes`), the
  rule is a product of per-axis rules, so a pair of boxes is full / holds something
  exactly when every axis's 1-D tile is.

  Tokens at or past the grid's size see nothing. No causal form (a causal language model
  ANDs it with masks.Causal(): in raster order, the earlier frames' and rows' part of the
  window and the query's row up to the query).
  """
  grid: tuple
  kernel: tuple
  dilation: tuple = None

  def __post_init__(self):
    if self.dilation is None:
      object.__setattr__(self, 'dilation', (1,) * len(self.grid))
    if not len(self.grid) == len(self.kernel) == len(self.dilation) >= 1:
      raise ValueError(f'NeighborhoodGrid needs one kernel size and dilation per grid axis, got grid '
                       f'{self.grid}, kernel {self.kernel}, dilation {self.dilation}')
    for axis in zip(self.grid, self.kernel, self.dilation):
      Neighborhood(*axis)  # validates

  def _axes(self):
    return zip(self.grid, self.kernel, self.dilation)

  def elements(self, q_index, k_index):
    size = math.prod(self.grid)
    visible = (q_index >= 0) & (q_index < size) & (k_index >= 0) & (k_index < size)
    for i, j, (n, kernel, dilation) in zip(_unravel(q_index, self.grid), _unravel(k_index, self.grid), self._axes()):
      visible = visible & _na_elements(i, j, n, kernel, dilation, False)
    return visible

  def key_span(self):
    return math.prod(self.kernel)

  def block_kind(self, q0, q1, k0, k1):
    size = math.prod(self.grid)
    shape = jnp.broadcast_shapes(*map(jnp.shape, (q0, q1, k0, k1)))
    q0, q1, k0, k1 = (jnp.broadcast_to(jnp.asarray(x), shape) for x in (q0, q1, k0, k1))
    full_inside = (q1 <= size) & (k1 <= size) & (q0 >= 0) & (k0 >= 0)
    q0, k0 = jnp.clip(q0, 0, size), jnp.clip(k0, 0, size)
    q1, k1 = jnp.clip(q1, 0, size), jnp.clip(k1, 0, size)
    nonempty = (q0 < q1) & (k0 < k1)
    # Every (query box, key box) pair at once: boxes on a trailing axis, queries' before keys'.
    q_present, q_ranges = stacked_grid_boxes(q0, q1, self.grid, shape, -2)
    k_present, k_ranges = stacked_grid_boxes(k0, k1, self.grid, shape, -1)
    present = q_present & k_present
    box_any, box_all = present, True
    for (i0, i1), (j0, j1), (n, kernel, dilation) in zip(q_ranges, k_ranges, self._axes()):
      axis_any, axis_all = _na_tile(i0, i1, j0, j1, n, kernel, dilation, False)
      box_any, box_all = box_any & axis_any, box_all & axis_all
    any_in = box_any.any((-2, -1))
    all_in = nonempty & full_inside & (~present | box_all).all((-2, -1))
    return _kind(all_in, any_in)
