"""Short-range attention through the block-sparse kernels: a sliding window, or local
blocks (MASFormer's sparse layers).

    window:W        each query sees the last W tokens of its own document, itself included
    block_local:C   each query sees the earlier tokens of its chunk of C tokens of the row
                    (chunks are cut at multiples of C in the packed row), within its document

Documents (segment ids) are part of the plan, so tiles that cross no shared document are
skipped. The plan is built from the mask function at block granularity: no T x T mask.
"""

from pallas_kernels.block_sparse_attention import block_sparse_attention, masks, plan_from_mask
from sparseformer.model.attention import context_parallel, kv_cache
from sparseformer.model.attention.base import (CUSTOM, Mechanism, mean_causal_keys, no_aux, register, softmax_flops,
                                               softmax_scale)


class LocalAttention(Mechanism):
  """Base of the mechanisms that attend through a static mask function of positions."""
  argument_meaning = ('size', 256)
  placement = CUSTOM  # context parallelism: each device gathers only the kv shards its window reaches
  # True: the mask reads positions within each packed document (plan.py), as decoding a
  # document alone does; False: positions in the packed row (block_local's chunks).
  document_positions = False

  @property
  def size(self):
    return self.argument

  def mask(self):
    raise NotImplementedError

  def forward(self, q, k, v, ctx):
    block = self.block_size
    plan = plan_from_mask(self.mask(), q_len=q.shape[1], block_q=block, block_kv=block, segment_ids=ctx.segment_ids,
                          document_positions=self.document_positions)
    return block_sparse_attention(q, k, v, plan, scale=softmax_scale(q, ctx)), no_aux()

  def sharded_forward(self, placement, q, k, v, ctx):
    return context_parallel.sharded_attention(q, k, v, ctx.segment_ids, mask=self.mask(), block=self.block_size,
                                              scale=softmax_scale(q, ctx), placement=placement), no_aux()

  def decode_visible(self, cache, positions):
    """The mask function's rule for the query and each cached key."""
    return kv_cache.causal(cache, positions) & self.mask().elements(positions[:, None], cache['position'])


@register('window')
class SlidingWindowAttention(LocalAttention):

  def mask(self):
    return masks.causal_window(self.size)

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    return softmax_flops(dims.num_heads, dims.head_dim, mean_causal_keys(seq_len, argument))

  def cache_slots(self, max_len):
    """A ring buffer of the last W tokens."""
    return min(self.size, max_len)


@register('block_local')
class BlockLocalAttention(LocalAttention):

  def mask(self):
    return masks.Chunked(self.size) & masks.Causal()

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    chunk = min(argument, seq_len)
    return softmax_flops(dims.num_heads, dims.head_dim, (chunk + 1) / 2)

  def cache_slots(self, max_len):
    """The current chunk: C slots, the chunk's tokens so far the filled ones."""
    return min(self.size, max_len)
