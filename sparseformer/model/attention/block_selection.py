"""Choosing key blocks per query block from scores: what NSA, InfLLM-V2 and MoBA share.

Each mechanism scores coarse key blocks ("selection blocks" of `select_block` tokens: NSA's
l', InfLLM-V2's blocks, MoBA's blocks) for every query block of the kernel's
`block` tokens, one row of scores per kv head (a GQA group shares its choice) or per
query head. Then, here:

  - documents: a query block may take the selection blocks at or before its own whose
    last document is its first document (keys of other documents are masked anyway: a
    block of theirs would be a wasted place), and always its own;
  - one block late: query block I ranks with the scores of query block I - 1
    (`previous_block_votes`). Scores summed over block I's own tokens would make token t's
    blocks depend on the queries of the later tokens of its block: the future would leak
    into training (the layer's output at t would change with tokens after t), and
    decoding could not make the same choice. Block 0 has only its forced blocks;
  - forced blocks: the `local` most recent selection blocks (the own one included) and,
    when asked, the block where the query block's document starts;
  - then the best-scoring allowed blocks up to `count` in all, exactly (ties to the
    earlier block): a rule keeping every block tied with the count-th score would keep
    every zero-score block in rows where fewer than `count` have any score;
  - spread onto the kernel's key blocks: bool [B, Hp, nQ, nK].
"""

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.model.attention.compressed_scores import (compressed_key_segments, selection_scores)
from sparseformer.model.attention.gate import num_blocks


def selection_documents(segment_ids, batch, length, block, select_block):
  """(allowed, first) of query blocks of `block` tokens against selection blocks:
  allowed [B, nQ, nS] the blocks whose keys some query of the block may see (at or before
  its own selection block; an earlier block only when its last document is the query
  block's first), first [B, nQ] the selection block where that document starts (0 without
  documents)."""
  nq, ns = num_blocks(length, block), num_blocks(length, select_block)
  own = np.arange(nq) * block // select_block
  causal = np.arange(ns)[None, :] <= own[:, None]
  if segment_ids is None:
    return jnp.broadcast_to(causal, (batch, nq, ns)), jnp.zeros((batch, nq), jnp.int32)
  segment_ids = segment_ids.astype(jnp.int32)
  query_first = segment_ids[:, np.arange(nq) * block]
  key_last = segment_ids[:, np.minimum((np.arange(ns) + 1) * select_block, length) - 1]
  same = query_first[:, :, None] == key_last[:, None, :]
  allowed = causal & (same | (np.arange(ns)[None, :] == own[:, None]))
  position = jnp.arange(length)
  starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], 1)
  document_start = jax.lax.cummax(jnp.where(starts, position, 0), axis=1)[:, np.arange(nq) * block]
  return allowed, document_start // select_block


def previous_block_votes(scores):
  """scores [B, Hp, nQ, nS] moved one query block on: block I gets block I - 1's (0 for I = 0)."""
  return jnp.pad(scores, ((0, 0), (0, 0), (1, 0), (0, 0)))[:, :, :-1]


def choose_blocks(scores, allowed, first, *, block, select_block, count, local):
  """bool [B, Hp, nQ, nK]: per query block, the first block of its document (`first`
  [B, nQ]; None: not forced), its `local` most recent selection blocks and the
  best-scoring allowed ones up to `count` selection blocks (ties to the earlier block), at
  the granularity of kernel blocks (module docstring)."""
  nq, ns = scores.shape[-2:]
  own = jnp.arange(nq) * block // select_block
  selection = jnp.arange(ns)
  forced = (selection[None, :] <= own[:, None]) & (selection[None, :] > own[:, None] - local)
  if first is not None:
    forced = forced[None] | (selection[None, None, :] == first[:, :, None])
  forced = forced & allowed  # [B, nQ, nS]
  ranked = jnp.where(forced[:, None], jnp.inf, jnp.where(allowed[:, None], scores, -jnp.inf))
  _, best = jax.lax.top_k(ranked, min(count, ns))
  chosen = jax.nn.one_hot(best, ns, dtype=bool).any(-2) & allowed[:, None]
  chosen = chosen | forced[:, None]
  return jnp.repeat(chosen, select_block // block, axis=-1)[..., :nq]  # key blocks: as many as query blocks


def choose_by_compressed_scores(q, k_cmp, lse, segment_ids, *, scale, block, cmp_len, cmp_stride, select_block,
                                select_count, local_blocks):
  """(chosen [B, Hkv, nQ, nK] kernel blocks, allowed [B, nQ, nS] selection blocks): NSA's
  and InfLLM-V2's choice, from the previous query block's attention over the compressed
  keys k_cmp [B, Tc, Hkv, D] (lse: that attention's log-sum-exp, None: computed)."""
  batch, length = q.shape[:2]
  scores = selection_scores(q, k_cmp, lse, scale=scale, cmp_len=cmp_len, cmp_stride=cmp_stride,
                            select_block=select_block, query_block=block, segment_ids=segment_ids,
                            kv_segment_ids=compressed_key_segments(segment_ids, cmp_len, cmp_stride))
  allowed, first = selection_documents(segment_ids, batch, length, block, select_block)
  chosen = choose_blocks(previous_block_votes(scores), allowed, first, block=block, select_block=select_block,
                         count=select_count, local=local_blocks)
  return chosen, allowed


def chosen_fraction(chosen, allowed, block, select_block):
  """Chosen selection blocks over the allowed ones (every plan head, query block and row)."""
  per_selection = chosen[..., ::select_block // block]  # [B, Hp, nQ, nS]
  return (per_selection & allowed[:, None]).sum() / (allowed.sum() * chosen.shape[1])
