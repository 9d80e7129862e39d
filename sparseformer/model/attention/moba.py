"""MoBA, Mixture of Block Attention (Lu et al., Moonshot AI, 2025, arXiv 2502.13189;
github.com/MoonshotAI/MoBA): each query block attends to its own block and to the key
blocks whose mean-pooled key best matches it. No parameters: a dense checkpoint runs as
MoBA as it is.

    moba    options model.attention.moba: block (tokens of a MoBA block) and top_k

The gate of query token i for key block J is s_iJ = q_i . mean_{j in J} k_j (post-RoPE q
and k, as the reference applies it after rotation). Each query attends its own MoBA block
(causal inside it) and the top_k - 1 earlier blocks of its document with the best gates
(the reference's top-k counts the current block).

Where it differs from the reference, which ranks per query token: our plans choose per
query block of model.attention.block_size tokens, and a query block ranks with the mean
gate of the query block before it, s_IJ = mean_{i in I-1} q_i . mean_{j in J} k_j (the
two means commute with the dot product): with its own tokens' gates a token's blocks
would depend on the later tokens of its block, a leak of the future in training
(block_selection.py). So the first query block of a row has its own MoBA block only. The
scores are summed over the query heads of each GQA group, so a group shares its blocks
(the plan has one head per kv head), as NSA and InfLLM-V2 choose; with `share=head` every
query head ranks on its own, as the MoBA reference does. A query block pools the queries
of its first document, a key block the keys of its last (gate.block_documents), and only
blocks of the query block's document compete. MoBA blocks are `moba.block` tokens (512 in
the paper's scaling runs, 4096 at 1M), whole kernel blocks; the selection is discrete, so
gradients reach q and k only through the attention itself, as in MoBA.

Decoding (docs/block_selection.md) keeps every token's key and value and the summed
queries of the newest token's query block and of the one before it.
"""

import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import block_sparse_attention, plan_from_block_mask
from sparseformer.model.attention import block_selection, kv_cache
from sparseformer.model.attention import gate as gate_lib
from sparseformer.model.attention.base import (HEAD_BLOCKS, KEYS, QUERIES, ROWS, Mechanism, Option, first_problem,
                                               kernel, no_aux, register, softmax_flops, softmax_scale)
from sparseformer.model.attention.compressed_scores import take_tokens

SHARING = ('group', 'head')


def mean_gate_scores(q, k, segment_ids, block, moba_block):
  """s [B, H, nQ, nM] float32: the mean query of each query block of `block` tokens (its
  first document's tokens) dotted with the mean key of each MoBA block (its last
  document's)."""
  batch, length = q.shape[:2]
  query_tokens = gate_lib.block_documents(segment_ids, length, block, batch).query_tokens
  key_tokens = gate_lib.block_documents(segment_ids, length, moba_block, batch).key_tokens
  queries = gate_lib.pool_blocks(q, query_tokens, ('avg',))  # [B, nQ, H, D]
  keys = gate_lib.pool_blocks(k, key_tokens, ('avg',))  # [B, nM, Hkv, D]
  return gate_scores(queries, keys)


