"""The block-sparse plan: which kv blocks each q block visits, and how.

One plan serves every softmax-attention mechanism. Per (batch, plan head, q block) it
holds the count and the indices of the kv blocks to visit, active ones first in
ascending order, each tagged full (no element mask) or partial (the element mask is
computed in the kernel from indices, segment ids and the plan's `mask`); and the same
transposed (per kv block, the q blocks that visit it) for the dK/dV pass.

With `document_positions` the mask reads each token's position within its document
(index - the index of its document's first token), not its index in the packed row, so a
pattern anchored at position 0 (global tokens, grid rows, frames) restarts with every
document, as it does when one document is decoded alone. A document is then a run of
equal segment ids (packed rows hold nothing else; an id reused by two runs makes two
documents). The plan's segment ids hold each token's document start (a distinct value per
document, as ids are), and element_mask subtracts them: kernels need nothing new.

An optional data-dependent rule joins the element mask: with `key_rank` [B, Hp, Tk] and
`q_threshold` [B, Hp, Tq] (int32) a key is visible to a query only where
key_rank >= q_threshold (dynamic mask attention's top-w selection, see
sparseformer/model/attention/dynamic_mask_plan.py).

Plan heads: 1 (shared by all heads), Hkv (one per GQA group) or H (one per query head);
query head h uses plan head h // (H // plan_heads).

Builders are jittable jnp working at block granularity (never an L x L array):
  plan_from_mask          a mask function (causal, window, chunks, global prefix, ...)
  plan_from_block_mask    a boolean [B, Hp, nQ, nK] choice of blocks (learned, routed)
  plan_from_block_scores  top-k blocks per q block row of a score matrix
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention.masks import EMPTY, FULL, PARTIAL, Causal, Mask, shift_invariant_part


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockSparsePlan:
  kv_count: jax.Array  # [B, Hp, nQ] int32: kv blocks each q block visits
  kv_index: jax.Array  # [B, Hp, nQ, nK] int16/32: those blocks first (ascending), then the last repeated
  kv_full: jax.Array  # [B, Hp, nQ, nK] int8: 1 where the block needs no element mask
  q_count: jax.Array  # [B, Hp, nK] int32: q blocks that visit each kv block (dK/dV pass)
  q_index: jax.Array  # [B, Hp, nK, nQ]
  q_full: jax.Array  # [B, Hp, nK, nQ]
  q_segment_ids: Any  # [B, Tq] int32 or None: documents; keys of other documents are masked
  kv_segment_ids: Any  # [B, Tk] int32 or None
  mask: Mask = dataclasses.field(metadata=dict(static=True))  # element rule inside partial blocks
  q_len: int = dataclasses.field(metadata=dict(static=True))
  kv_len: int = dataclasses.field(metadata=dict(static=True))
  block_q: int = dataclasses.field(metadata=dict(static=True))
  block_kv: int = dataclasses.field(metadata=dict(static=True))
  q_threshold: Any = None  # [B, Hp, Tq] int32 or None: a key is visible where key_rank >= q_threshold
  key_rank: Any = None  # [B, Hp, Tk] int32 or None
  # The mask reads positions within documents; the segment ids are then document starts.
  document_positions: bool = dataclasses.field(default=False, metadata=dict(static=True))

  @property
  def has_rank_rule(self):
    return self.key_rank is not None

  @property
  def num_q_blocks(self):
    return self.kv_index.shape[2]

  @property
  def num_kv_blocks(self):
    return self.kv_index.shape[3]

  @property
  def plan_heads(self):
    return self.kv_index.shape[1]

  def max_row_blocks(self):
    """A static bound on the length of any q block's kv list (from the mask's key span),
    or None when only the plan's data knows."""
    span = self.mask.key_span()
    if span is None:
      return None
    return min(self.num_kv_blocks, -(-(span + self.block_q - 1) // self.block_kv) + 1)

  def block_kinds(self):
    """[B, Hp, nQ, nK] EMPTY/PARTIAL/FULL, rebuilt from the q-major lists (tests, rendering)."""
    nk = self.num_kv_blocks
    active = jnp.arange(nk) < self.kv_count[..., None]
    kinds = jnp.where(active, jnp.where(self.kv_full == 1, FULL, PARTIAL), EMPTY)
    out = jnp.zeros(self.kv_index.shape, jnp.int32)
    b, h, i, _ = jnp.indices(self.kv_index.shape)
    return out.at[b, h, i, self.kv_index.astype(jnp.int32)].max(kinds)

  def element_mask(self, q_index, k_index, q_segment=None, k_segment=None, q_threshold=None, k_rank=None):
    """Bool mask inside a partial block: the mask function, the key length, documents
    (segment ids gathered at those indices by the caller) and, when the plan has one, the
    rank rule (threshold and rank gathered likewise). Every implementation uses it."""
    if self.document_positions:
      if q_segment is None:
        raise ValueError('this plan reads positions within documents: pass q_segment and k_segment')
      allowed = self.mask.elements(q_index - q_segment, k_index - k_segment)
    else:
      allowed = self.mask.elements(q_index, k_index)
    allowed = allowed & (k_index < self.kv_len) & (q_index < self.q_len)
    if q_segment is not None:
      allowed = allowed & (q_segment == k_segment)
    if self.has_rank_rule:
      if k_rank is None or q_threshold is None:
        raise ValueError('this plan has a rank rule: pass q_threshold and k_rank to element_mask')
      allowed = allowed & (k_rank >= q_threshold)
    return allowed


def broadcast_batch(plan, batch):
  """A plan built for batch 1 (no segment ids) made to serve `batch` rows."""
  if plan.kv_count.shape[0] == batch:
    return plan
  if plan.kv_count.shape[0] != 1 or plan.q_segment_ids is not None or plan.has_rank_rule:
    raise ValueError(f'a plan for batch {plan.kv_count.shape[0]} cannot serve batch {batch} '
                     '(only a batch-1 plan without segment ids or ranks broadcasts)')
  lists = ('kv_count', 'kv_index', 'kv_full', 'q_count', 'q_index', 'q_full')
  return dataclasses.replace(plan, **{name: jnp.broadcast_to(getattr(plan, name), (batch,) + getattr(plan, name).shape[1:])
                                      for name in lists})


def num_blocks(length, block):
  return -(-length // block)


def index_dtype(count):
  return jnp.int16 if count < 2 ** 15 else jnp.int32


def stable_partition(active, *values):
  """Each of `values` [..., n] with its entries where `active` [..., n] holds moved to the
  front of the row, both parts kept in order: what a stable sort on `not active` gives.
  Each entry is scattered to a position counted with a cumsum, because a sort of every
  row costs far more on a GPU (radix sorts took 6.7 of NSA's 117 ms at 64k)."""
  n = active.shape[-1]
  taken = active.astype(jnp.int32)
  taken_before = jnp.cumsum(taken, axis=-1) - taken
  count = taken.sum(-1, keepdims=True)
  position = jnp.where(active, taken_before, count + jnp.arange(n, dtype=jnp.int32) - taken_before)
  rows = position.size // n
  flat = (position.reshape(rows, n) + (jnp.arange(rows, dtype=position.dtype) * n)[:, None]).reshape(-1)
  scatter = lambda x: jnp.zeros(x.size, x.dtype).at[flat].set(x.reshape(-1), unique_indices=True).reshape(x.shape)
  return tuple(scatter(jnp.broadcast_to(x, active.shape)) for x in values)


def compact(kinds):
  """Per row of [..., n] kinds: (count, indices active-first ascending, full flags)."""
  n = kinds.shape[-1]
  active = kinds != EMPTY
  order, = stable_partition(active, jnp.arange(n, dtype=jnp.int32))
  count = active.sum(-1).astype(jnp.int32)
  # Inactive slots repeat the last active index, so a pipeline that prefetches them moves no new data.
  last = jnp.take_along_axis(order, jnp.maximum(count - 1, 0)[..., None], axis=-1)
  index = jnp.where(jnp.arange(n) < count[..., None], order, last)
  full = (jnp.take_along_axis(kinds, index, axis=-1) == FULL) & (jnp.arange(n) < count[..., None])
  return count, index.astype(index_dtype(n)), full.astype(jnp.int8)


def segment_block_kinds(q_segment_ids, kv_segment_ids, block_q, block_kv):
  """[B, nQ, nK]: EMPTY where the blocks share no document, FULL where both hold the
  same single document, PARTIAL otherwise."""
  def ranges(ids, block):
    b, t = ids.shape
    n = num_blocks(t, block)
    padded = jnp.pad(ids, ((0, 0), (0, n * block - t)), mode='edge').reshape(b, n, block)
    return padded.min(-1), padded.max(-1)
  q_lo, q_hi = ranges(q_segment_ids, block_q)
  k_lo, k_hi = ranges(kv_segment_ids, block_kv)
  q_lo, q_hi = q_lo[:, :, None], q_hi[:, :, None]
  k_lo, k_hi = k_lo[:, None, :], k_hi[:, None, :]
  overlap = (q_lo <= k_hi) & (k_lo <= q_hi)
  single = (q_lo == q_hi) & (k_lo == k_hi) & (q_lo == k_lo)
  return jnp.where(single, FULL, jnp.where(overlap, PARTIAL, EMPTY))


def block_bounds(length, block):
  """(first, end) row indices of each block, the last one cut at `length`."""
  first = jnp.arange(num_blocks(length, block), dtype=jnp.int32) * block
  return first, jnp.minimum(first + block, length)


def mask_block_kinds(mask, q_len, kv_len, block_q, block_kv, shift=0):
  """[nQ, nK] kinds of a mask function, with the ragged last blocks made partial; with
  `shift` (broadcast against [nQ, nK]) the tiles of positions index - shift."""
  (q0, q1), (k0, k1) = block_bounds(q_len, block_q), block_bounds(kv_len, block_kv)
  q0, q1, k0, k1 = q0[:, None], q1[:, None], k0[None, :], k1[None, :]
  kinds = mask.block_kind(q0 - shift, q1 - shift, k0 - shift, k1 - shift)
  ragged = (q1 - q0 < block_q) | (k1 - k0 < block_kv)  # kernels mask the padding there
  return jnp.where(ragged & (kinds == FULL), PARTIAL, kinds)


def from_kinds(kinds, mask, q_len, kv_len, block_q, block_kv, q_segment_ids=None, kv_segment_ids=None,
               q_threshold=None, key_rank=None, document_positions=False):
  """A plan from a [B, Hp, nQ, nK] block classification, with the rank rule if
  q_threshold [B, Hp, Tq] and key_rank [B, Hp, Tk] are given."""
  if (q_threshold is None) != (key_rank is None):
    raise ValueError('give both q_threshold and key_rank, or neither')
  if key_rank is not None:
    b, hp = kinds.shape[:2]
    if q_threshold.shape != (b, hp, q_len) or key_rank.shape != (b, hp, kv_len):
      raise ValueError(f'q_threshold {q_threshold.shape} and key_rank {key_rank.shape} must be '
                       f'{(b, hp, q_len)} and {(b, hp, kv_len)}')
    q_threshold, key_rank = jnp.asarray(q_threshold, jnp.int32), jnp.asarray(key_rank, jnp.int32)
  kv_count, kv_index, kv_full = compact(kinds)
  q_count, q_index, q_full = compact(jnp.swapaxes(kinds, -1, -2))
  return BlockSparsePlan(kv_count, kv_index, kv_full, q_count, q_index, q_full, q_segment_ids, kv_segment_ids,
                         mask, q_len, kv_len, block_q, block_kv, q_threshold, key_rank, document_positions)


def combined_kinds(mask, q_len, kv_len, block_q, block_kv, batch, q_segment_ids, kv_segment_ids):
  """[B, 1, nQ, nK] kinds of a mask function and (if given) documents."""
  kinds = mask_block_kinds(mask, q_len, kv_len, block_q, block_kv)[None, None]
  kinds = jnp.broadcast_to(kinds, (batch, 1) + kinds.shape[2:])
  if q_segment_ids is not None:
    kinds = jnp.minimum(kinds, segment_block_kinds(q_segment_ids, kv_segment_ids, block_q, block_kv)[:, None])
  return kinds


def document_starts(segment_ids):
  """[B, T] int32: the row index of each token's document start, a document being a run of
  equal segment ids."""
  t = segment_ids.shape[1]
  index = jnp.arange(t, dtype=jnp.int32)
  begins = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  return jax.lax.cummax(jnp.where(begins, index, 0), axis=1)


def document_block_kinds(mask, starts, block_q, block_kv):
  """[B, nQ, nK] kinds of `mask` over positions within documents (starts [B, T] from
  document_starts; queries and keys share the row). A tile whose q and kv blocks each lie
  in one and the same document is the mask's tile at those positions; any other tile that
  shares a document is partial, unless the mask's shift-invariant parts (causality, a
  window) rule it out."""
  length = starts.shape[1]
  (q0, q1), (k0, k1) = block_bounds(length, block_q), block_bounds(length, block_kv)
  q_start, k_start = starts[:, q0], starts[:, k0]
  q_single, k_single = q_start == starts[:, q1 - 1], k_start == starts[:, k1 - 1]
  one_document = q_single[:, :, None] & k_single[:, None, :] & (q_start[:, :, None] == k_start[:, None, :])
  inside = mask_block_kinds(mask, length, length, block_q, block_kv, shift=q_start[:, :, None])
  invariant = shift_invariant_part(mask)
  across = PARTIAL if invariant is None else jnp.minimum(mask_block_kinds(invariant, length, length, block_q,
                                                                          block_kv), PARTIAL)
  kinds = jnp.where(one_document, inside, across)
  return jnp.minimum(kinds, segment_block_kinds(starts, starts, block_q, block_kv))


def check_segments(q_segment_ids, kv_segment_ids, segment_ids):
  if segment_ids is not None:
    q_segment_ids = kv_segment_ids = segment_ids
  if (q_segment_ids is None) != (kv_segment_ids is None):
    raise ValueError('give both q_segment_ids and kv_segment_ids, or segment_ids, or neither')
  cast = lambda x: None if x is None else jnp.asarray(x, jnp.int32)
  return cast(q_segment_ids), cast(kv_segment_ids)


def plan_from_mask(mask, *, q_len, kv_len=None, block_q=128, block_kv=128, batch=1, segment_ids=None,
                   q_segment_ids=None, kv_segment_ids=None, document_positions=False):
  """The plan of a mask function (shared by all heads), with documents if segment ids are
  given; with document_positions the mask reads positions within documents (module doc:
  the same plan unless the mask depends on more than q - k)."""
  kv_len = q_len if kv_len is None else kv_len
  q_seg, kv_seg = check_segments(q_segment_ids, kv_segment_ids, segment_ids)
  if document_positions and q_seg is not None and not mask.shift_invariant():
    if segment_ids is None or kv_len != q_len:
      raise ValueError('document_positions needs self-attention over one row: pass segment_ids, not q/kv ids')
    starts = document_starts(q_seg)
    kinds = document_block_kinds(mask, starts, block_q, block_kv)[:, None]
    return from_kinds(kinds, mask, q_len, kv_len, block_q, block_kv, starts, starts, document_positions=True)
  if q_seg is not None:
    batch = q_seg.shape[0]
  kinds = combined_kinds(mask, q_len, kv_len, block_q, block_kv, batch, q_seg, kv_seg)
  return from_kinds(kinds, mask, q_len, kv_len, block_q, block_kv, q_seg, kv_seg)


def plan_from_block_mask(block_mask, *, q_len, kv_len=None, block_q=128, block_kv=128, mask=Causal(),
                         segment_ids=None, q_segment_ids=None, kv_segment_ids=None):
  """The plan of a chosen set of blocks [B, Hp, nQ, nK] (bool). Inside the chosen blocks
  `mask` (causal by default) and documents still apply element by element, so a chosen
  block above the diagonal is dropped and a diagonal block is partial."""
  kv_len = q_len if kv_len is None else kv_len
  q_seg, kv_seg = check_segments(q_segment_ids, kv_segment_ids, segment_ids)
  b = block_mask.shape[0]
  kinds = combined_kinds(mask, q_len, kv_len, block_q, block_kv, b, q_seg, kv_seg)
  kinds = jnp.where(block_mask, kinds, EMPTY)
  return from_kinds(kinds, mask, q_len, kv_len, block_q, block_kv, q_seg, kv_seg)


def diagonal_blocks(q_len, kv_len, block_q, block_kv):
  """[nQ, nK] bool: the blocks holding some element q == k. Both ranges end at the lengths:
  a ragged last block must not claim the diagonal of its padding."""
  (q_start, q_end), (k_start, k_end) = block_bounds(q_len, block_q), block_bounds(kv_len, block_kv)
  return (q_start[:, None] < k_end[None, :]) & (k_start[None, :] < q_end[:, None])


def plan_from_block_scores(scores, keep, *, q_len, kv_len=None, block_q=128, block_kv=128, mask=Causal(),
                           keep_diagonal=True, keep_first=True, segment_ids=None, q_segment_ids=None,
                           kv_segment_ids=None):
  """Top-`keep` kv blocks per q block row of scores [B, Hp, nQ, nK], among the blocks the
  mask allows, plus the diagonal and the first block when asked. Ties go to the lower index.
  'Allows' is the mask's block answer: exact for a primitive mask, but a combination may
  call a block partial that holds no allowed element (masks.py), and such a block can
  take one of the `keep` places."""
  kv_len = q_len if kv_len is None else kv_len
  nq, nk = scores.shape[-2:]
  allowed = mask_block_kinds(mask, q_len, kv_len, block_q, block_kv) != EMPTY
  diagonal = diagonal_blocks(q_len, kv_len, block_q, block_kv)
  forced = jnp.zeros((nq, nk), bool)
  if keep_diagonal:
    forced |= diagonal
  if keep_first:
    forced = forced.at[:, 0].set(True)
  forced &= allowed
  ranked = jnp.where(allowed, scores.astype(jnp.float32), -jnp.inf)
  ranked = jnp.where(forced, jnp.inf, ranked)
  # Stable ranking: position in a descending stable sort, ties broken by block index.
  order = jnp.argsort(-ranked, axis=-1, stable=True)
  rank = jnp.argsort(order, axis=-1)
  chosen = (rank < jnp.maximum(keep, forced.sum(-1, keepdims=True))) & allowed
  return plan_from_block_mask(chosen, q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv, mask=mask,
                              q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, segment_ids=segment_ids)


def density(plan):
  """Fraction of (q block, kv block) tiles visited, per plan head."""
  return plan.kv_count.sum(-1) / (plan.num_q_blocks * plan.num_kv_blocks)


def dense_mask(plan, batch, plan_head):
  """The [Tq, Tk] boolean mask a plan stands for (tests only: this is L x L)."""
  kinds = np.asarray(plan.block_kinds()[batch, plan_head])
  q = np.arange(plan.q_len)[:, None]
  k = np.arange(plan.kv_len)[None, :]
  visited = kinds[q // plan.block_q, k // plan.block_kv] != EMPTY
  full = kinds[q // plan.block_q, k // plan.block_kv] == FULL
  segments = ranks = (None, None)
  if plan.q_segment_ids is not None:
    segments = (np.asarray(plan.q_segment_ids[batch])[:, None], np.asarray(plan.kv_segment_ids[batch])[None, :])
  if plan.has_rank_rule:
    ranks = (plan.q_threshold[batch, plan_head][:, None], plan.key_rank[batch, plan_head][None, :])
  element = np.asarray(plan.element_mask(jnp.asarray(q), jnp.asarray(k), *segments, *ranks))
  return visited & (full | element)
