"""compressed_mass as a Pallas Triton kernel (reference.py defines it).

One program per (query block, kv head, batch row) takes the query heads of the kv head's
GQA group in turn; for each it walks the compressed keys in tiles of KEY_TILE, up to the
last one a query of the block can see (the causal bound), adding each key's sum of
exp(s - lse) over the block into the program's output row (the group's sum: the caller
needs no [B, H, nQ, Tc] array); later tiles stay zero. Tiles that every query of the
block sees whole (most of a long row) skip the causal mask, and queries that do not vote
get lse = +inf instead of a mask, so such a tile costs one FMA, one exp2 and one add per
score. Without lse a first walk computes it (running max and sum, the same split).
Nothing of the [T, Tc] scores reaches memory: the output is [B, Hkv, nQ, Tc'] float32
(Tc' = Tc padded to whole tiles).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.implementations import Implementation

KEY_TILE = 64
HEAD_DIMS = (32, 64, 128, 256)
QUERY_BLOCKS = (32, 64, 128)
NUM_WARPS = 4
LOG2E = 1.4426950408889634


def _kernel(q_ref, k_ref, lse_ref, q_seg_ref, k_seg_ref, out_ref, *, scale, cmp_len, cmp_stride, query_block,
            length, count, group, has_lse, has_segments):
  block = pl.program_id(0)
  first_query = block * query_block
  query = first_query + lax.broadcasted_iota(jnp.int32, (query_block,), 0)
  votes = query < length
  if has_segments:
    q_seg = q_seg_ref[...]
    votes = votes & (q_seg != 0)
  last_query = jnp.minimum(first_query + query_block, length) - 1
  seen_keys = jnp.clip((last_query - cmp_len) // cmp_stride + 1, 0, count)  # keys complete by the last query
  seen_tiles = (seen_keys + KEY_TILE - 1) // KEY_TILE
  # Tiles whose every key is complete by the block's first query: no causal or length
  # mask there (documents aside), which most tiles of a long row are.
  open_tiles = jnp.clip((first_query - cmp_len) // cmp_stride + 1, 0, count) // KEY_TILE
  total_tiles = out_ref.shape[0] // KEY_TILE
  log2_scale = scale * LOG2E  # scores in base 2: exp2(s log2e - lse log2e) = exp(s - lse)

  def scores(q, tile, keys_first, causal):
    """The tile's scores x scale x log2(e), float32 [query_block, KEY_TILE], or [KEY_TILE,
    query_block] when keys_first (the mass walk sums over queries, and a sum along a row of
    the MMA accumulator stays within a warp where one along a column crosses warps); -inf
    at keys of another document and, if causal, at keys a query cannot see yet. Rows of
    queries that do not vote are left as they are: their lse is +inf."""
    keys = pl.ds(tile * KEY_TILE, KEY_TILE)
    k = k_ref[keys, :]
    key = tile * KEY_TILE + lax.broadcasted_iota(jnp.int32, (KEY_TILE,), 0)
    if keys_first:
      s = pltriton.dot(k, q, trans_b=True) * log2_scale
      as_keys, as_queries = (lambda x: x[:, None]), (lambda x: x[None, :])
    else:
      s = pltriton.dot(q, k, trans_b=True) * log2_scale
      as_keys, as_queries = (lambda x: x[None, :]), (lambda x: x[:, None])
    visible = None
    if causal:
      visible = (as_keys(key) * cmp_stride + cmp_len - 1 <= as_queries(query)) & as_keys(key < count)
    if has_segments:
      same = as_keys(k_seg_ref[keys]) == as_queries(q_seg)
      visible = same if visible is None else visible & same
    return s if visible is None else jnp.where(visible, s, -jnp.inf)

  def base2_lse(q, head):
    """The head's lse x log2(e) per query, +inf for queries that do not vote."""
    if has_lse:
      return jnp.where(votes, lse_ref[head, :] * LOG2E, jnp.inf)

    def running(causal):
      def step(tile, carry):
        row_max, row_sum = carry
        s = scores(q, tile, keys_first=False, causal=causal)
        new_max = jnp.maximum(row_max, s.max(axis=1))
        safe_max = jnp.where(new_max == -jnp.inf, 0.0, new_max)
        row_sum = row_sum * jnp.exp2(row_max - safe_max) + jnp.exp2(s - safe_max[:, None]).sum(axis=1)
        return new_max, row_sum
      return step

    start = (jnp.full((query_block,), -jnp.inf, jnp.float32), jnp.zeros((query_block,), jnp.float32))
    stats = lax.fori_loop(0, open_tiles, running(causal=False), start)
    row_max, row_sum = lax.fori_loop(open_tiles, seen_tiles, running(causal=True), stats)
    return jnp.where(votes & (row_sum > 0), row_max + jnp.log2(jnp.maximum(row_sum, 1e-30)), jnp.inf)

  def add_head(head, _):
    """Adds the head's mass to the block's row: the GQA group's heads share it."""
    q = q_ref[:, head, :]
    lse2 = base2_lse(q, head)

    def add_tile(causal):
      def step(tile, _):
        p = jnp.exp2(scores(q, tile, keys_first=True, causal=causal) - lse2[None, :])
        tile_keys = pl.ds(tile * KEY_TILE, KEY_TILE)
        out_ref[tile_keys] = out_ref[tile_keys] + p.sum(axis=1)
      return step

    lax.fori_loop(0, open_tiles, add_tile(causal=False), None)
    lax.fori_loop(open_tiles, seen_tiles, add_tile(causal=True), None)

  def zeros(tile, _):
    out_ref[pl.ds(tile * KEY_TILE, KEY_TILE)] = jnp.zeros((KEY_TILE,), jnp.float32)

  lax.fori_loop(0, total_tiles, zeros, None)
  lax.fori_loop(0, group, add_head, None)


