"""Strided attention (Sparse Transformer; Child et al., 2019, arXiv 1904.10509, section
4.2), at the granularity of the block-sparse kernels' blocks.

    strided:S   S the stride in tokens, a multiple of model.attention.block_size

With B the block size, n = S / B and L = strided.local / B (0: L = n), a query in block
I sees the keys at or before it, within its document, of the key blocks J with

    I - J < L              the local part: its own block and the L - 1 before it
    (I - J) % n == 0       the strided part: every n-th block back

Child et al. define the pattern per token (i - j < l, or (i - j) % l == 0); per token the
strided part is a diagonal line through every tile, so a block kernel visits every
causal tile. Per block, a tile is wholly in or out (the diagonal tile causal): the kernel
skips the others. Any key reaches any later query in two hops, as in the paper: through
block J + ((I - J) % n), which sees J locally (when L >= n) and is seen by I's stride.

The pattern is a boolean matrix of blocks, the same for every row, head and layer (blocks
are counted in the packed row, as block_local's chunks are); the plan adds documents
(segment ids) and causality inside the diagonal tile.
"""

import numpy as np

from pallas_kernels.block_sparse_attention import block_sparse_attention, plan_from_block_mask
from sparseformer.model.attention import kv_cache
from sparseformer.model.attention.base import (KEYS, QUERIES, ROWS, Mechanism, Option, first_problem, kernel, no_aux,
                                               register, softmax_flops, softmax_scale)


def strided_blocks(num_blocks, stride, local):
  """bool [nb, nb]: key block J visible from query block I (strides and local span in blocks)."""
  distance = np.arange(num_blocks)[:, None] - np.arange(num_blocks)[None, :]
  return (distance >= 0) & ((distance < local) | (distance % stride == 0))


@register('strided')
class StridedAttention(Mechanism):
  argument_meaning = ('stride in tokens', 1024)
  options_section = 'strided'  # model.attention.strided
  OPTIONS = {
      'local': Option(0, 'tokens of the local part, a multiple of block_size; 0: the stride (Child et al.)',
                      lambda n: n >= 0, 'use a length >= 0 (0: the stride)'),
  }

  @classmethod
  def validate_options(cls, options, model_cfg, arguments):
    """Own values; with strided layers, every length a whole number of blocks."""
    problem = super().validate_options(options, model_cfg, arguments)
    block = model_cfg.attention.block_size
    for stride in sorted(set(arguments)):
      problem = problem or first_problem([
          (stride % block == 0, f'strided:{stride}: use a stride that is a multiple of model.attention.block_size '
                                f'({block})'),
          (options.local % block == 0, f'model.attention.strided.local={options.local}: use a multiple of '
                                       f'model.attention.block_size ({block}), or 0 (the stride)'),
      ])
    return problem

  @classmethod
  def block_pattern(cls, num_blocks, stride, options, block):
    return strided_blocks(num_blocks, stride // block, (options.strided.local or stride) // block)

  def forward(self, q, k, v, ctx):
    return self.attend(q, k, v, ctx.segment_ids, scale=softmax_scale(q, ctx)), no_aux()

  @kernel(QUERIES, KEYS, KEYS, ROWS, out=QUERIES)
  def attend(self, q, k, v, segment_ids, *, scale):
    block, length = self.block_size, q.shape[1]
    pattern = self.block_pattern(-(-length // block), self.argument, self.options, block)
    plan = plan_from_block_mask(pattern[None, None], q_len=length, block_q=block, block_kv=block,
                                segment_ids=segment_ids)
    return block_sparse_attention(q, k, v, plan, scale=scale)

  def decode_visible(self, cache, positions):
    """The pattern's rule for the query's block I and each cached key's block J."""
    block = self.block_size
    stride, local = self.argument // block, (self.options.strided.local or self.argument) // block
    distance = positions[:, None] // block - cache['position'] // block
    return kv_cache.causal(cache, positions) & ((distance < local) | (distance % stride == 0))

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    """The keys of the visible blocks, averaged over the positions of one document."""
    block = options.block_size
    blocks = -(-seq_len // block)
    earlier = cls.block_pattern(blocks, argument, options, block).sum(1) - 1  # whole blocks before the diagonal
    tokens = np.minimum(block, seq_len - block * np.arange(blocks))  # the last block may be partial
    keys = (tokens * earlier * block + tokens * (tokens + 1) / 2).sum() / seq_len
    return softmax_flops(dims.num_heads, dims.head_dim, keys)
