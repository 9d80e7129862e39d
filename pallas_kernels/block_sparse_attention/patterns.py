"""Static sparse attention patterns from the literature, as mask functions (masks.py).

Each class gives the exact element rule (`elements`) and answers `block_kind` for a tile
[q0, q1) x [k0, k1) analytically, without visiting the tile's elements: plans at 32k
tokens with 128-blocks ask about 65k tiles at once. Most rules here depend on the
distance d = q - k, and over a rectangular tile the distances cover exactly the integers
[q0 - (k1 - 1), (q1 - 1) - k0], each at least once: a tile holds an allowed element iff
some distance in that interval is allowed, and is full iff all of them are.

Apart from Power (whose rule only looks backwards) the masks do not include causality:
for a causal language model combine them with `masks.Causal()`, e.g.
`Strided(128, 128) & Causal()`. Documents (segment ids) are applied by the plan.

    Power(local, sink)                      PowerAttention, arXiv 2503.03588
    Strided(stride, local), Fixed(stride, summary)
                                            Sparse Transformer, arXiv 1904.10509
    Neighborhood(length, kernel, dilation, causal), NeighborhoodGrid(grid, kernel, dilation)
                                            Neighborhood Attention arXiv 2204.07143,
                                            DiNAT arXiv 2209.15001 (in neighborhood.py)
    Radial(frame, length)                   Radial Attention, arXiv 2506.19852
    BigBird(length, block, window, global_tokens, random_blocks, seed)
                                            BigBird arXiv 2007.14062 (Longformer's
                                            global + window, arXiv 2004.05150)

Every method takes jnp int arrays of any broadcast shape (and traces under jit).
"""

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention.masks import Mask, _kind
from pallas_kernels.block_sparse_attention.neighborhood import Neighborhood, NeighborhoodGrid, stacked_grid_boxes  # noqa: F401 (Neighborhood*: the catalogue)


def _distances(q0, q1, k0, k1):
  """The interval [lo, hi] of q - k over the tile (every integer in it occurs)."""
  return q0 - (k1 - 1), (q1 - 1) - k0


def _first_gap(allowed, start=0):
  """The smallest integer >= start that `allowed` (a Python predicate) rejects."""
  d = start
  while allowed(d):
    d += 1
  return d


# --------------------------------------------------------------------------- PowerAttention


