"""MoBA, Mixture of Block Attention (Lu et al., Moonshot AI, 2025, arXiv 2502.13189;
github.com/MoonshotAI/MoBA): each query block attends to its own block and to the key
blocks whose mean-pooled key best matches it. No parameters: a dense checkpoint runs as
MoBA as it is.

    moba    options model.attention.moba: block (tokens of a MoBA block) and top_k

The gate of query token i for key block J is s_iJ = q_i . mean_{j in J} k_j (post-RoPE q
and k, as the reference applies it after rotation). MoBA ranks blocks per token; our
plans are per query block, so a block's tokens share one choice, ranked by their mean
gate s_IJ = mean_{i in I} q_i . mean_{j in J} k_j (the two means commute with the dot
product). The scores are summed over the query heads of each GQA group, so a group
shares its blocks (the plan has one head per kv head), as NSA and InfLLM-V2 choose; with
`share=head` every query head ranks on its own, as the MoBA reference does.

Per query block: its own block always (causal inside it), then the best top_k - 1 earlier
blocks of its document (the reference's top-k counts the current block). Future blocks
and other documents' blocks are never chosen (gate.block_documents: a query block pools
the queries of its first document, a key block the keys of its last). The choice is made
at MoBA blocks of `moba.block` tokens (512 in the paper's scaling runs, 4096 at 1M) and
spread onto the kernel's blocks of `model.attention.block_size`; the selection is
discrete, so gradients reach q and k only through the attention itself, as in MoBA.
"""

import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import block_sparse_attention, plan_from_block_mask
from sparseformer.model.attention import gate as gate_lib
from sparseformer.model.attention.base import (HEAD_BLOCKS, KEYS, QUERIES, ROWS, Mechanism, Option, first_problem, kernel, no_aux,
                                               register, softmax_flops, softmax_scale)

SHARING = ('group', 'head')


def mean_gate_scores(q, k, docs):
  """s [B, H, nb, nb] float32: the mean query of each block (its first document's tokens)
  dotted with the mean key of each block (its last document's), -inf where not allowed."""
  queries = gate_lib.pool_blocks(q, docs.query_tokens, ('avg',))  # [B, nb, H, D]
  keys = gate_lib.pool_blocks(k, docs.key_tokens, ('avg',))  # [B, nb, Hkv, D]
  keys = jnp.repeat(keys, q.shape[2] // k.shape[2], axis=2)
  scores = jnp.einsum('bihd,bjhd->bhij', queries, keys)
  return jnp.where(docs.allowed[:, None], scores, -jnp.inf)


def group_sum(scores, groups):
  """[B, H, n, n] -> [B, groups, n, n]: summed over the query heads of each group (-inf stays -inf)."""
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

  def forward(self, q, k, v, ctx):
    chosen = self.choose(q, k, ctx.segment_ids)
    aux = no_aux()
    aux['stats']['moba_density'] = chosen.mean()
    return self.attend(q, k, v, chosen, ctx.segment_ids, scale=softmax_scale(q, ctx)), aux

  def choose(self, q, k, segment_ids):
    """bool [B, Hp, nQ, nK]: the kernel's key blocks each query block visits (Hp: kv heads
    with share=group, query heads with share=head)."""
    m = self.options.moba
    batch, length = q.shape[:2]
    docs = gate_lib.block_documents(segment_ids, length, m.block, batch)
    diagonal = jnp.eye(docs.allowed.shape[-1], dtype=bool)[None]
    docs = gate_lib.BlockDocuments(docs.query_tokens, docs.key_tokens, docs.allowed, diagonal & docs.allowed)
    scores = mean_gate_scores(q, k, docs)
    if m.share == 'group':
      scores = group_sum(scores, k.shape[2])
    chosen = gate_lib.select_topk(scores, docs, m.top_k)
    ratio = m.block // self.block_size
    return gate_lib.spread_causal(chosen, ratio, ratio, gate_lib.num_blocks(length, self.block_size))

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
