"""Dynamic mask attention's key selection without a T x T mask: ranks, thresholds, plan.

Per (batch, kv head) every key gets a unique integer rank from its score delta: larger
delta, larger rank; among equal deltas the earlier key ranks higher. Query i keeps the
keys j <= i of its own document whose rank is among the w largest there:

    keep(i, j) = (j <= i) & same_document(i, j) & (rank_j >= threshold_i)

with threshold_i the w-th largest rank of that causal prefix (-1, i.e. keep all, when the
prefix holds fewer than w keys). Ranks are unique, so exactly min(w, prefix) keys are
kept. The thresholds come from a scan over query chunks carrying the top-w ranks of the
prefix of the current document (memory O(w x chunk)); inside a chunk a query's threshold
is the candidate with exactly w - 1 larger ones (comparisons and prefix counts, no sort per
query). Documents are contiguous runs of segment ids (as the packer writes them): the
carried set restarts at a new id.

The block-sparse plan (one per kv head) visits tile (I, J) when some key of J that a
query of I may reach causally ranks at least the smallest threshold of I, and marks it
full when it is causally full within one document and the smallest rank of J reaches the
largest threshold of I. The kernels apply the rank rule inside partial tiles.

Block smoothing (`block_smooth`, docs/dynamic_mask.md) replaces the rank rule by a choice
of whole key blocks per query block, voted on the kept set of the block's first query
(`block_start_thresholds`), so that visited tiles need no element mask beyond causality
and documents: the plan carries no ranks.
"""

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.masks import EMPTY, PARTIAL
from pallas_kernels.block_sparse_attention.plan import (combined_kinds, document_starts, from_kinds, num_blocks,
                                                        plan_from_block_mask)
from sparseformer.errors import UserError

KEEP_ALL = -1  # threshold of a query whose prefix has at most w keys
SMOOTHINGS = ('none', 'majority', 'budget')  # block_smooth values (docs/dynamic_mask.md)
INT_MAX = jnp.iinfo(jnp.int32).max


def key_ranks(scores):
  """Unique int32 ranks [B, H, T] of scores [B, H, T]: T - 1 for the largest score, ties to
  the earlier key."""
  t = scores.shape[-1]
  order = jnp.argsort(-scores, axis=-1, stable=True)  # largest first, earlier index first among ties
  position = jnp.argsort(order, axis=-1)
  return (t - 1 - position).astype(jnp.int32)


def _chunked(x, chunk, fill):
  """[B, H, T] -> [n, B, H, chunk] padded with `fill` (scan over the leading axis)."""
  b, h, t = x.shape
  n = num_blocks(t, chunk)
  x = jnp.pad(x, ((0, 0), (0, 0), (0, n * chunk - t)), constant_values=fill)
  return x.reshape(b, h, n, chunk).transpose(2, 0, 1, 3)


def _window_counts(greater, start):
  """greater [B, H, c keys, m] (0/1) -> [B, H, c queries, m]: the sum over the keys
  start_i..i of query i's window (its document inside the chunk, up to itself)."""
  prefix = jnp.pad(jnp.cumsum(greater, axis=2), ((0, 0), (0, 0), (1, 0), (0, 0)))  # prefix[k]: keys < k
  before = jnp.take_along_axis(prefix, start[:, None, :, None], axis=2)
  return prefix[:, :, 1:] - before


def _chunk_thresholds(top, carry_valid, chunk_ranks, start, window):
  """[B, H, c]: per query i of a chunk, the `window`-th largest of the carried ranks `top`
  [B, H, w] (descending; where carry_valid [B, c]) and the chunk's ranks of keys start_i..i,
  KEEP_ALL if fewer. With unique ranks it is the one candidate with exactly window - 1
  larger candidates: counting them needs [c, w] comparisons, no sort per query."""
  c = chunk_ranks.shape[-1]
  key, query = jnp.arange(c)[None, :], jnp.arange(c)[:, None]
  in_window = (key >= start[:, :, None]) & (key <= query)[None]  # [B, query, key]
  carry_mask = carry_valid[:, None, :, None]
  # Carried rank p has p larger carried ranks (descending, unique) plus the window's larger keys.
  chunk_over_carry = _window_counts((chunk_ranks[..., :, None] > top[..., None, :]).astype(jnp.int32), start)
  carry_hit = carry_mask & (top[..., None, :] >= 0) & (jnp.arange(window) + chunk_over_carry == window - 1)
  from_carry = jnp.where(carry_hit, top[..., None, :], KEEP_ALL).max(-1)
  carry_over_chunk = (top[..., None, :] > chunk_ranks[..., :, None]).sum(-1)  # [B, H, key]
  chunk_over_chunk = _window_counts((chunk_ranks[..., :, None] > chunk_ranks[..., None, :]).astype(jnp.int32), start)
  counts = chunk_over_chunk + jnp.where(carry_mask, carry_over_chunk[..., None, :], 0)
  chunk_hit = in_window[:, None] & (chunk_ranks[..., None, :] >= 0) & (counts == window - 1)
  from_chunk = jnp.where(chunk_hit, chunk_ranks[..., None, :], KEEP_ALL).max(-1)
  return jnp.maximum(from_carry, from_chunk)



