"""SeerAttention: a learned gate per layer picks the key blocks of each query block
(Gao et al., arXiv 2410.13276; research/mechanisms.md section 3).

The gate (gate.py) scores block pairs from pooled pre-RoPE queries and keys; the
top-scoring blocks (`gate.selection=topk` at `gate.density` of the causal blocks, the
paper's nz_ratio rule) or those whose softmax score passes `gate.threshold` form a plan
per query head, with the diagonal block and the first block of the document always
kept, and the block-sparse kernels attend over it.

Training (`model.attention.gate`, the OPTIONS below):
  forward=dense   the output comes from the layer's dense causal attention, so the model
                  behaves as its base (distillation of gates on a frozen checkpoint);
  forward=sparse  the output comes from the gated plan (joint training with the LM loss);
  distill         computes the teacher (the block max-pooled map of the dense attention,
                  from a dense pass's LSE and a second pass over key blocks) and adds
                  loss_scale x KL(teacher || softmax(scores)) as aux['losses']['gate_kl'].
Evaluation uses `gate.eval_forward` (sparse by default) at `gate.density`.

The gate reads its inputs under stop_gradient: the KL trains the gate only, the LM loss
trains the rest (it cannot reach the gate through a discrete block choice).

Query block I is scored, by default (`gate.query_block=previous`), from the pooled queries
of block I - 1 (rotated at block I's start): the gate learns to predict block I's map from
the queries before it. SeerAttention pools block I's own queries (`own`), which suits
prefill, where the whole prompt is known; but in language-model training with the sparse
output and in perplexity evaluation a token's blocks then depend on the queries of the
later tokens of its block, a leak of the future (and decoding could not make the same
choice). Block 0 keeps its forced blocks only.

Decoding (query_block=previous; docs/gated_attention.md): the cache holds the key/value
slots, the gate's entry of every finished key block, the current block's pre-RoPE queries
and keys, and the key blocks chosen for it. When a token starts block I, block I - 1's key
entry is written and block I's choice made from block I - 1's queries: the choice the
forward pass makes for block I, kept for the tokens of the block. The top-k rule counts
the blocks of the cache (max_len), so prefill and decoding keep what a forward pass over
rows of max_len tokens keeps.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.block_sparse_attention import block_sparse_attention, masks, plan_from_block_mask, plan_from_mask
from sparseformer.model import rope
from sparseformer.model.attention import gate as gate_lib
from sparseformer.model.attention import kv_cache
from sparseformer.model.attention.base import (HEAD_BLOCKS, KEYS, QUERIES, ROWS, Mechanism, Option, kernel, no_aux,
                                               register, softmax_flops, softmax_scale)
from sparseformer.model.layers import param

FORWARDS = ('sparse', 'dense')
QUERY_BLOCKS = ('previous', 'own')
SELECTIONS = ('topk', 'threshold')


class BlockGate(nnx.Module):
  """The gate's parameters and its prefill and incremental scoring."""

  def __init__(self, dims, rngs):
    g = dims.attention.gate
    d, heads, kv_heads = dims.head_dim, dims.num_heads, dims.num_kv_heads
    self.q_pools, self.k_pools = tuple(g.q_pools), tuple(g.k_pools)
    self.previous_queries = g.query_block == 'previous'
    self.block = dims.attention.block_size
    self.num_heads = heads
    self.rope_cfg = dims.rope
    width = g.width
    # The paper's rule: one query pool at the head width needs no query map; keys are then
    # mapped per query head (GQA keys repeated first).
    maps_queries = len(self.q_pools) != 1 or width != d
    q_in = d * len(self.q_pools)
    self.query = param(rngs, (heads, q_in, width), ('heads', 'gate_in', 'gate_width'), dtype=dims.weight_dtype,
                       std=q_in ** -0.5) if maps_queries else None
    key_heads, key_axis = (kv_heads, 'kv_heads') if maps_queries else (heads, 'heads')
    k_in = d * len(self.k_pools)
    self.key = param(rngs, (key_heads, k_in, width), (key_axis, 'gate_in', 'gate_width'), dtype=dims.weight_dtype,
                     std=k_in ** -0.5)
    self.width = width

  def frequencies(self):
    return rope.inverse_frequencies(self.width, self.rope_cfg)[0]

  def query_weight(self):
    return None if self.query is None else self.query[...]

  def scores(self, q_pre, k_pre, docs):
    """S [B, H, nb, nb] float32 of pre-RoPE q [B, T, H, d], k [B, T, Hkv, d]."""
    q_pre = jax.lax.stop_gradient(q_pre)
    tokens = docs.previous_query_tokens if self.previous_queries else docs.query_tokens
    queries = gate_lib.gate_queries(q_pre, tokens, self.q_pools, self.query_weight(), 0, self.frequencies(),
                                    self.previous_queries)
    return gate_lib.block_scores(queries, self.key_entries(k_pre, docs), docs.allowed)

  def key_entries(self, k_pre, docs):
    """The entries [B, nb, Hg, dg] of every key block of pre-RoPE k [B, T, Hkv, d]."""
    return gate_lib.gate_keys(jax.lax.stop_gradient(k_pre), docs.key_tokens, self.k_pools, self.key[...], 0,
                              self.frequencies(), self.num_heads)

  def key_entry(self, k_pre_block, block_index):
    """The cache entry [B, 1, Hg, dg] of key block `block_index` from its tokens
    [B, n <= block, Hkv, d] (a partial last block is pooled over the tokens it has)."""
    tokens = self._block_tokens(k_pre_block)
    return gate_lib.gate_keys(k_pre_block, tokens, self.k_pools, self.key[...], block_index, self.frequencies(),
                              self.num_heads)

  def query_row(self, q_pre_block, block_index, key_cache, allowed=None):
    """Scores [B, H, 1, I + 1] of query block I = `block_index` (an int or [B]) against
    the cached key blocks [B, I + 1, Hg, dg]: row I of the prefill scores (-inf where
    `allowed` [B, 1, nK] is False). q_pre_block [B, n, H, d] are the queries that score
    it: block I's own tokens (query_block=own) or block I - 1's (query_block=previous,
    I >= 1)."""
    tokens = self._block_tokens(q_pre_block)
    queries = gate_lib.gate_queries(q_pre_block, tokens, self.q_pools, self.query_weight(), block_index,
                                    self.frequencies())
    if allowed is None:
      allowed = jnp.ones((q_pre_block.shape[0], 1, key_cache.shape[1]), bool)
    return gate_lib.block_scores(queries, key_cache, allowed)

  def _block_tokens(self, x):
    present = jnp.arange(self.block) < x.shape[1]
    return jnp.broadcast_to(present, (x.shape[0], 1, self.block))

  # decoding: the gate's part of the cache

  def empty_cache(self, batch, blocks, kv_heads, head_dim, dtype):
    """key_entries [B, blocks, Hg, dg] of the finished key blocks; block_q [B, block, H, d]
    and block_k [B, block, Hkv, d], the pre-RoPE queries and keys of the current block
    (token p in slot p % block); chosen [B, H, blocks], the key blocks it attends."""
    return {'key_entries': jnp.zeros((batch, blocks, self.key.shape[0], self.width), jnp.float32),
            'block_q': jnp.zeros((batch, self.block, self.num_heads, head_dim), dtype),
            'block_k': jnp.zeros((batch, self.block, kv_heads, head_dim), dtype),
            'chosen': jnp.zeros((batch, self.num_heads, blocks), bool)}

  def prefill_cache(self, cache, q_pre, k_pre, docs, chosen, lengths):
    """The gate's cache after prompts of `lengths` [B] tokens (pre-RoPE q, k [B, P, ...]
    right-padded, their BlockDocuments and chosen blocks [B, H, nb, nb]): the entries of
    the blocks before the last prompt token's block c, c's tokens and c's choice."""
    blocks = cache['chosen'].shape[-1]
    current = (lengths - 1) // self.block
    finished = (jnp.arange(docs.allowed.shape[-1]) < current[:, None])[..., None, None]
    entries = jnp.where(finished, self.key_entries(k_pre, docs), 0.0)
    row = jnp.take_along_axis(chosen, current[:, None, None, None], axis=2)[:, :, 0]
    return {'key_entries': pad_to(entries, 1, blocks), 'chosen': pad_to(row, 2, blocks),
            'block_q': self._block_of(q_pre, current, cache['block_q'].dtype),
            'block_k': self._block_of(k_pre, current, cache['block_k'].dtype)}

  def _block_of(self, x, block_index, dtype):
    """x [B, T, ...] at the tokens of block `block_index` [B] (slots past T: copies of the
    last token, overwritten before the block is pooled)."""
    tokens = jnp.minimum(block_index[:, None] * self.block + jnp.arange(self.block), x.shape[1] - 1)
    return jnp.take_along_axis(x, tokens.reshape(tokens.shape + (1,) * (x.ndim - 2)), axis=1).astype(dtype)

  def advance_cache(self, cache, q_pre, k_pre, positions, select):
    """The gate's cache with one token per row, pre-RoPE q [B, 1, H, d], k [B, 1, Hkv, d]
    at `positions` [B]. At a block start (p % block == 0) block I - 1 is finished: its key
    entry is written, and block I's choice is `select(scores [B, H, 1, nK], docs)` of
    block I - 1's queries."""
    block_index, offset = positions // self.block, positions % self.block
    starts = (offset == 0)[:, None, None, None]
    entries = cache['key_entries']
    finished = jnp.arange(entries.shape[1])[None, :, None, None] == (block_index - 1)[:, None, None, None]
    entries = jnp.where(starts & finished, self.key_entry(cache['block_k'], block_index - 1), entries)
    docs = gate_lib.decode_documents(block_index, entries.shape[1])
    # The diagonal's entry is not known yet: it is forced, and no choice reads its score.
    row = self.query_row(cache['block_q'], block_index, entries, docs.allowed & ~docs.diagonal)
    chosen = jnp.where(starts[:, :, 0], select(row, docs)[:, :, 0], cache['chosen'])
    slot = (jnp.arange(self.block)[None, :] == offset[:, None])[:, :, None, None]
    return {'key_entries': entries, 'chosen': chosen,
            'block_q': jnp.where(slot, q_pre.astype(cache['block_q'].dtype), cache['block_q']),
            'block_k': jnp.where(slot, k_pre.astype(cache['block_k'].dtype), cache['block_k'])}