def _pad_to(x, axis, multiple, value=0):
  extra = -x.shape[axis] % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def compressed_mass(q, k_cmp, lse, q_segments, k_segments, *, scale, cmp_len, cmp_stride, query_block,
                    interpret=False):
  b, length, heads, dim = q.shape
  count, kv_heads = k_cmp.shape[1], k_cmp.shape[2]
  group = heads // kv_heads
  nq = -(-length // query_block)
  if count == 0:
    return jnp.zeros((b, kv_heads, nq, 0), jnp.float32)
  q = _pad_to(q, 1, query_block)
  k_cmp = _pad_to(k_cmp, 1, KEY_TILE)
  keys = k_cmp.shape[1]
  has_lse, has_segments = lse is not None, q_segments is not None
  lse = _pad_to(lse.astype(jnp.float32), 2, query_block) if has_lse else jnp.zeros((b, heads, 1), jnp.float32)
  if has_segments:
    q_segments = _pad_to(q_segments.astype(jnp.int32), 1, query_block)
    k_segments = _pad_to(k_segments.astype(jnp.int32), 1, KEY_TILE, -1)
  else:
    q_segments = k_segments = jnp.zeros((b, 1), jnp.int32)
  kernel = functools.partial(_kernel, scale=scale, cmp_len=cmp_len, cmp_stride=cmp_stride, query_block=query_block,
                             length=length, count=count, group=group, has_lse=has_lse, has_segments=has_segments)
  lse_spec = (pl.BlockSpec((None, group, query_block), lambda i, h, n: (n, h, i)) if has_lse
              else pl.BlockSpec((None, None, 1), lambda i, h, n: (n, 0, 0)))
  q_seg_spec = (pl.BlockSpec((None, query_block), lambda i, h, n: (n, i)) if has_segments
                else pl.BlockSpec((None, 1), lambda i, h, n: (n, 0)))
  k_seg_spec = (pl.BlockSpec((None, keys), lambda i, h, n: (n, 0)) if has_segments
                else pl.BlockSpec((None, 1), lambda i, h, n: (n, 0)))
  mass = pl.pallas_call(
      kernel,
      grid=(nq, kv_heads, b),
      in_specs=[pl.BlockSpec((None, query_block, group, dim), lambda i, h, n: (n, i, h, 0)),
                pl.BlockSpec((None, keys, None, dim), lambda i, h, n: (n, 0, h, 0)),
                lse_spec, q_seg_spec, k_seg_spec],
      out_specs=pl.BlockSpec((None, None, None, keys), lambda i, h, n: (n, h, i, 0)),
      out_shape=jax.ShapeDtypeStruct((b, kv_heads, nq, keys), jnp.float32),
      compiler_params=pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=2),
      interpret=interpret, name='compressed_mass',
  )(q, k_cmp, lse, q_segments, k_segments)
  return mass[..., :count]


def unavailable(q, k_cmp, lse, q_segments, k_segments, query_block, *, interpret=False):
  if q.shape[-1] not in HEAD_DIMS:
    return f'needs head_dim in {HEAD_DIMS}, got {q.shape[-1]}'
  if query_block not in QUERY_BLOCKS:
    return f'needs query_block in {QUERY_BLOCKS}, got {query_block}'
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k_cmp.dtype != q.dtype:
    return f'needs bfloat16 or float16 q and k_cmp of one dtype, got {q.dtype}, {k_cmp.dtype}'
  if not interpret and jax.default_backend() != 'gpu':
    return f'runs on a GPU, not {jax.default_backend()}'
  return None


IMPLEMENTATIONS = (
    Implementation('triton', compressed_mass, None, platforms=('gpu',), unavailable=unavailable),
    Implementation('triton_interpreted', functools.partial(compressed_mass, interpret=True), None,
                   platforms=('cpu', 'gpu'), unavailable=functools.partial(unavailable, interpret=True)),
)