def query_thresholds(ranks, window, segment_ids=None, chunk=128):
  """threshold_i [B, H, T] int32: the `window`-th largest rank among the keys j <= i of
  query i's document, KEEP_ALL where there are fewer than `window` such keys."""
  b, h, t = ranks.shape
  if window >= t:
    return jnp.full(ranks.shape, KEEP_ALL, jnp.int32)
  segments = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

  def step(carry, chunk_inputs):
    top, top_segment = carry  # [B, H, w] ranks of the current document's prefix, descending; [B] its id
    chunk_ranks, chunk_segments = chunk_inputs  # [B, H, c], [B, c]
    carry_valid = top_segment[:, None] == chunk_segments
    thresholds = _chunk_thresholds(top, carry_valid, chunk_ranks, document_starts(chunk_segments), window)
    return _carried_top(top, top_segment, chunk_ranks, chunk_segments, window), thresholds

  init = (jnp.full((b, h, window), KEEP_ALL, jnp.int32), segments[:, 0])
  _, thresholds = lax.scan(step, init, (_chunked(ranks, chunk, KEEP_ALL), _segment_chunks(segments, chunk)))
  return thresholds.transpose(1, 2, 0, 3).reshape(b, h, -1)[:, :, :t]


def _segment_chunks(segments, chunk):
  return _chunked(segments[:, None, :], chunk, -1)[:, :, 0]  # [n, B, chunk], padding in no document


def _carried_top(top, top_segment, chunk_ranks, chunk_segments, window):
  """The scan's next carry: the top-`window` ranks (descending, KEEP_ALL-padded) of the
  prefix of the document of the chunk's last position, and that document's id."""
  last_segment = chunk_segments[:, -1]
  candidates = jnp.concatenate([top, chunk_ranks], axis=-1)  # [B, H, w + c]
  still_valid = jnp.concatenate([jnp.broadcast_to((top_segment == last_segment)[:, None], top.shape[::2]),
                                 chunk_segments == last_segment[:, None]], axis=-1)
  top = lax.top_k(jnp.where(still_valid[:, None], candidates, KEEP_ALL), window)[0]
  return top, last_segment


def block_start_thresholds(ranks, window, segment_ids=None, block=128):
  """[B, H, nQ]: the threshold of the first query of each block of `block` queries (the
  values of query_thresholds there), from the carried top-`window` ranks and the query's
  own key: no per-query work."""
  b, h, t = ranks.shape
  if window >= t:
    return jnp.full((b, h, num_blocks(t, block)), KEEP_ALL, jnp.int32)
  segments = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids.astype(jnp.int32)

  def step(carry, chunk_inputs):
    top, top_segment = carry
    chunk_ranks, chunk_segments = chunk_inputs
    same_document = (top_segment == chunk_segments[:, 0])[:, None, None]
    candidates = jnp.concatenate([jnp.where(same_document, top, KEEP_ALL), chunk_ranks[..., :1]], axis=-1)
    threshold = lax.top_k(candidates, window)[0][..., -1]  # KEEP_ALL when fewer than `window` are valid
    return _carried_top(top, top_segment, chunk_ranks, chunk_segments, window), threshold

  init = (jnp.full((b, h, window), KEEP_ALL, jnp.int32), segments[:, 0])
  _, thresholds = lax.scan(step, init, (_chunked(ranks, block, KEEP_ALL), _segment_chunks(segments, block)))
  return thresholds.transpose(1, 2, 0)


def _blocked(x, block, fill):
  b, h, t = x.shape
  n = num_blocks(t, block)
  return jnp.pad(x, ((0, 0), (0, 0), (0, n * block - t)), constant_values=fill).reshape(b, h, n, block)