def gate_scores(queries, keys):
  """[B, H, nQ, nM]: pooled queries [B, nQ, H, D] dotted with pooled keys [B, nM, Hkv, D]
  (the query heads of a GQA group with their kv head's)."""
  keys = jnp.repeat(keys, queries.shape[2] // keys.shape[2], axis=2)
  return jnp.einsum('bihd,bjhd->bhij', queries, keys)


def group_sum(scores, groups):
  """[B, H, nQ, nM] -> [B, groups, nQ, nM]: summed over the query heads of each group."""
  b, h, nq, nk = scores.shape
  return scores.reshape(b, groups, h // groups, nq, nk).sum(2)


def choice_layout(chosen, args):
  """The mesh layout of the chosen blocks: one plan head per kv head or per query head."""
  return 'batch kv_heads . .' if chosen.shape[1] == args[1].shape[2] else HEAD_BLOCKS


@register('moba')
class MobaAttention(Mechanism):
  options_section = 'moba'  # model.attention.moba
  OPTIONS = {
      'block': Option(512, 'tokens of a MoBA block (the unit of choice), a multiple of model.attention.block_size',
                      lambda n: n > 0, 'use a positive number of tokens'),
      'top_k': Option(3, 'MoBA blocks each query block attends, its own included (the paper: 3 of 512 tokens)',
                      lambda n: n >= 1, 'use at least 1 (its own block)'),
      'share': Option('group', 'group: one choice per GQA group, scores summed over its heads | head: per query '
                      'head (the MoBA reference)', choices=SHARING),
  }

  @classmethod
  def validate_options(cls, options, model_cfg, arguments):
    problem = super().validate_options(options, model_cfg, arguments)
    block = model_cfg.attention.block_size
    if not arguments:  # no layer uses MoBA
      return problem
    return problem or first_problem([
        (options.block % block == 0, f'model.attention.moba.block={options.block}: use a multiple of '
                                     f'model.attention.block_size ({block})'),
    ])

  def __init__(self, dims, layer_index, rngs):
    super().__init__(dims, layer_index, rngs)
    self.num_heads = dims.num_heads  # the decoding cache sums queries per head

  def forward(self, q, k, v, ctx):
    chosen, allowed = self.choose(q, k, ctx.segment_ids)
    aux = no_aux()
    aux['stats']['moba_select_fraction'] = block_selection.chosen_fraction(chosen, allowed, self.block_size,
                                                                           self.options.moba.block)
    return self.attend(q, k, v, chosen, ctx.segment_ids, scale=softmax_scale(q, ctx)), aux

  def choose(self, q, k, segment_ids):
    """(chosen [B, Hp, nQ, nK] kernel blocks, allowed [B, nQ, nM] MoBA blocks) of every
    query block (Hp: kv heads with share=group, query heads with share=head)."""
    m = self.options.moba
    batch, length = q.shape[:2]
    scores = self.shared(mean_gate_scores(q, k, segment_ids, self.block_size, m.block), k.shape[2])
    allowed, _ = block_selection.selection_documents(segment_ids, batch, length, self.block_size, m.block)
    chosen = block_selection.choose_blocks(block_selection.previous_block_votes(scores), allowed, None,
                                           block=self.block_size, select_block=m.block, count=m.top_k, local=1)
    return chosen, allowed

  def shared(self, scores, kv_heads):
    """Scores [B, H, nQ, nM] per plan head: summed over each GQA group with share=group."""
    return group_sum(scores, kv_heads) if self.options.moba.share == 'group' else scores

  # --------------------------------------------------------------------------------------
  # decoding: the key/value slots of every token (the MoBA blocks' mean keys come from
  # them) and the sums of the queries [B, H, D] of the newest token's query block and of
  # the block before it (block_selection.py)

  def init_cache(self, batch, max_len, kv_heads, head_dim, dtype):
    cache = super().init_cache(batch, max_len, kv_heads, head_dim, dtype)
    return block_selection.with_votes(cache, (batch, self.num_heads, head_dim))

  def prefill(self, q, k, v, ctx, cache, lengths):
    y, cache = super().prefill(q, k, v, ctx, cache, lengths)
    positions = block_selection.prompt_vote_positions(lengths, self.block_size)
    return y, block_selection.prompt_votes(cache, take_tokens(q, positions), positions, lengths, self.block_size)

  def decode(self, q, k, v, ctx, cache):
    positions = ctx.positions[:, 0]
    cache = kv_cache.append(cache, k, v, positions)
    cache = block_selection.add_vote(cache, q[:, 0].astype(jnp.float32), positions, self.block_size)
    return kv_cache.attend(q, cache, self.decode_visible(cache, positions), softmax_scale(q, ctx)), cache

  def decode_visible(self, cache, positions):
    """The slots of the query block's MoBA blocks: its own and the top_k - 1 best by the
    previous query block's mean query against each MoBA block's mean key."""
    m = self.options.moba
    queries = cache['previous_votes'][:, None] / self.block_size  # [B, 1, H, D]
    keys = gate_lib.to_blocks(cache['k'].astype(jnp.float32), m.block).mean(2)  # [B, nM, Hkv, D]
    scores = self.shared(gate_scores(queries, keys), keys.shape[2])[:, :, 0]
    chosen = block_selection.decode_choice(scores, positions, block=self.block_size, select_block=m.block,
                                           count=m.top_k, local=1, first=False)
    return block_selection.visible_slots(chosen, cache, positions, m.block)

  @kernel(QUERIES, KEYS, KEYS, choice_layout, ROWS, out=QUERIES)
  def attend(self, q, k, v, chosen, segment_ids, *, scale):
    """Attention over the chosen blocks [B, Hp, nb, nb] (Hp: kv heads or query heads)."""
    block = self.block_size
    plan = plan_from_block_mask(chosen, q_len=q.shape[1], block_q=block, block_kv=block, segment_ids=segment_ids)
    return block_sparse_attention(q, k, v, plan, scale=scale)

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    """Own block (causal) plus top_k - 1 whole earlier blocks where they exist, averaged
    over one document's positions; the gate's scores (one D-wide dot per block pair per
    head, per query block) are negligible and left out."""
    m = options.moba
    blocks = -(-seq_len // m.block)
    keys = 0.0
    for index in range(blocks):
      tokens = min(m.block, seq_len - index * m.block)
      keys += tokens * (tokens + 1) / 2 + tokens * min(m.top_k - 1, index) * m.block
    return softmax_flops(dims.num_heads, dims.head_dim, keys / seq_len)
