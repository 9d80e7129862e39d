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

from pallas_kernels.block_sparse_attention.plan import document_starts
from sparseformer.model.attention import kv_cache
from sparseformer.model.attention.compressed_scores import (compressed_after_prompt, compressed_after_token,
                                                            compressed_key_segments, expand_to, selection_scores,
                                                            take_tokens, token_probabilities, token_votes)
from sparseformer.model.attention.gate import num_blocks, rank_blocks


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
  document_start = document_starts(segment_ids)[:, np.arange(nq) * block]
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
  chosen = rank_blocks(scores, allowed, forced_blocks(own, ns, local, first), count)
  return jnp.repeat(chosen, select_block // block, axis=-1)[..., :nq]  # key blocks: as many as query blocks


def forced_blocks(own, num_select, local, first):
  """bool [..., nS]: the `local` selection blocks up to `own` [...] (the query block's
  own) and the block `first` [...] (None: not forced)."""
  selection = jnp.arange(num_select)
  own = own[..., None]
  forced = (selection <= own) & (selection > own - local)
  return forced if first is None else forced | (selection == first[..., None])


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


# ---------------------------------------------------------------------------------------
# Decoding (docs/block_selection.md): one query per row at its own position, each row one
# document from position 0. Query block I chooses from the votes of block I - 1, all of
# them made before block I starts, so the cache keeps the votes summed over the block of
# the newest token ('votes') and over the block before it ('previous_votes'): a vote is
# whatever a mechanism sums over a query block's tokens (MoBA: the queries; NSA and
# InfLLM-V2: their compressed attention's mass per selection block).


def with_votes(cache, shape):
  """The cache with empty vote sums of `shape` [B, ...] (float32)."""
  zeros = jnp.zeros(shape, jnp.float32)
  return {**cache, 'votes': zeros, 'previous_votes': zeros}


def add_vote(cache, vote, positions, block):
  """The cache with the vote [B, ...] of the token at `positions` [B] added; a token that
  starts a query block first moves the finished block's sum to 'previous_votes'."""
  starts = expand_to(positions % block == 0, vote)
  return {**cache, 'votes': jnp.where(starts, 0.0, cache['votes']) + vote,
          'previous_votes': jnp.where(starts, cache['votes'], cache['previous_votes'])}


def prompt_vote_positions(lengths, block):
  """int32 [B, 2 block]: the positions of the query block of each row's last prompt token
  (`lengths` [B]) and of the block before it (negative ones before the row)."""
  first = ((lengths - 1) // block - 1) * block
  return (first[:, None] + jnp.arange(2 * block)).astype(jnp.int32)


def prompt_votes(cache, token_votes, positions, lengths, block):
  """The cache with the vote sums after a prompt: `token_votes` [B, 2 block, ...] of the
  tokens at prompt_vote_positions summed per block, tokens outside the prompt left out."""
  prompt = (positions >= 0) & (positions < lengths[:, None])
  votes = jnp.where(expand_to(prompt, token_votes), token_votes, 0.0).astype(jnp.float32)
  votes = votes.reshape(votes.shape[0], 2, block, *votes.shape[2:]).sum(2)
  return {**cache, 'previous_votes': votes[:, 0], 'votes': votes[:, 1]}


def decode_choice(votes, positions, *, block, select_block, count, local, first):
  """bool [B, Hp, nS]: the selection blocks chosen for the query block of `positions` [B]
  from the previous block's votes [B, Hp, nS], as choose_blocks chooses (first: force
  block 0, where the row's document starts)."""
  ns = votes.shape[-1]
  own = (positions // block * block // select_block)[:, None]  # [B, 1]
  allowed = jnp.arange(ns) <= own[..., None]  # [B, 1, nS]
  forced = forced_blocks(own, ns, local, jnp.zeros_like(own) if first else None)
  return rank_blocks(votes[:, :, None], allowed, forced, count)[:, :, 0]


def visible_slots(chosen, cache, positions, select_block):
  """bool [B, Hp, S]: the cached slots at or before `positions` [B] that lie in a chosen
  selection block (chosen [B, Hp, nS])."""
  block_of = jnp.clip(cache['position'] // select_block, 0, chosen.shape[-1] - 1)  # [B, S]
  return jnp.take_along_axis(chosen, block_of[:, None], axis=-1) & kv_cache.causal(cache, positions)[:, None]


# The cache of the mechanisms that choose by compressed scores (NSA, InfLLM-V2): the
# key/value slots (every token), `compress`'s entries per span ({'k_cmp': ..., ...}, each
# written when its span completes) and the vote sums [B, Hkv, nS]. `options` is the
# mechanism's section: cmp_len, cmp_stride, select_block, select_count, local_blocks.


def init_compressed_cache(cache, compress, options):
  """The empty cache (`cache`: its empty key/value slots)."""
  shapes = jax.eval_shape(compress, cache['k'], cache['v'])
  cache = {**cache, **{name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}}
  batch, slots, kv_heads = cache['k'].shape[:3]
  return with_votes(cache, (batch, kv_heads, num_blocks(slots, options.select_block)))


def prefill_compressed_cache(q, cache, lengths, compress, options, *, scale, block):
  """The cache after prompts of `lengths` [B] (q [B, P, H, D] their queries; `cache`:
  the key/value slots filled): their complete spans compressed, and the votes of the
  last two query blocks of each row."""
  o = options
  cache = compressed_after_prompt(cache, lengths, compress, o.cmp_len, o.cmp_stride)
  positions = prompt_vote_positions(lengths, block)
  votes = compressed_votes(take_tokens(q, positions), positions, cache, options, scale=scale)[1]
  return prompt_votes(cache, votes, positions, lengths, block)


def decode_compressed_cache(q, k, v, cache, positions, compress, options, *, scale, block):
  """(cache, p, visible) of one token per row at `positions` [B]: the cache with its key,
  value, span and vote; p [B, 1, Hkv, G, Tc] its compressed attention's probabilities;
  visible [B, Hkv, S] the slots of the blocks chosen for its query block."""
  o = options
  cache = kv_cache.append(cache, k, v, positions)
  cache = compressed_after_token(cache, positions, compress, o.cmp_len, o.cmp_stride)
  p, votes = compressed_votes(q, positions[:, None], cache, options, scale=scale)
  cache = add_vote(cache, votes[:, 0], positions, block)
  chosen = decode_choice(cache['previous_votes'], positions, block=block, select_block=o.select_block,
                         count=o.select_count, local=o.local_blocks, first=True)
  return cache, p, visible_slots(chosen, cache, positions, o.select_block)


def compressed_votes(q, positions, cache, options, *, scale):
  """(p [B, n, Hkv, G, Tc], votes [B, n, Hkv, nS]) of queries q [B, n, H, D] at
  `positions` [B, n] against the cache's compressed keys."""
  o = options
  p = token_probabilities(q, positions, cache['k_cmp'], scale=scale, cmp_len=o.cmp_len, cmp_stride=o.cmp_stride)
  return p, token_votes(p, cmp_len=o.cmp_len, cmp_stride=o.cmp_stride,
                        num_select=num_blocks(cache['k'].shape[1], o.select_block), select_block=o.select_block)