def rank_block_kinds(ranks, thresholds, base_kinds, block_q, block_kv):
  """[B, H, nQ, nK] kinds: the causal/document kinds `base_kinds` [B, 1 or H, nQ, nK]
  narrowed by the rank rule (see the module docstring)."""
  t = ranks.shape[-1]
  key_blocks = _blocked(ranks, block_kv, KEEP_ALL)  # [B, H, nK, bk]
  reach_max = lax.cummax(key_blocks, axis=3)  # max rank of the block's keys up to each one
  key_min = jnp.where(key_blocks >= 0, key_blocks, INT_MAX).min(-1)  # padded keys (rank -1) left out
  nq, nk = base_kinds.shape[-2:]
  last_query = jnp.minimum((jnp.arange(nq) + 1) * block_q, t) - 1
  reach = jnp.clip(last_query[:, None] - jnp.arange(nk)[None, :] * block_kv, 0, block_kv - 1)  # [nQ, nK]
  reachable_max = jnp.take_along_axis(reach_max[:, :, None], reach[None, None, :, :, None], axis=-1)[..., 0]
  threshold_min = _blocked(thresholds, block_q, INT_MAX).min(-1)  # [B, H, nQ]
  threshold_max = _blocked(thresholds, block_q, KEEP_ALL).max(-1)
  active = reachable_max >= threshold_min[..., None]
  full = key_min[:, :, None, :] >= threshold_max[..., None]
  kinds = jnp.where(full, base_kinds, jnp.minimum(base_kinds, PARTIAL))
  return jnp.where(active, kinds, EMPTY)


def dynamic_mask_plan(scores, window, *, block_q=128, block_kv=128, segment_ids=None):
  """(plan with one plan head per kv head, thresholds [B, H, T]) of the top-`window`
  selection by scores [B, Hkv, T] (gradients are not taken through the selection)."""
  scores = lax.stop_gradient(scores).astype(jnp.float32)
  b, _, t = scores.shape
  ranks = key_ranks(scores)
  thresholds = query_thresholds(ranks, window, segment_ids, chunk=block_q)
  segments = None if segment_ids is None else segment_ids.astype(jnp.int32)
  base = combined_kinds(masks.Causal(), t, t, block_q, block_kv, b, segments, segments)
  kinds = rank_block_kinds(ranks, thresholds, base, block_q, block_kv)
  plan = from_kinds(kinds, masks.Causal(), t, t, block_q, block_kv, segments, segments,
                    q_threshold=thresholds, key_rank=ranks)
  return plan, thresholds


def vote(counts, voted, forced, window, block_kv, smoothing):
  """bool [..., nK]: the voted blocks kept. counts [..., nK]: keys of each block that the
  first query keeps; voted, forced: bool [..., nK] (see smoothed_block_mask). majority:
  more than half of the block; budget: the most counts (ties to the later block), as many
  as bring the forced and chosen blocks to ceil(window / block_kv)."""
  if smoothing not in SMOOTHINGS[1:]:
    raise UserError(f'block_smooth={smoothing!r}: use {" or ".join(SMOOTHINGS[1:])} (none is no smoothing)')
  if smoothing == 'majority':
    return voted & (2 * counts > block_kv)
  nk = counts.shape[-1]
  slots = jnp.maximum(num_blocks(window, block_kv) - forced.sum(-1, keepdims=True), 0)
  score = jnp.where(voted, counts * nk + jnp.arange(nk), -1)  # unique: equal counts go to the later block
  place = jnp.argsort(jnp.argsort(-score, axis=-1), axis=-1)
  return voted & (place < slots)


def _block_counts(ranks, thresholds, block_kv):
  """[B, H, nQ, nK]: keys of each key block with rank >= each query block's threshold
  [B, H, nQ], by binary search in the sorted blocks (no [nQ, T] comparison array)."""
  sorted_blocks = jnp.sort(_blocked(ranks, block_kv, KEEP_ALL - 1), axis=-1)  # padding: below every threshold
  below = jax.vmap(lambda keys, taus: jnp.searchsorted(keys, taus, side='left'), in_axes=(0, None))  # per key block
  below = jax.vmap(jax.vmap(below))(sorted_blocks, thresholds)  # [B, H, nK, nQ]
  return block_kv - jnp.swapaxes(below, -1, -2)


