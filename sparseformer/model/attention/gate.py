"""SeerAttention's block gate and its teacher, as pure functions (arXiv 2410.13276).

A gate scores (query block I, key block J) pairs from pooled PRE-RoPE projections:
  1. pool each block of queries (average) and keys (max, min, average, concatenated); with
     `previous`, query block I pools the queries of block I - 1 (of I's first document),
     so that no token's blocks depend on later tokens (see gated.py);
  2. per-head linear maps without bias to width dg (no query map when the query has one
     pool and dg == head_dim: keys are then mapped per query head);
  3. rotate both with a dg-dim RoPE table at the block start positions J * block;
  4. S[b, h, I, J] = q_I . k_J / sqrt(dg) on the allowed blocks, -inf elsewhere.
The teacher is the block max-pooled attention map of the layer's own dense causal
attention, renormalised per query-block row; the gate learns it through KL.

Documents (segment ids; contiguous, increasing along the row, 0 = padding at the end):
a key block J < I can only be seen by the queries of I's FIRST document, and only its
LAST document's tokens can be seen from a later block. So a query block is pooled over
the tokens of its first document, a key block over those of its last document, and an
off-diagonal pair is allowed only where those two documents agree: the pools hold exactly
the tokens that can meet, and padding (segment 0) is in no pool. The diagonal block is
always allowed and kept. Without segment ids every block pools all of its tokens (the
ragged last block those it has).

The diagonal key block pools tokens that come after some of its queries: no choice may
depend on its score (top-k forces it; the threshold's softmax leaves it out), or a token's
blocks would depend on later tokens.
"""

import dataclasses

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention.plan import document_starts
from sparseformer.model import rope

POOLS = ('avg', 'max', 'min')