@dataclasses.dataclass(frozen=True)
class Power(Mask):
  """PowerAttention (Chen et al., arXiv 2503.03588).

  A query q sees the key k at distance d = q // block - k // block (in blocks of `block`
  tokens; block 1: tokens) for d = 0 and every power of two d = 1, 2, 4, 8, ... (so its
  receptive field doubles with each layer), plus the last `local` blocks (0 <= d < local)
  and the first `sink` tokens (k < sink):

      allowed(q, k) = k < sink  or  (d >= 0 and (d < local or d == 0 or d is a power of 2)).

  With block 1 the rule only looks backwards (d >= 0), so it is causal by itself (except
  for sink keys ahead of an early query); with larger blocks d = 0 holds the query's whole
  block, later tokens too: `& Causal()` for a language model.

  The paper applies the pattern at block granularity, so that it maps onto block-sparse
  kernels: with `block` the kernel's block size every visited tile is full (but the
  diagonal's causal half), while per token (block 1) a power-of-two diagonal crosses many
  tiles with a few elements each (docs/static_patterns.md).
  """
  local: int = 0
  sink: int = 0
  block: int = 1

  def __post_init__(self):
    if self.block < 1 or self.local < 0 or self.sink < 0:
      raise ValueError(f'bad Power parameters: {self}')

  def _allowed_distance(self, d):
    return (d >= 0) & ((d < max(self.local, 1)) | ((d & (d - 1)) == 0))

  def elements(self, q_index, k_index):
    return self._allowed_distance(q_index // self.block - k_index // self.block) | (k_index < self.sink)

  def shift_invariant(self):
    return self.block == 1 and self.sink == 0

  def _any_distance(self, lo, hi):
    lo = jnp.maximum(lo, 0)
    band = lo < max(self.local, 1)
    lo1 = jnp.maximum(lo, 1)
    power = jnp.zeros(jnp.shape(lo1), bool)
    for j in range(31):
      power = power | ((lo1 <= 2 ** j) & (2 ** j <= hi))
    return (hi >= 0) & (band | power)

  def _all_distance(self, lo, hi):
    # Allowed distances: a run [0, gap) then isolated powers of two.
    is_allowed = lambda d: d < max(self.local, 1) or (d & (d - 1)) == 0
    gap = _first_gap(is_allowed)
    return ((lo >= 0) & (hi < gap)) | ((lo == hi) & self._allowed_distance(lo))

  def block_kind(self, q0, q1, k0, k1):
    # Keys below `sink` are allowed for every query; the rest follow the distance rule,
    # whose block distances over the tile cover every integer of an interval.
    b = self.block
    ks = jnp.maximum(k0, self.sink)
    rest = ks < k1
    lo, hi = _distances(q0 // b, (q1 - 1) // b + 1, ks // b, (k1 - 1) // b + 1)
    any_in = (k0 < self.sink) | (rest & self._any_distance(lo, hi))
    all_in = ~rest | self._all_distance(lo, hi)
    return _kind(all_in, any_in)


# --------------------------------------------------------------------- Sparse Transformer


@dataclasses.dataclass(frozen=True)
class Strided(Mask):
  """Sparse Transformer's strided pattern (Child et al., arXiv 1904.10509, section 4.2).

  The paper's two heads, with l = stride and the causal rule j <= i: A(1) = the last l
  positions, i - j < l, and A(2) = the positions whose distance is a multiple of l,
  (i - j) mod l = 0; "strided" attention is their union (or the two in alternate heads /
  layers). Here the local width is its own parameter and the rule is symmetric:

      allowed(q, k) = |q - k| < local  or  (q - k) % stride == 0

  so `Strided(l, l) & Causal()` is the paper's union A(1) | A(2). (Without Causal() the
  mask also sees the mirrored future positions, as a bidirectional encoder would.)
  """
  stride: int
  local: int = 0

  def __post_init__(self):
    if self.stride < 1 or self.local < 0:
      raise ValueError(f'Strided needs stride >= 1 and local >= 0, got {self.stride}, {self.local}')

  def _allowed_distance(self, d):
    return (jnp.abs(d) < self.local) | (d % self.stride == 0)

  def elements(self, q_index, k_index):
    return self._allowed_distance(q_index - k_index)

  def shift_invariant(self):
    return True

  def block_kind(self, q0, q1, k0, k1):
    lo, hi = _distances(q0, q1, k0, k1)
    band = (lo < self.local) & (hi > -self.local)
    multiple = (hi // self.stride) * self.stride >= lo
    if self.stride == 1:
      all_in = jnp.ones(jnp.shape(lo), bool)
    else:
      # Allowed distances: the run (-gap, gap), then isolated multiples of the stride.
      gap = self.local if self.local % self.stride else self.local + 1
      all_in = ((lo > -gap) & (hi < gap)) | ((lo == hi) & self._allowed_distance(lo))
    return _kind(all_in, band | multiple)


@dataclasses.dataclass(frozen=True)
class Fixed(Mask):
  """Sparse Transformer's fixed pattern (Child et al., arXiv 1904.10509, section 4.2).

  With l = stride and c = summary: A(1) = {j : floor(j / l) = floor(i / l)} (the query's
  own chunk) and A(2) = {j : j mod l in {l - c, ..., l - 1}} (the last c positions of
  every chunk, which summarise it):

      allowed(q, k) = k // stride == q // stride  or  k % stride >= stride - summary

  Like the paper's causal use, combine with Causal() (`Fixed(l, c) & Causal()`); without
  it this is the bidirectional form (the paper notes A(2) for encoders as the summary
  positions of all chunks, which is what this is). The paper's variant with different
  summary offsets per head is several masks, one per head.
  """
  stride: int
  summary: int = 1

  def __post_init__(self):
    if self.stride < 1 or not 0 <= self.summary <= self.stride:
      raise ValueError(f'Fixed needs stride >= 1 and 0 <= summary <= stride, got {self.stride}, {self.summary}')

  def elements(self, q_index, k_index):
    s = self.stride
    return (k_index // s == q_index // s) | (k_index % s >= s - self.summary)

  def _all_summary(self, a, b):
    """Every key of [a, b) is a summary position (true when the range is empty)."""
    s, c = self.stride, self.summary
    return (b <= a) | ((a % s >= s - c) & (a % s + (b - a) <= s))

  def block_kind(self, q0, q1, k0, k1):
    s, c = self.stride, self.summary
    same_chunk_any = ((q1 - 1) // s >= k0 // s) & ((k1 - 1) // s >= q0 // s)
    summary_any = (c > 0) & ((k1 - k0 >= s) | (k0 % s + (k1 - k0) - 1 >= s - c))
    # Full: every key outside the queries' (single) chunk is a summary position.
    chunk = q0 // s
    single = chunk == (q1 - 1) // s
    outside_ok = self._all_summary(k0, jnp.minimum(k1, chunk * s)) & self._all_summary(
        jnp.maximum(k0, (chunk + 1) * s), k1)
    all_in = (single & outside_ok) | self._all_summary(k0, k1)
    return _kind(all_in, same_chunk_any | summary_any)


# ------------------------------------------------------------------------------ BigBird


_HASH_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x85EBCA6B, 0xC2B2AE35)


def random_key_block(query_block, slot, seed, num_blocks):
  """BigBird's random key block for (query block, slot): a murmur3-style hash of
  (query block, slot, seed) in uint32 arithmetic, mod num_blocks (an int, or an array
  broadcast with query_block). Pure jnp, traceable."""
  u = lambda x: jnp.asarray(x).astype(jnp.uint32)
  c = [jnp.uint32(m) for m in _HASH_MULTIPLIERS]
  x = u(query_block) * c[0] ^ (u(slot) * c[1] + u(seed) * c[2])
  x = x ^ (x >> 16)
  x = x * c[3]
  x = x ^ (x >> 13)
  x = x * c[4]
  x = x ^ (x >> 16)
  return (x % u(num_blocks)).astype(jnp.int32)


@dataclasses.dataclass(frozen=True)
class BigBird(Mask):
  """BigBird's blocked sparse attention (Zaheer et al., arXiv 2007.14062; the global and
  window parts are also Longformer's, arXiv 2004.05150), over `length` tokens cut into
  blocks of `block` tokens (query block qb = q // block, key block kb = k // block):

      allowed(q, k) = q < global_tokens or k < global_tokens           (global, ITC)
                      or |qb - kb| <= window                           (sliding window)
                      or kb in {R(qb, s) : s < random_blocks}          (random)

  R(qb, s) = random_key_block(qb, s, seed, ceil(length / block)): a hash, so the pattern
  is deterministic, the same in every call, and traceable (no RNG state). With
  `causal_draws`, R(qb, s) = random_key_block(qb, s, seed, qb + 1): each query block draws
  among the blocks up to its own, so no draw is lost to causality and the pattern does
  not depend on `length` (a language model's rows and decode caches differ in length).

  Where ours differs: the paper's blocked form has window = 1 (3 blocks) and global
  tokens = the first g blocks (ITC; ETC adds extra tokens); here the window is any number
  of blocks each side and the global count any number of tokens. The paper draws random
  blocks without replacement, outside the window and global blocks; our draws are
  independent, so they can repeat or fall inside the window (a row then has fewer extra
  blocks). Queries or keys past `length` follow the same rule (the plan masks them).

  block_kind is exact for tiles spanning at most `exact_q_blocks` query blocks (e.g. any
  tile of at most (exact_q_blocks - 1) * block + 1 rows); on taller tiles the random part
  is conservative: such a tile is never called empty when its global and window parts
  are empty (and is full only when the global or window part alone fills it).
  """
  length: int
  block: int
  window: int = 1
  global_tokens: int = 0
  random_blocks: int = 0
  seed: int = 0
  exact_q_blocks: int = 8
  causal_draws: bool = False

  def __post_init__(self):
    if self.block < 1 or self.window < 0 or self.global_tokens < 0 or self.random_blocks < 0:
      raise ValueError(f'bad BigBird parameters: {self}')

  @property
  def num_blocks(self):
    return -(-self.length // self.block)

  def _random(self, query_block, slot):
    blocks = query_block + 1 if self.causal_draws else self.num_blocks
    return random_key_block(query_block, slot, self.seed, blocks)

  def elements(self, q_index, k_index):
    qb, kb = q_index // self.block, k_index // self.block
    allowed = (q_index < self.global_tokens) | (k_index < self.global_tokens) | (jnp.abs(qb - kb) <= self.window)
    for slot in range(self.random_blocks):
      allowed = allowed | (kb == self._random(qb, slot))
    return allowed

  def block_kind(self, q0, q1, k0, k1):
    B, g, w = self.block, self.global_tokens, self.window
    shape = jnp.broadcast_shapes(*map(jnp.shape, (q0, q1, k0, k1)))
    q0, q1, k0, k1 = (jnp.broadcast_to(jnp.asarray(x), shape) for x in (q0, q1, k0, k1))
    nonempty = (q0 < q1) & (k0 < k1)
    qlo, qhi, klo, khi = q0 // B, (q1 - 1) // B, k0 // B, (k1 - 1) // B
    global_any = (q0 < g) | (k0 < g)
    global_all = (q1 <= g) | (k1 <= g)
    window_any = (khi >= qlo - w) & (klo <= qhi + w)
    window_all = (qhi - klo <= w) & (khi - qlo <= w)
    exact = qhi - qlo < self.exact_q_blocks
    # Per query block of the tile (a trailing axis of exact_q_blocks candidates).
    j = jnp.arange(self.exact_q_blocks)
    qb = qlo[..., None] + j
    present = qb <= qhi[..., None]
    draws = [self._random(qb, s) for s in range(self.random_blocks)]
    random_any = jnp.zeros(qb.shape, bool)
    for r in draws:
      random_any = random_any | ((r >= klo[..., None]) & (r <= khi[..., None]))
    random_any = (present & random_any).any(-1)
    # Full: for each query block whose rows are not all global, every key block holding a
    # non-global key of the tile is in the window or drawn.
    rows_global = jnp.minimum(q1[..., None], (qb + 1) * B) <= g
    kg = jnp.maximum(k0, g)
    keys_rest = kg < k1
    kalo, kahi = (kg // B)[..., None], ((k1 - 1) // B)[..., None]
    left = (kalo, jnp.minimum(kahi, qb - w - 1))  # key blocks left of the window
    right = (jnp.maximum(kalo, qb + w + 1), kahi)  # and right of it
    needed = sum(jnp.maximum(b - a + 1, 0) for a, b in (left, right))
    distinct = jnp.zeros(qb.shape, jnp.int32)
    for s, r in enumerate(draws):
      fresh = jnp.ones(qb.shape, bool)
      for earlier in draws[:s]:
        fresh = fresh & (earlier != r)
      outside = ((r >= left[0]) & (r <= left[1])) | ((r >= right[0]) & (r <= right[1]))
      distinct = distinct + (fresh & outside).astype(jnp.int32)
    covered = rows_global | ~keys_rest[..., None] | (distinct == needed)
    random_all = exact & (covered | ~present).all(-1)
    any_in = nonempty & (global_any | window_any | ~exact | random_any)
    all_in = nonempty & (global_all | window_all | random_all)
    return _kind(all_in, any_in)


# ------------------------------------------------------------------------------- Radial


def _band(distance):
  """floor(log2(max(distance, 1))) for int arrays: one count of leading zeros (the kernels
  evaluate it per element of every partial tile)."""
  distance = jnp.maximum(jnp.asarray(distance, jnp.int32), 1)
  return 31 - jax.lax.clz(distance)


@dataclasses.dataclass(frozen=True)
class Radial(Mask):
  """Radial Attention (Li et al., arXiv 2506.19852, section 4), over tokens laid out frame
  by frame, `frame` tokens (s) per frame: token t is position t % s of frame t // s.

  For a query at (frame i, position k) and a key at (frame j, position l), with the
  temporal band r = floor(log2(max(|i - j|, 1))) (so frames 0 and 1 apart are band 0,
  2-3 apart band 1, 4-7 band 2, ...):

      if 2^r <= s:  allowed iff |k - l| + 1 <= s / 2^r          (a spatial diagonal
                                                                 band halving per band)
      if 2^r >  s:  allowed iff k == l and |i - j| % ceil(2^r / s) == 0
                                                                (the diagonal, in ever
                                                                 fewer frames)

  so the compute density between two frames decays as 2^-r and the total is
  O(n log n). This is our reading of the paper's mask (its equation in section 4.1),
  not checked symbol by symbol against the text in this session.

  Where ours differs: the paper's mask is defined over (frame, position) of a video and
  run at 128 x 128 block granularity (a block is kept when its part of the mask is, with
  an attention sink on the first frame and dense attention for the first layers /
  steps); this class is the element-level mask over the flattened 1-D token order (the
  frame size is the only layout parameter, positions are the row-major index inside a
  frame, |k - l| is their 1-D distance), and the plan keeps exactly the tiles that hold
  an allowed element. Add the sink as `| GlobalPrefix(frame)`; no causality (video
  diffusion is bidirectional).

  block_kind is exact: a token range is at most three (frame range x position range)
  rectangles; over a pair of them the frame distances form an interval [D0, D1] and the
  position distances an interval [P0, P1], all combinations occurring, and the rule is
  monotone in D inside the first case.
  """
  frame: int

  def __post_init__(self):
    if self.frame < 1:
      raise ValueError(f'Radial needs frame >= 1, got {self.frame}')

  def _allowed(self, d, p):
    """The rule for frame distance d >= 0 and position distance p >= 0."""
    s = self.frame
    r = _band(d)
    spatial = (jnp.left_shift(1, r) <= s) & (p + 1 <= jnp.right_shift(s, r))
    step = (jnp.left_shift(1, r) + s - 1) // s  # ceil(2^r / s)
    diagonal = (jnp.left_shift(1, r) > s) & (p == 0) & (d % jnp.maximum(step, 1) == 0)
    return spatial | diagonal

  def elements(self, q_index, k_index):
    s = self.frame
    return self._allowed(jnp.abs(q_index // s - k_index // s), jnp.abs(q_index % s - k_index % s))

  def _pieces_kind(self, d0, d1, p0, p1):
    """(any, all) over frame distances [d0, d1] x position distances [p0, p1]."""
    s = self.frame
    r0, r1 = _band(d0), _band(d1)
    spatial_any = (jnp.left_shift(1, r0) <= s) & (p0 + 1 <= jnp.right_shift(s, r0))
    diagonal_any = jnp.zeros(jnp.shape(d0), bool)
    for r in range(31):
      if 2 ** r <= s:
        continue
      step = -(-(2 ** r) // s)
      lo, hi = jnp.maximum(d0, 2 ** r), jnp.minimum(d1, 2 ** (r + 1) - 1)
      diagonal_any = diagonal_any | ((lo <= hi) & ((hi // step) * step >= lo))
    any_in = spatial_any | ((p0 == 0) & diagonal_any)
    # All: every d in [d0, d1] allows every p in [p0, p1]. In the spatial bands (d below
    # the first diagonal band, d < first) the width shrinks with d, so the worst case is
    # the largest such d; in the diagonal bands at most one d can hold (steps are >= 2).
    first = _first_gap(lambda d: 2 ** (d.bit_length() - 1 if d else 0) <= s)
    spatial_hi = jnp.minimum(d1, first - 1)
    spatial_ok = (d0 > spatial_hi) | (p1 + 1 <= jnp.right_shift(s, _band(spatial_hi)))
    diagonal_lo = jnp.maximum(d0, first)
    diagonal_ok = (diagonal_lo > d1) | ((diagonal_lo == d1) & (p1 == 0) & self._allowed(d1, p1))
    all_in = spatial_ok & diagonal_ok
    return any_in, all_in

  def block_kind(self, q0, q1, k0, k1):
    s = self.frame
    shape = jnp.broadcast_shapes(*map(jnp.shape, (q0, q1, k0, k1)))
    q0, q1, k0, k1 = (jnp.broadcast_to(jnp.asarray(x), shape) for x in (q0, q1, k0, k1))
    nonempty = (q0 < q1) & (k0 < k1)
    q1s, k1s = jnp.where(nonempty, q1, q0 + 1), jnp.where(nonempty, k1, k0 + 1)
    # Every (query rectangle, key rectangle) pair at once (frames of s tokens as grid rows).
    q_present, ((qf0, qf1), (qp0, qp1)) = stacked_grid_boxes(q0, q1s, (None, s), shape, -2)
    k_present, ((kf0, kf1), (kp0, kp1)) = stacked_grid_boxes(k0, k1s, (None, s), shape, -1)
    present = q_present & k_present & nonempty[..., None, None]
    # |i - j| over frame ranges [qf0, qf1) x [kf0, kf1), |k - l| likewise.
    d0 = jnp.maximum(jnp.maximum(kf0 - (qf1 - 1), qf0 - (kf1 - 1)), 0)
    d1 = jnp.maximum((qf1 - 1) - kf0, (kf1 - 1) - qf0)
    p0 = jnp.maximum(jnp.maximum(kp0 - (qp1 - 1), qp0 - (kp1 - 1)), 0)
    p1 = jnp.maximum((qp1 - 1) - kp0, (kp1 - 1) - qp0)
    piece_any, piece_all = self._pieces_kind(d0, d1, p0, p1)
    any_in = (present & piece_any).any((-2, -1))
    all_in = nonempty & (~present | piece_all).all((-2, -1))
    return _kind(all_in, any_in)