def smoothed_block_mask(ranks, window, smoothing, block_q, block_kv, segment_ids=None):
  """bool [B, H, nQ, nK]: the key blocks each query block keeps under block smoothing
  (docs/dynamic_mask.md). f = the block's first query, s = the start of f's document:
  kept are the blocks that reach f or later (diagonal), the block holding s, and among
  the blocks strictly between those (all inside f's prefix) the ones the vote picks,
  by the number of their keys that f keeps (rank >= f's threshold)."""
  b, h, t = ranks.shape
  nq, nk = num_blocks(t, block_q), num_blocks(t, block_kv)
  first_query = jnp.arange(nq) * block_q
  last_query = jnp.minimum(first_query + block_q, t) - 1
  thresholds = block_start_thresholds(ranks, window, segment_ids, block_q)  # [B, H, nQ]
  counts = _block_counts(ranks, thresholds, block_kv)  # [B, H, nQ, nK]
  starts = first_query - document_prefix_lengths(segment_ids, t, b)[:, first_query] + 1  # [B, nQ]
  key_block = jnp.arange(nk)
  diagonal = ((key_block + 1) * block_kv > first_query[:, None]) & (key_block * block_kv <= last_query[:, None])
  first = key_block == (starts // block_kv)[..., None]  # [B, nQ, nK]
  voted = (key_block > (starts // block_kv)[..., None]) & ((key_block + 1) * block_kv <= first_query[:, None])
  forced = (diagonal | first)[:, None]
  chosen = vote(counts, jnp.broadcast_to(voted[:, None], counts.shape), forced, window, block_kv, smoothing)
  return forced | chosen


def smoothed_plan(scores, window, smoothing, *, block_q=128, block_kv=128, segment_ids=None):
  """(plan with one plan head per kv head and no rank rule, block mask [B, H, nQ, nK]) of
  the block-smoothed top-`window` selection by scores [B, Hkv, T]."""
  scores = lax.stop_gradient(scores).astype(jnp.float32)
  t = scores.shape[-1]
  keep = smoothed_block_mask(key_ranks(scores), window, smoothing, block_q, block_kv, segment_ids)
  segments = None if segment_ids is None else segment_ids.astype(jnp.int32)
  plan = plan_from_block_mask(keep, q_len=t, block_q=block_q, block_kv=block_kv, segment_ids=segments)
  return plan, keep


def smoothed_kept_fraction(keep, length, block_q, block_kv, segment_ids):
  """Kept (query, key) pairs over causal in-document pairs under a block mask keep
  [B, H, nQ, nK] with the causal and document rule inside blocks. Query i's keys lie in
  the blocks lo (its document's start s) to hi (itself): partial at both ends, whole between."""
  b, h, nq, nk = keep.shape
  i = jnp.arange(length)
  prefix = document_prefix_lengths(segment_ids, length, b)  # [B, T]
  start = i - prefix + 1
  lo, hi = start // block_kv, i // block_kv
  row = (i // block_q) * (nk + 1)
  keep = keep.astype(jnp.int32)
  before = jnp.pad(jnp.cumsum(keep, axis=-1), ((0, 0), (0, 0), (0, 0), (1, 0))).reshape(b, h, -1)  # blocks < J
  flat_keep = jnp.pad(keep, ((0, 0), (0, 0), (0, 0), (0, 1))).reshape(b, h, -1)

  def at(table, column):  # table [B, H, nQ * (nK + 1)] at (query i's block, column [B, T])
    return jnp.take_along_axis(table, jnp.broadcast_to(row + column, (b, length))[:, None], axis=-1)

  own = at(flat_keep, hi) * (i + 1 - jnp.maximum(hi * block_kv, start))[:, None]
  middle = block_kv * (at(before, hi) - at(before, lo + 1)) + at(flat_keep, lo) * ((lo + 1) * block_kv - start)[:, None]
  kept = own + jnp.where((lo < hi)[:, None], middle, 0)
  return _pair_ratio(kept, prefix, h)


def document_prefix_lengths(segment_ids, length, batch):
  """[B, T] number of keys j <= i in query i's document (contiguous runs of ids)."""
  positions = jnp.arange(length)
  if segment_ids is None:
    return jnp.broadcast_to(positions + 1, (batch, length))
  return positions - document_starts(segment_ids) + 1


def kept_fraction(thresholds, window, segment_ids):
  """Kept (query, key) pairs over causal in-document pairs: a row keeps `window` keys
  where its threshold is set, all of its prefix otherwise."""
  b, h, t = thresholds.shape
  prefix = document_prefix_lengths(segment_ids, t, b)[:, None, :]
  kept = jnp.where(thresholds >= 0, jnp.minimum(window, prefix), prefix)
  return _pair_ratio(kept, prefix, h)


def _pair_ratio(kept, prefix, heads):
  """float32 sums: int32 ones overflow past 2^31 pairs (T = 32768 with 4 or more heads)."""
  return kept.astype(jnp.float32).sum() / (prefix.astype(jnp.float32).sum() * heads)


def active_tile_fraction(plan, segment_ids):
  """Visited tiles over the causal in-document tiles."""
  b = plan.kv_count.shape[0]
  base = combined_kinds(masks.Causal(), plan.q_len, plan.kv_len, plan.block_q, plan.block_kv, b, segment_ids,
                        segment_ids)
  return plan.kv_count.sum() / jnp.maximum((base != EMPTY).sum() * plan.plan_heads, 1)