def num_blocks(length, block):
  return -(-length // block)


def to_blocks(x, block):
  """[B, T, ...] -> [B, nb, block, ...], zero-padded to whole blocks."""
  b, t = x.shape[:2]
  n = num_blocks(t, block)
  pad = [(0, 0), (0, n * block - t)] + [(0, 0)] * (x.ndim - 2)
  return jnp.pad(x, pad).reshape(b, n, block, *x.shape[2:])


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class BlockDocuments:
  """Which tokens each block's pools cover and which block pairs may meet."""
  query_tokens: jax.Array  # [B, nb, block] bool: tokens of the block's query pool
  previous_query_tokens: jax.Array  # [B, nb, block] bool: row I, block I - 1's tokens of block I's first document
  key_tokens: jax.Array  # [B, nb, block] bool: tokens of the block's key pool
  allowed: jax.Array  # [B, nb, nb] bool: pairs with visible tokens (block causal, same document)
  forced: jax.Array  # [B, nb, nb] bool: kept whatever the scores (diagonal, start of the document)
  diagonal: jax.Array  # [B, nb, nb] bool: the query block's own key block (it pools later tokens)


def causal_pairs(query_blocks, key_blocks):
  """(allowed, forced, diagonal) bool [..., nQ, nK] of query blocks `query_blocks`
  [..., nQ] (block indices) against key blocks 0 .. key_blocks - 1, in one document
  from position 0: block causal, the diagonal and block 0 forced."""
  key = jnp.arange(key_blocks)
  query = query_blocks[..., None]
  diagonal = key == query
  return key <= query, diagonal | (key == 0), diagonal


def block_documents(segment_ids, length, block, batch=1):
  """The BlockDocuments of rows of `length` tokens; segment_ids [B, T] or None."""
  n = num_blocks(length, block)
  in_row = (jnp.arange(n * block) < length).reshape(1, n, block)
  index = jnp.arange(n)
  diagonal = index[:, None] == index[None, :]
  if segment_ids is None:
    tokens = jnp.broadcast_to(in_row, (batch, n, block))
    allowed, forced, diagonal = (jnp.broadcast_to(x, (batch, n, n)) for x in causal_pairs(index, n))
    return BlockDocuments(tokens, previous_block(tokens), tokens, allowed, forced, diagonal)
  segment_ids = segment_ids.astype(jnp.int32)
  first = segment_ids[:, index * block]  # document of each block's first token
  last = segment_ids[:, jnp.minimum((index + 1) * block, length) - 1]
  blocks = to_blocks(segment_ids, block)
  query_tokens = in_row & (blocks == first[..., None]) & (first != 0)[..., None]
  previous_query_tokens = ((previous_block(blocks) == first[..., None]) & (first != 0)[..., None]
                           & previous_block(jnp.broadcast_to(in_row, blocks.shape)))
  key_tokens = in_row & (blocks == last[..., None]) & (last != 0)[..., None]
  meets = (first[:, :, None] == last[:, None, :]) & (first != 0)[:, :, None] & (index[None, :] < index[:, None])
  allowed = meets | diagonal
  # The block holding the first token of each query block's first document (its sink).
  document_start = document_starts(segment_ids)[:, index * block] // block
  forced = diagonal | ((index[None, None, :] == document_start[:, :, None]) & allowed)
  return BlockDocuments(query_tokens, previous_query_tokens, key_tokens, allowed, forced,
                        jnp.broadcast_to(diagonal, allowed.shape))


def decode_documents(query_block, key_blocks):
  """BlockDocuments of one query block per row, `query_block` [B], against the key
  blocks 0 .. key_blocks - 1 of a cache (one document from position 0): [B, 1, nK]
  pairs, no token masks (decoding pools its own buffers)."""
  return BlockDocuments(None, None, None, *causal_pairs(query_block[:, None], key_blocks))


def previous_block(xb):
  """[B, nb, ...] blocks moved one on: block I holds block I - 1's (zeros / False in block 0)."""
  return jnp.pad(xb, [(0, 0), (1, 0)] + [(0, 0)] * (xb.ndim - 2))[:, :-1]


def pool_blocks(x, tokens, kinds, previous=False):
  """x [B, T, h, d] pooled per block over `tokens` [B, nb, block] -> [B, nb, h, d * len(kinds)]
  in float32; an empty pool is zero. previous: block I pools block I - 1's tokens (the
  tokens mask is then BlockDocuments.previous_query_tokens)."""
  block = tokens.shape[-1]
  xb = to_blocks(x.astype(jnp.float32), block)  # [B, nb, block, h, d]
  if previous:
    xb = previous_block(xb)
  weight = tokens[:, :, :, None, None]
  count = weight.sum(2)
  nonempty = count > 0
  pools = {
      'avg': lambda: (xb * weight).sum(2) / jnp.maximum(count, 1),
      'max': lambda: jnp.where(nonempty, jnp.where(weight, xb, -jnp.inf).max(2), 0.0),
      'min': lambda: jnp.where(nonempty, jnp.where(weight, xb, jnp.inf).min(2), 0.0),
  }
  return jnp.concatenate([pools[kind]() for kind in kinds], axis=-1)


def project(pooled, weight):
  """[B, nb, h, i] through per-head maps [h, i, dg] -> [B, nb, h, dg]; weight None: as is."""
  if weight is None:
    return pooled
  return jnp.einsum('bnhi,hio->bnho', pooled, weight.astype(jnp.float32))


def rotate_blocks(x, first_block, block, inv_freq):
  """RoPE on [B, n, h, dg] at the start positions of blocks first_block, first_block + 1, ...
  (first_block: an int, or [B] one per row)."""
  positions = (jnp.reshape(first_block, (-1, 1)) + jnp.arange(x.shape[1])) * block
  cos, sin = rope.rotary_angles(positions, inv_freq)
  return rope.apply_rotary(x, cos, sin)


def gate_queries(q_pre, tokens, kinds, weight, first_block, inv_freq, previous=False):
  """Pooled, projected, rotated queries [B, nb, H, dg] of pre-RoPE queries [B, T, H, d]
  (previous: each block's from the block before it, rotated at its own start)."""
  pooled = project(pool_blocks(q_pre, tokens, kinds, previous), weight)
  return rotate_blocks(pooled, first_block, tokens.shape[-1], inv_freq)


def gate_keys(k_pre, tokens, kinds, weight, first_block, inv_freq, num_heads):
  """Pooled, projected, rotated keys [B, nb, Hg, dg]; Hg = num_heads when the map is per
  query head (keys repeated to the query heads first), else the kv heads."""
  pooled = pool_blocks(k_pre, tokens, kinds)
  if weight.shape[0] != pooled.shape[2]:
    pooled = jnp.repeat(pooled, num_heads // pooled.shape[2], axis=2)
  return rotate_blocks(project(pooled, weight), first_block, tokens.shape[-1], inv_freq)


def block_scores(queries, keys, allowed):
  """S [B, H, nQ, nK] = q . k / sqrt(dg) where allowed [B, nQ, nK], -inf elsewhere."""
  heads = queries.shape[2]
  keys = jnp.repeat(keys, heads // keys.shape[2], axis=2)
  scores = jnp.einsum('bihd,bjhd->bhij', queries, keys) / jnp.sqrt(jnp.float32(queries.shape[-1]))
  return jnp.where(allowed[:, None], scores, -jnp.inf)


# ---------------------------------------------------------------------------------------
# Selection


def topk_blocks_per_row(density, num_rows):
  """SeerAttention's nz_ratio rule: a fixed k per row giving `density` of a causal triangle."""
  return max(1, int((1 - (1 - density) ** 0.5) * num_rows))


def select_topk(scores, docs, keep):
  """[B, H, nQ, nK] bool: the forced blocks, then the best-scoring allowed ones up to `keep`
  per row, ties to the earlier block: never more than `keep` (decoding gathers that many)."""
  return rank_blocks(scores, docs.allowed, docs.forced, keep)


def rank_blocks(scores, allowed, forced, count):
  """bool [B, Hp, nQ, nS]: the forced blocks and the best-scoring others (scores
  [B, Hp, nQ, nS]) up to `count` in all, of the allowed ones [B, nQ, nS]; ties to the
  earlier block."""
  ns = scores.shape[-1]
  forced = forced & allowed
  ranked = jnp.where(forced[:, None], jnp.inf, jnp.where(allowed[:, None], scores, -jnp.inf))
  _, best = jax.lax.top_k(ranked, min(count, ns))
  chosen = jax.nn.one_hot(best, ns, dtype=bool).any(-2) & allowed[:, None]
  return chosen | forced[:, None]



def select_threshold(scores, docs, threshold):
  """[B, H, nQ, nK] bool: blocks whose softmax gate probability passes `threshold`, plus
  the forced ones. The softmax is over the allowed blocks before the diagonal: the
  diagonal's score (its key pool holds tokens after some of its queries) would otherwise
  let later tokens change which blocks earlier ones see."""
  earlier = (docs.allowed & ~docs.diagonal)[:, None]
  probabilities = jax.nn.softmax(jnp.where(earlier, scores, -jnp.inf), axis=-1, where=earlier)
  return ((probabilities > threshold) & docs.allowed[:, None]) | docs.forced[:, None]


# ---------------------------------------------------------------------------------------
# Teacher and loss


def teacher_block_map(q, k, lse, scale, block, segment_ids):
  """GT [B, H, nb, nb] float32: max over visible (i in I, j in J) of the attention
  probability exp(s_ij - lse_i), each query-block row renormalised to sum 1 (0 for rows
  with no visible pair). q [B, T, H, D] and k [B, T, Hkv, D] post-RoPE, lse [B, H, T]
  from the dense pass. One key block at a time: memory O(T x block), never T x T."""
  b, t, h, d = q.shape
  hkv = k.shape[2]
  n = num_blocks(t, block)
  queries = q.reshape(b, t, hkv, h // hkv, d)
  lse = lse.astype(jnp.float32).reshape(b, hkv, h // hkv, t)
  key_blocks = jnp.moveaxis(to_blocks(k, block), 1, 0)  # [nb, B, block, Hkv, D]
  q_index = jnp.arange(t)
  if segment_ids is not None:
    segment_ids = segment_ids.astype(jnp.int32)
    padded_segments = jnp.pad(segment_ids, ((0, 0), (0, n * block - t)))

  def row_maxima(args):
    j, keys = args
    k_index = j * block + jnp.arange(block)
    visible = ((k_index[None, :] <= q_index[:, None]) & (k_index[None, :] < t))[None]  # [1, T, block]
    if segment_ids is not None:
      k_segments = jax.lax.dynamic_slice_in_dim(padded_segments, j * block, block, axis=1)
      same_document = segment_ids[:, :, None] == k_segments[:, None, :]
      visible = visible & same_document & (segment_ids != 0)[:, :, None]  # padding rows get no teacher
    s = jnp.einsum('btkgd,bjkd->bkgtj', queries, keys, preferred_element_type=jnp.float32) * scale
    log_p = jnp.where(visible[:, None, None], s - lse[..., None], -jnp.inf)
    maxima = jnp.exp(log_p.max(-1))  # [B, Hkv, G, T]
    maxima = jnp.pad(maxima, ((0, 0), (0, 0), (0, 0), (0, n * block - t)))
    return maxima.reshape(b, hkv, h // hkv, n, block).max(-1)  # [B, Hkv, G, nQ]

  pooled = jax.lax.map(row_maxima, (jnp.arange(n), key_blocks))  # [nK, B, Hkv, G, nQ]
  pooled = jnp.moveaxis(pooled, 0, -1).reshape(b, h, n, n)
  total = pooled.sum(-1, keepdims=True)
  return jax.lax.stop_gradient(jnp.where(total > 0, pooled / jnp.where(total > 0, total, 1.0), 0.0))


def gate_kl(teacher, scores, loss_slice):
  """KL(teacher || softmax(scores)) per element, averaged over every element of the rows
  I >= int(nb * loss_slice) (PyTorch KLDivLoss 'mean'), float32."""
  start = int(scores.shape[-2] * loss_slice)
  target = teacher[:, :, start:].astype(jnp.float32)
  log_q = jax.nn.log_softmax(scores[:, :, start:].astype(jnp.float32), axis=-1)
  positive = target > 0
  safe_log_q = jnp.where(positive, log_q, 0.0)
  terms = jnp.where(positive, target * (jnp.log(jnp.where(positive, target, 1.0)) - safe_log_q), 0.0)
  return terms.mean()


def teacher_recall(teacher, chosen):
  """Fraction of the teacher's block mass that the chosen blocks hold (valid rows)."""
  return (teacher * chosen).sum() / jnp.maximum(teacher.sum(), 1e-30)
