"""The static patterns of patterns.py against brute-force element masks written here
from each paper's definition with plain Python loops (never calling the classes):
`elements` equals them, `block_kind` is exact on tiles of many sizes and offsets (EMPTY
exactly when no element is in, FULL exactly when all are, or only the safe direction
where a class documents a conservative answer), and plans built from the patterns (with
Causal(), with documents) stand for exactly the brute-force mask."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mask_oracle import document_bounds, per_document
from test_block_sparse_plan_oracle import assert_plan_stands_for

from pallas_kernels.block_sparse_attention import masks, plan_from_mask
from pallas_kernels.block_sparse_attention.masks import EMPTY, FULL, PARTIAL
from pallas_kernels.block_sparse_attention.patterns import (BigBird, Fixed, Neighborhood, NeighborhoodGrid, Power,
                                                            Radial, Strided)

# ------------------------------------------------------------------ brute-force definitions


def power_brute(n, local, sink, block=1):
  """PowerAttention: distance 0, powers of two, the last `local` tokens (blocks), `sink`
  first keys; distances between the blocks of `block` tokens."""
  powers = {2 ** j for j in range(20)}
  out = np.zeros((n, n), bool)
  for q in range(n):
    for k in range(n):
      d = q // block - k // block
      out[q, k] = k < sink or (d >= 0 and (d == 0 or d < local or d in powers))
  return out


def strided_brute(n, stride, local):
  out = np.zeros((n, n), bool)
  for q in range(n):
    for k in range(n):
      out[q, k] = abs(q - k) < local or (q - k) % stride == 0
  return out


def fixed_brute(n, stride, summary):
  out = np.zeros((n, n), bool)
  for q in range(n):
    for k in range(n):
      out[q, k] = k // stride == q // stride or k % stride in range(stride - summary, stride)
  return out


def neighborhood_brute(n, kernel, dilation, causal=False):
  """For each query, list its group's positions and take the window from that list."""
  out = np.zeros((n, n), bool)
  for i in range(n):
    group = [j for j in range(n) if j % dilation == i % dilation]
    at = group.index(i)
    if causal:
      window = group[max(0, at - kernel + 1):at + 1]
    else:
      start = max(0, min(at - kernel // 2, len(group) - kernel))  # shifted, not shrunk
      window = group[start:start + kernel]
    out[i, window] = True
  return out


def neighborhood2d_brute(grid, kernel, dilation):
  (h, w) = grid
  rows = neighborhood_brute(h, kernel[0], dilation[0])
  cols = neighborhood_brute(w, kernel[1], dilation[1])
  out = np.zeros((h * w, h * w), bool)
  for q in range(h * w):
    for k in range(h * w):
      out[q, k] = rows[q // w, k // w] and cols[q % w, k % w]
  return out


def neighborhood_grid_brute(grid, kernel, dilation):
  """Any rank: a key is seen when every axis's 1-D neighborhood sees its coordinate."""
  axes = [neighborhood_brute(*axis) for axis in zip(grid, kernel, dilation)]
  coords = np.stack(np.unravel_index(np.arange(np.prod(grid)), grid), axis=1)
  out = np.ones((len(coords), len(coords)), bool)
  for axis, seen in enumerate(axes):
    out &= seen[coords[:, axis][:, None], coords[:, axis][None, :]]
  return out


def radial_brute(n, frame):
  out = np.zeros((n, n), bool)
  for q in range(n):
    for key in range(n):
      i, k = divmod(q, frame)
      j, l = divmod(key, frame)
      distance = abs(i - j)
      r = int(math.floor(math.log2(max(distance, 1))))
      if 2 ** r <= frame:
        out[q, key] = abs(k - l) + 1 <= frame / 2 ** r
      else:
        out[q, key] = k == l and distance % math.ceil(2 ** r / frame) == 0
  return out


def hash_block(query_block, slot, seed, num_blocks):
  """The documented hash, in Python integers modulo 2^32."""
  m = 0xFFFFFFFF
  x = ((query_block * 0x9E3779B1) & m) ^ ((slot * 0x85EBCA77 + seed * 0xC2B2AE3D) & m)
  x ^= x >> 16
  x = (x * 0x85EBCA6B) & m
  x ^= x >> 13
  x = (x * 0xC2B2AE35) & m
  x ^= x >> 16
  return x % num_blocks


def bigbird_brute(n, block, window, global_tokens, random_blocks, seed, causal_draws=False):
  num = -(-n // block)
  drawn = {qb: {hash_block(qb, s, seed, qb + 1 if causal_draws else num) for s in range(random_blocks)}
           for qb in range(num)}
  out = np.zeros((n, n), bool)
  for q in range(n):
    for k in range(n):
      qb, kb = q // block, k // block
      out[q, k] = q < global_tokens or k < global_tokens or abs(qb - kb) <= window or kb in drawn[qb]
  return out


# (mask, brute-force [n, n], block_kind exact?)
CASES = {
    'power': lambda: (Power(), power_brute(150, 0, 0)),
    'power_local_sink': lambda: (Power(local=5, sink=3), power_brute(150, 5, 3)),
    'power_local4': lambda: (Power(local=4), power_brute(130, 4, 0)),
    'power_blocks': lambda: (Power(local=2, sink=3, block=8), power_brute(200, 2, 3, 8)),
    'power_blocks_5': lambda: (Power(block=5), power_brute(150, 0, 0, 5)),
    'strided': lambda: (Strided(8, 8), strided_brute(150, 8, 8)),
    'strided_7_3': lambda: (Strided(7, 3), strided_brute(140, 7, 3)),
    'strided_4_no_local': lambda: (Strided(4), strided_brute(100, 4, 0)),
    'strided_1': lambda: (Strided(1, 2), strided_brute(64, 1, 2)),
    'fixed': lambda: (Fixed(16, 2), fixed_brute(150, 16, 2)),
    'fixed_10_3': lambda: (Fixed(10, 3), fixed_brute(130, 10, 3)),
    'fixed_no_summary': lambda: (Fixed(12, 0), fixed_brute(100, 12, 0)),
    'neighborhood': lambda: (Neighborhood(150, 7), neighborhood_brute(150, 7, 1)),
    'neighborhood_dilated': lambda: (Neighborhood(131, 5, 3), neighborhood_brute(131, 5, 3)),
    'neighborhood_dilated_wide': lambda: (Neighborhood(100, 9, 12), neighborhood_brute(100, 9, 12)),
    'neighborhood_causal': lambda: (Neighborhood(120, 6, causal=True), neighborhood_brute(120, 6, 1, True)),
    'neighborhood_causal_dilated': lambda: (Neighborhood(120, 4, 2, causal=True), neighborhood_brute(120, 4, 2, True)),
    'neighborhood2d': lambda: (NeighborhoodGrid((6, 8), (3, 5)), neighborhood2d_brute((6, 8), (3, 5), (1, 1))),
    'neighborhood2d_dilated': lambda: (NeighborhoodGrid((9, 14), (3, 3), (2, 3)),
                                       neighborhood2d_brute((9, 14), (3, 3), (2, 3))),
    'neighborhood3d': lambda: (NeighborhoodGrid((4, 5, 6), (3, 3, 5)), neighborhood_grid_brute((4, 5, 6), (3, 3, 5), (1, 1, 1))),
    'neighborhood3d_dilated': lambda: (NeighborhoodGrid((5, 4, 7), (3, 1, 3), (2, 1, 2)),
                                       neighborhood_grid_brute((5, 4, 7), (3, 1, 3), (2, 1, 2))),
    'neighborhood2d_as_grid': lambda: (NeighborhoodGrid((7, 9), (5, 3), (1, 2)),
                                       neighborhood_grid_brute((7, 9), (5, 3), (1, 2))),
    'radial_4': lambda: (Radial(4), radial_brute(160, 4)),
    'radial_6': lambda: (Radial(6), radial_brute(150, 6)),
    'radial_16': lambda: (Radial(16), radial_brute(192, 16)),
    'radial_3': lambda: (Radial(3), radial_brute(120, 3)),
    'bigbird': lambda: (BigBird(150, 8, window=1, global_tokens=5, random_blocks=2, seed=3),
                        bigbird_brute(150, 8, 1, 5, 2, 3)),
    'bigbird_wide': lambda: (BigBird(130, 5, window=2, global_tokens=0, random_blocks=3, seed=11),
                             bigbird_brute(130, 5, 2, 0, 3, 11)),
    'bigbird_causal_draws': lambda: (BigBird(150, 8, window=1, global_tokens=8, random_blocks=2, seed=5,
                                             causal_draws=True), bigbird_brute(150, 8, 1, 8, 2, 5, True)),
    'bigbird_no_random': lambda: (BigBird(100, 16, window=0, global_tokens=16), bigbird_brute(100, 16, 0, 16, 0, 0)),
}


@pytest.fixture(scope='module')
def cases():
  built = {}

  def get(name):
    if name not in built:
      built[name] = CASES[name]()
    return built[name]
  return get


# (block_q, block_kv, q offset, k offset): tiles start at the offset (a first tile of the
# offset's length before it), so tile edges fall anywhere.
TILINGS = [(1, 1, 0, 0), (8, 8, 0, 0), (16, 16, 0, 0), (32, 32, 0, 0), (8, 16, 3, 0), (7, 12, 2, 5),
           (64, 48, 0, 10), (5, 3, 1, 2), (20, 33, 0, 0)]


def tile_edges(n, block, offset):
  starts = sorted({0, *range(offset, n, block)})
  ends = starts[1:] + [n]
  return np.asarray(starts), np.asarray(ends)


def tile_counts(truth, q0, q1, k0, k1):
  """Allowed elements per tile, from a 2-D prefix sum."""
  prefix = np.zeros((truth.shape[0] + 1, truth.shape[1] + 1), np.int64)
  prefix[1:, 1:] = truth.cumsum(0).cumsum(1)
  return prefix[q1, k1] - prefix[q0, k1] - prefix[q1, k0] + prefix[q0, k0]


def check_block_kinds(mask, truth, tilings=TILINGS, conservative=False):
  """All tilings' tiles in one flat batch (one compiled call: op by op, every new shape
  would compile every op again)."""
  n = truth.shape[0]
  edges = []
  for tiling in tilings:
    block_q, block_kv, q_offset, k_offset = tiling
    q0, q1 = tile_edges(n, block_q, q_offset)
    k0, k1 = tile_edges(n, block_kv, k_offset)
    grid = [np.broadcast_to(x, (len(q0), len(k0))).ravel() for x in (q0[:, None], q1[:, None], k0[None], k1[None])]
    edges.append(np.stack(grid + [np.full(grid[0].shape, len(edges))]))
  q0, q1, k0, k1, which = np.concatenate(edges, axis=1)
  kinds = np.asarray(jax.jit(mask.block_kind)(*(jnp.asarray(x, jnp.int32) for x in (q0, q1, k0, k1))))
  counts = tile_counts(truth, q0, q1, k0, k1)
  area = (q1 - q0) * (k1 - k0)
  expected = np.where(counts == area, FULL, np.where(counts > 0, PARTIAL, EMPTY))
  for bad, problem in (((kinds == EMPTY) & (counts > 0), 'a tile called empty holds an allowed element'),
                       ((kinds == FULL) & (counts < area), 'a tile called full holds a masked element'),
                       ((kinds != expected) & (not conservative), 'a tile is not called what it is')):
    if bad.any():
      i = np.flatnonzero(bad)[0]
      raise AssertionError(f'{problem} ({bad.sum()} tiles); first: tiling {tilings[which[i]]}, '
                           f'q [{q0[i]}, {q1[i]}) k [{k0[i]}, {k1[i]}): {kinds[i]}, expected {expected[i]}')


# ------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize('name', sorted(CASES))
def test_elements_match_the_papers_definition(cases, name):
  mask, truth = cases(name)
  n = truth.shape[0]
  got = np.asarray(mask.elements(jnp.arange(n)[:, None], jnp.arange(n)[None, :]))
  np.testing.assert_array_equal(got, truth)


@pytest.mark.parametrize('name', sorted(CASES))
def test_block_kind_is_exact_on_every_tiling(cases, name):
  mask, truth = cases(name)
  check_block_kinds(mask, truth)


def test_bigbird_block_kind_on_tall_tiles_is_safe(cases):
  """Tiles spanning more query blocks than exact_q_blocks are answered conservatively."""
  _, truth = cases('bigbird')
  mask = BigBird(150, 8, window=1, global_tokens=5, random_blocks=2, seed=3, exact_q_blocks=2)
  check_block_kinds(mask, truth, tilings=[(40, 16, 0, 0), (64, 8, 3, 0)], conservative=True)


@pytest.mark.slow  # 12 s
def test_patterns_trace_under_jit(cases):
  for name in ('power_local_sink', 'neighborhood_dilated', 'neighborhood2d_dilated', 'radial_6', 'bigbird'):
    mask, truth = cases(name)
    n = truth.shape[0]
    q, k = jnp.arange(n)[:, None], jnp.arange(n)[None, :]
    np.testing.assert_array_equal(np.asarray(jax.jit(mask.elements)(q, k)), truth)
    starts = jnp.arange(0, n, 16)
    args = (starts[:, None], jnp.minimum(starts + 16, n)[:, None], starts[None, :], jnp.minimum(starts + 16, n)[None, :])
    np.testing.assert_array_equal(np.asarray(jax.jit(mask.block_kind)(*args)), np.asarray(mask.block_kind(*args)))


def test_key_spans():
  assert Neighborhood(100, 7, 2).key_span() == 7
  assert NeighborhoodGrid((6, 8), (3, 5)).key_span() == 15
  assert NeighborhoodGrid((4, 6, 8), (3, 3, 5)).key_span() == 45
  assert (Neighborhood(100, 7) & masks.Causal()).key_span() == 7
  for unbounded in (Power(4), Strided(8, 8), Fixed(8, 1), Radial(4), BigBird(64, 8, global_tokens=1)):
    assert unbounded.key_span() is None


def test_bad_parameters_are_refused():
  for make in (lambda: Neighborhood(10, 4), lambda: Strided(0), lambda: Fixed(4, 5), lambda: Radial(0),
               lambda: NeighborhoodGrid((4, 4), (3, 2)), lambda: NeighborhoodGrid((4, 4, 4), (3, 3)),
               lambda: NeighborhoodGrid((4, 4, 4), (3, 3, 3), (1, 0, 1))):
    with pytest.raises(ValueError):
      make()


def documents(n, cuts):
  ids = np.zeros((1, n), np.int32)
  for cut in cuts:
    ids[0, cut:] += 1
  return ids


# (case, combine with Causal(), block size, document cuts or None)
PLANS = [
    ('power_local_sink', True, 16, None),
    ('power_local_sink', True, 16, (37, 90)),
    ('strided_7_3', True, 16, (50,)),
    ('fixed', True, 16, None),
    ('neighborhood_dilated', True, 16, (64,)),
    ('neighborhood_causal', True, 16, None),
    ('neighborhood2d', False, 8, None),
    ('neighborhood3d', True, 16, (50,)),
    ('radial_4', False, 16, (80,)),
    ('radial_6', True, 16, None),
    ('bigbird', True, 16, (70, 100)),
    ('bigbird_wide', False, 16, None),
]


@pytest.mark.parametrize('name, causal, block, cuts', PLANS)
def test_plan_covers_exactly_the_pattern(cases, name, causal, block, cuts):
  mask, truth = cases(name)
  n = truth.shape[0]
  expected = truth & np.tril(np.ones((n, n), bool)) if causal else truth
  segments = None
  if cuts is not None:
    segments = documents(n, cuts)
    expected = expected & (segments[0][:, None] == segments[0][None, :])
  plan = plan_from_mask(mask & masks.Causal() if causal else mask, q_len=n, block_q=block, block_kv=block,
                        segment_ids=segments)
  assert_plan_stands_for(plan, expected[None, None])


def test_union_with_a_global_prefix_plans_exactly(cases):
  mask, truth = cases('radial_4')
  n = truth.shape[0]
  plan = plan_from_mask(mask | masks.GlobalPrefix(4), q_len=n, block_q=16, block_kv=16)
  expected = truth.copy()
  expected[:, :4] = True
  assert_plan_stands_for(plan, expected[None, None])


# (case, block size, document cuts): documents that start off the pattern's blocks, grid
# rows, frames and chunks, some shorter than a tile
DOCUMENT_PLANS = [
    ('power_local_sink', 16, (37, 90)),
    ('fixed', 16, (21, 60)),
    ('neighborhood2d', 8, (13, 77, 80)),
    ('neighborhood3d', 16, (50, 53)),
    ('radial_4', 16, (80,)),
    ('bigbird', 16, (70, 100, 103)),
]


@pytest.mark.parametrize('name, block, cuts', DOCUMENT_PLANS)
def test_document_positions_restart_the_pattern_in_every_document(cases, name, block, cuts):
  """plan_from_mask(document_positions=True): each document sees the pattern at its own
  positions (the brute force's first rows and columns), as if it were alone."""
  mask, truth = cases(name)
  n = truth.shape[0]
  segments = documents(n, cuts)
  expected = per_document(lambda m: truth[:m, :m] & np.tri(m, dtype=bool), segments)
  plan = plan_from_mask(mask & masks.Causal(), q_len=n, block_q=block, block_kv=block, segment_ids=segments,
                        document_positions=True)
  assert plan.document_positions
  assert_plan_stands_for(plan, expected[:, None])
  # Tiles inside one document are exact: as empty or full as their elements.
  kinds = np.asarray(plan.block_kinds())[0, 0]
  for start, end in document_bounds(segments[0]):
    inside = range(-(-start // block), -(-n // block) if end == n else end // block)  # blocks within it
    for i in inside:
      for j in inside:
        tile = expected[0, i * block:(i + 1) * block, j * block:(j + 1) * block]
        want = FULL if tile.all() and tile.shape == (block, block) else PARTIAL if tile.any() else EMPTY
        assert kinds[i, j] == want, (start, i, j, kinds[i, j], want)


def test_shift_invariant_masks_say_so_truly():
  """A mask that calls itself shift-invariant answers alike at q + s, k + s (so its plan
  may ignore document positions); the offset-dependent ones do not."""
  q, k = np.arange(300)[:, None], np.arange(300)[None, :]
  invariant = [masks.Causal(), masks.causal_window(5), Power(3), Strided(7, 3) & masks.Causal(),
               Neighborhood(1 << 30, 5, 3, causal=True)]
  dependent = [Power(3, sink=2), Power(2, block=8), Fixed(8, 2), Radial(4), masks.Chunked(8) & masks.Causal(),
               NeighborhoodGrid((1 << 20, 10), (3, 3)), BigBird(1 << 30, 8, global_tokens=8, random_blocks=1),
               Neighborhood(300, 5)]
  for mask in invariant + dependent:
    same = all((np.asarray(mask.elements(q + s, k + s)) == np.asarray(mask.elements(q, k))).all() for s in (1, 37))
    assert mask.shift_invariant() == (mask in invariant) and same == mask.shift_invariant(), mask
