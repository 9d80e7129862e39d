"""The element masks block-sparse plans should stand for, built in numpy from the mask
functions' per-element truth (`Mask.elements`), segment ids and chosen block sets, never
from a plan: tests compare plans and kernels against these.

Every function returns a bool array [B, Hp, Tq, Tk] (Hp: plan heads); `per_query_head`
widens it to the query heads for a dense attention oracle."""

import functools

import numpy as np
from oracles import repeat_heads

from pallas_kernels.block_sparse_attention import masks


def num_blocks(length, block):
  return -(-length // block)


def mask_truth(mask, q_len, kv_len):
  """[Tq, Tk] the mask function's answer for every (query, key) pair."""
  q = np.arange(q_len)[:, None]
  k = np.arange(kv_len)[None, :]
  return np.broadcast_to(np.asarray(mask.elements(q, k), bool), (q_len, kv_len))


def same_document(q_segment_ids, kv_segment_ids):
  """[B, Tq, Tk]: query and key in the same document."""
  return np.asarray(q_segment_ids)[:, :, None] == np.asarray(kv_segment_ids)[:, None, :]


def segment_pair(segment_ids, q_segment_ids, kv_segment_ids):
  """(q ids, kv ids) as the builders take them: `segment_ids` stands for both."""
  if segment_ids is not None:
    return segment_ids, segment_ids
  return q_segment_ids, kv_segment_ids


def with_documents(allowed, segment_ids=None, q_segment_ids=None, kv_segment_ids=None):
  """allowed [B, Hp, Tq, Tk] (B may be 1) narrowed to same-document pairs."""
  q_ids, kv_ids = segment_pair(segment_ids, q_segment_ids, kv_segment_ids)
  if q_ids is None:
    return allowed
  return allowed & same_document(q_ids, kv_ids)[:, None]


def document_bounds(ids):
  """[(start, end)] of each run of equal ids in a row."""
  cuts = [0, *(np.flatnonzero(ids[1:] != ids[:-1]) + 1), len(ids)]
  return list(zip(cuts[:-1], cuts[1:]))


def per_document(truth_of_length, segment_ids):
  """[B, T, T]: in each document (a run of equal ids) truth_of_length(n) [n, n] at its
  positions counted from its first token, as if it were alone; False across documents."""
  ids = np.asarray(segment_ids)
  allowed = np.zeros(ids.shape + ids.shape[1:], bool)
  for row, row_ids in enumerate(ids):
    for start, end in document_bounds(row_ids):
      allowed[row, start:end, start:end] = truth_of_length(end - start)
  return allowed


def expand_blocks(block_matrix, q_len, kv_len, block_q, block_kv):
  """[..., nQ, nK] per-block values -> [..., Tq, Tk] per element."""
  q_block = np.arange(q_len) // block_q
  k_block = np.arange(kv_len) // block_kv
  return np.asarray(block_matrix)[..., q_block[:, None], k_block[None, :]]


def mask_oracle(mask, *, q_len, kv_len=None, batch=1, segment_ids=None, q_segment_ids=None, kv_segment_ids=None):
  """What plan_from_mask(mask, ...) should allow: the mask function within documents."""
  kv_len = q_len if kv_len is None else kv_len
  allowed = mask_truth(mask, q_len, kv_len)[None, None]
  allowed = with_documents(allowed, segment_ids, q_segment_ids, kv_segment_ids)
  return np.broadcast_to(allowed, (max(batch, allowed.shape[0]), 1, q_len, kv_len))


def block_mask_oracle(block_mask, *, q_len, kv_len=None, block_q=128, block_kv=128, mask=masks.Causal(),
                      segment_ids=None, q_segment_ids=None, kv_segment_ids=None):
  """What plan_from_block_mask(block_mask, ...) should allow: an element whose (q block,
  kv block) is chosen, that the mask function allows, within documents."""
  kv_len = q_len if kv_len is None else kv_len
  chosen = expand_blocks(np.asarray(block_mask, bool), q_len, kv_len, block_q, block_kv)
  allowed = chosen & mask_truth(mask, q_len, kv_len)
  return with_documents(allowed, segment_ids, q_segment_ids, kv_segment_ids)


def blocks_with_any(truth, block_q, block_kv):
  """[nQ, nK]: blocks of a [Tq, Tk] bool array holding at least one True."""
  q_len, kv_len = truth.shape
  nq, nk = num_blocks(q_len, block_q), num_blocks(kv_len, block_kv)
  padded = np.zeros((nq * block_q, nk * block_kv), bool)
  padded[:q_len, :kv_len] = truth
  return padded.reshape(nq, block_q, nk, block_kv).any((1, 3))


def eligible_blocks(mask, q_len, kv_len, block_q, block_kv):
  """[nQ, nK]: blocks the mask's block answer allows (masks.py: exact for a primitive,
  folded over the parts of a combination: `&` needs every part, `|` some part), so a
  combination's block may be eligible and still hold no allowed element."""
  if isinstance(mask, (masks.And, masks.Or)):
    fold = np.logical_and if isinstance(mask, masks.And) else np.logical_or
    return functools.reduce(fold, (eligible_blocks(part, q_len, kv_len, block_q, block_kv) for part in mask.parts))
  return blocks_with_any(mask_truth(mask, q_len, kv_len), block_q, block_kv)


def diagonal_blocks(q_len, kv_len, block_q, block_kv):
  """[nQ, nK]: blocks holding an element with q index == k index."""
  return blocks_with_any(np.eye(q_len, kv_len, dtype=bool), block_q, block_kv)


def top_blocks(scores, keep, *, q_len, kv_len=None, block_q=128, block_kv=128, mask=masks.Causal(),
               keep_diagonal=True, keep_first=True):
  """[B, Hp, nQ, nK] the blocks plan_from_block_scores promises: per q block row, among
  the eligible blocks, the forced ones (those holding the diagonal, and block 0, when
  asked) and then the highest scores, `keep` in all (or all the forced ones when they are
  more); equal scores go to the lower block index."""
  kv_len = q_len if kv_len is None else kv_len
  scores = np.asarray(scores, np.float32)
  eligible = eligible_blocks(mask, q_len, kv_len, block_q, block_kv)
  forced = np.zeros_like(eligible)
  if keep_diagonal:
    forced |= diagonal_blocks(q_len, kv_len, block_q, block_kv)
  if keep_first:
    forced[:, 0] = True
  forced &= eligible
  chosen = np.zeros(scores.shape, bool)
  for index in np.ndindex(*scores.shape[:-1]):
    row = index[-1]
    picked = list(np.flatnonzero(forced[row]))
    # Descending score, then ascending block index.
    candidates = sorted(np.flatnonzero(eligible[row] & ~forced[row]), key=lambda j: (-scores[index][j], j))
    picked += candidates[:max(keep - len(picked), 0)]
    chosen[index][picked] = True
  return chosen


def block_scores_oracle(scores, keep, *, q_len, kv_len=None, block_q=128, block_kv=128, mask=masks.Causal(),
                        keep_diagonal=True, keep_first=True, segment_ids=None, q_segment_ids=None,
                        kv_segment_ids=None):
  """What plan_from_block_scores(scores, keep, ...) should allow."""
  sizes = dict(q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv, mask=mask)
  chosen = top_blocks(scores, keep, keep_diagonal=keep_diagonal, keep_first=keep_first, **sizes)
  return block_mask_oracle(chosen, segment_ids=segment_ids, q_segment_ids=q_segment_ids,
                           kv_segment_ids=kv_segment_ids, **sizes)


def per_query_head(allowed, num_heads):
  """[B, Hp, Tq, Tk] -> [B, H, Tq, Tk]: query head h uses plan head h // (H // Hp)."""
  return repeat_heads(np.asarray(allowed), num_heads, axis=1)
