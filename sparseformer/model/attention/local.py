"""Short-range attention through the block-sparse kernels: a sliding window, or local
blocks (MASFormer's sparse layers).

    window:W        each query sees the last W tokens of its own document, itself included
    block_local:C   each query sees the earlier tokens of its chunk of C tokens of the row
                    (chunks are cut at multiples of C in the packed row), within its document

Documents (segment ids) are part of the plan, so tiles that cross no shared document are
skipped. The plan is built from the mask function at block granularity: no T x T mask.
"""

from pallas_kernels.block_sparse_attention import block_sparse_attention, masks, plan_from_mask
from sparseformer.model.attention import context_parallel
from sparseformer.model.attention.base import Mechanism, mean_causal_keys, no_aux, register, softmax_flops


class LocalAttention(Mechanism):
  """Base of the mechanisms that attend through a static mask function of positions."""

  @classmethod
  def check_argument(cls, argument):
    if argument is None or not argument.isdigit() or int(argument) < 1:
      return f'{cls.name} needs a positive size, e.g. {cls.name}:256'
    return None

  @property
  def size(self):
    return int(self.argument)

  def mask(self):
    raise NotImplementedError

  def __call__(self, q, k, v, ctx):
    block = self.options.block_size
    scale = ctx.logit_scale / q.shape[-1] ** 0.5
    placement = context_parallel.placement_for_kernels()
    if placement is not None:
      return context_parallel.sharded_attention(q, k, v, ctx.segment_ids, mask=self.mask(), block=block,
                                                scale=scale, placement=placement), no_aux()
    plan = plan_from_mask(self.mask(), q_len=q.shape[1], block_q=block, block_kv=block, segment_ids=ctx.segment_ids)
    return block_sparse_attention(q, k, v, plan, scale=scale), no_aux()


@register('window')
class SlidingWindowAttention(LocalAttention):

  def mask(self):
    return masks.causal_window(self.size)

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    return softmax_flops(dims.num_heads, dims.head_dim, mean_causal_keys(seq_len, int(argument)))


@register('block_local')
class BlockLocalAttention(LocalAttention):

  def mask(self):
    return masks.Chunked(self.size) & masks.Causal()

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    chunk = min(int(argument), seq_len)
    return softmax_flops(dims.num_heads, dims.head_dim, (chunk + 1) / 2)