def pad_to(x, axis, size):
  """x zero-padded (False) at the end of `axis` to `size`."""
  return jnp.pad(x, [(0, size - x.shape[axis]) if a == axis else (0, 0) for a in range(x.ndim)])


def distinct_pools(pools):
  return bool(pools) and all(p in gate_lib.POOLS for p in pools) and len(set(pools)) == len(pools)


POOLS_ADVICE = f'use distinct names from {", ".join(gate_lib.POOLS)}'


@register('gated')
class GatedAttention(Mechanism):
  extra_inputs = ('pre_rope',)  # the gate pools q, k before rotation
  options_section = 'gate'  # model.attention.gate, docs/gated_attention.md
  OPTIONS = {
      'width': Option(128, 'gate width dg of the per-head maps and the block RoPE',
                      lambda w: w > 0 and w % 2 == 0, 'use a positive even width (RoPE pairs dims)'),
      'query_block': Option('previous', 'the queries that score query block I: previous (block I - 1\'s: no token\'s '
                            'blocks depend on later tokens) | own (the paper\'s, for prefill only: a token\'s blocks '
                            'then depend on the later tokens of its block)', choices=QUERY_BLOCKS),
      'q_pools': Option(('avg',), 'query pools per block, concatenated: avg | max | min', distinct_pools,
                        POOLS_ADVICE),
      'k_pools': Option(('max', 'min', 'avg'), 'key pools per block, concatenated', distinct_pools, POOLS_ADVICE),
      'selection': Option('topk', 'topk: density of the causal blocks per row | threshold: softmax score > threshold',
                          choices=SELECTIONS),
      'density': Option(0.2, 'topk: fraction of the causal blocks kept (k = (1 - sqrt(1 - density)) x blocks per row)',
                        lambda d: 0 < d <= 1, 'use a fraction in (0, 1]'),
      'threshold': Option(2e-3, 'threshold: the least softmax gate score of a kept block',
                          lambda p: 0 < p < 1, 'use a probability in (0, 1)'),
      'forward': Option('sparse', 'training output: sparse (the gated plan) | dense (the base\'s dense attention: '
                        'distillation)', choices=FORWARDS),
      'eval_forward': Option('sparse', 'evaluation output: sparse | dense', choices=FORWARDS),
      'distill': Option(True, 'training: teacher map of the dense attention and gate_kl loss'),
      'loss_slice': Option(0.25, 'query-block rows below this fraction of the blocks are left out of the KL',
                           lambda f: 0 <= f < 1, 'use a fraction in [0, 1)'),
      'loss_scale': Option(10.0, 'gate_kl = loss_scale x KL (element mean), per layer, summed over layers',
                           lambda s: s >= 0, 'use a value >= 0'),
  }

  def __init__(self, dims, layer_index, rngs):
    super().__init__(dims, layer_index, rngs)
    self.block_gate = BlockGate(dims, rngs)

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    """The kept blocks (topk: `density` of the causal blocks; threshold: taken as the same
    density, the measured one is logged as gate_density) plus the block gate's scores."""
    g, block = options.gate, options.block_size
    blocks = -(-seq_len // block)
    keys = min(seq_len, g.density * blocks * (blocks + 1) / 2 * block * block / seq_len)
    gate = 2 * g.width * blocks / block * blocks / 2  # one dg-wide score per causal block pair, per q token
    return softmax_flops(dims.num_heads, dims.head_dim, keys) + dims.num_heads * gate

  def forward(self, q, k, v, ctx, pre_rope, rule_blocks=None):
    """rule_blocks: the blocks per row the top-k rule counts (default the row's)."""
    g = self.options.gate
    scale = softmax_scale(q, ctx)
    output = g.forward if ctx.training else g.eval_forward
    distill = ctx.training and g.distill
    docs, scores, chosen = self.choose_blocks(pre_rope, ctx.segment_ids, rule_blocks)
    aux = no_aux()
    aux['stats']['gate_density'] = chosen.sum() / (docs.allowed.sum() * q.shape[2])
    if output == 'dense' or distill:
      # With a sparse output the dense pass only gives the teacher its LSE: no gradient.
      inputs = (q, k, v) if output == 'dense' else jax.lax.stop_gradient((q, k, v))
      dense_y, lse = self.dense_attention(*inputs, ctx, scale)
    y = dense_y if output == 'dense' else self.sparse_attention(q, k, v, chosen, ctx.segment_ids, scale=scale)
    if distill:
      teacher = gate_lib.teacher_block_map(*jax.lax.stop_gradient((q, k, lse)), scale, self.block_size,
                                           ctx.segment_ids)
      aux['losses']['gate_kl'] = g.loss_scale * gate_lib.gate_kl(teacher, scores, g.loss_slice)
      aux['stats']['gate_recall'] = gate_lib.teacher_recall(teacher, chosen)
    return y, aux

  def choose_blocks(self, pre_rope, segment_ids, rule_blocks=None):
    """(BlockDocuments, gate scores [B, H, nb, nb], chosen blocks [B, H, nb, nb])."""
    q_pre = pre_rope[0]
    docs = gate_lib.block_documents(segment_ids, q_pre.shape[1], self.block_size, q_pre.shape[0])
    scores = self.block_gate.scores(*pre_rope, docs)
    return docs, scores, self.select(scores, docs, rule_blocks)

  def select(self, scores, docs, rule_blocks=None):
    """The chosen blocks of scores [B, H, nQ, nK]; the top-k rule counts `rule_blocks`
    blocks per row (default nQ)."""
    g = self.options.gate
    if g.selection == 'threshold':
      return gate_lib.select_threshold(scores, docs, g.threshold)
    rule_blocks = scores.shape[-2] if rule_blocks is None else rule_blocks
    return gate_lib.select_topk(scores, docs, gate_lib.topk_blocks_per_row(g.density, rule_blocks))

  # --------------------------------------------------------------------------------------
  # decoding (the module docstring; docs/gated_attention.md, Decoding)

  def decode_problem(self):
    if not self.block_gate.previous_queries:
      return ('the gated mechanism decodes only with model.attention.gate.query_block=previous: with own, a '
              'block\'s choice pools the queries of its later tokens, which decoding has not seen')
    return super().decode_problem()

  def init_cache(self, batch, max_len, kv_heads, head_dim, dtype):
    self.check_decodable()
    cache = super().init_cache(batch, max_len, kv_heads, head_dim, dtype)
    blocks = gate_lib.num_blocks(max_len, self.block_size)
    return cache | self.block_gate.empty_cache(batch, blocks, kv_heads, head_dim, dtype)

  def prefill(self, q, k, v, ctx, cache, lengths, pre_rope):
    """The eval forward over the prompts, counting the cache's blocks in the top-k rule."""
    blocks = cache['chosen'].shape[-1]
    y, _ = self(q, k, v, ctx, pre_rope=pre_rope, rule_blocks=blocks)
    docs, _, chosen = self.choose_blocks(pre_rope, ctx.segment_ids, blocks)
    cache = cache | self.block_gate.prefill_cache(cache, *pre_rope, docs, chosen, lengths)
    return y, kv_cache.fill(cache, k, v, lengths)

  def decode(self, q, k, v, ctx, cache, pre_rope):
    positions = ctx.positions[:, 0]
    blocks = cache['chosen'].shape[-1]
    select = functools.partial(self.select, rule_blocks=blocks)
    cache = cache | self.block_gate.advance_cache(cache, *pre_rope, positions, select)
    cache = kv_cache.append(cache, k, v, positions)
    scale = softmax_scale(q, ctx)
    count = self.gathered_blocks(cache)
    if count is None:
      return kv_cache.attend(q, cache, self.decode_visible(cache, positions), scale), cache
    chosen = cache['chosen']
    blocks = jax.lax.top_k(jnp.where(chosen, jnp.arange(chosen.shape[-1]), -1), count)[0]
    return kv_cache.attend_blocks(q, cache, blocks, self.block_size, positions, scale), cache

  def gathered_blocks(self, cache):
    """How many key blocks a decoding step gathers per query head (top-k's count, at least
    the two forced blocks: select_topk never keeps more), or None where it reads the whole
    cache under a mask instead: eval_forward=dense, threshold selection (no fixed count), or
    a count for which the gathered slots of all query heads outnumber the cache's."""
    g = self.options.gate
    if g.eval_forward == 'dense' or g.selection != 'topk':
      return None
    blocks = cache['chosen'].shape[-1]
    count = min(max(gate_lib.topk_blocks_per_row(g.density, blocks), 2), blocks)
    group = cache['chosen'].shape[1] // cache['k'].shape[2]
    return count if count * group < blocks else None

  def decode_visible(self, cache, positions):
    """[B, H, S]: the causal slots in the blocks chosen for the query's block (all of
    them with eval_forward=dense)."""
    causal = kv_cache.causal(cache, positions)
    if self.options.gate.eval_forward == 'dense':
      return causal
    chosen = cache['chosen']
    slot_blocks = jnp.clip(cache['position'] // self.block_size, 0, chosen.shape[-1] - 1)
    return causal[:, None] & jnp.take_along_axis(chosen, slot_blocks[:, None], axis=-1)

  @kernel(QUERIES, KEYS, KEYS, HEAD_BLOCKS, ROWS, out=QUERIES)
  def sparse_attention(self, q, k, v, chosen, segment_ids, *, scale):
    """Attention over the chosen blocks [B, H, nb, nb] (a plan per query head)."""
    block = self.block_size
    plan = plan_from_block_mask(chosen, q_len=q.shape[1], block_q=block, block_kv=block, segment_ids=segment_ids)
    return block_sparse_attention(q, k, v, plan, scale=scale)

  def dense_attention(self, q, k, v, ctx, scale):
    """(output, LSE [B, H, T]) of causal attention within documents."""
    return self.dense_kernel(q, k, v, ctx.segment_ids, scale=scale)

  @kernel(QUERIES, KEYS, KEYS, ROWS, out=(QUERIES, 'batch heads .'))
  def dense_kernel(self, q, k, v, segment_ids, *, scale):
    block = self.block_size
    plan = plan_from_mask(masks.Causal(), q_len=q.shape[1], block_q=block, block_kv=block, segment_ids=segment_ids)
    return block_sparse_attention(q, k, v, plan, scale=scale, return_lse=True)
