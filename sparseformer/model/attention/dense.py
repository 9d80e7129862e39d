"""Dense causal attention.

Rows without segment ids (each row one document from position 0) take the plain causal
path: cuDNN flash attention on a GPU in bfloat16/float16, XLA elsewhere. Packed rows keep
documents apart, by `model.attention.dense_backend`:
  xla_mask      a [B, 1, T, T] document mask handed to XLA (short rows; quadratic memory);
  block_sparse  the block-sparse kernels with a causal plan of the documents: exact,
                skips tiles that cross documents, builds no T x T mask;
  auto          block_sparse on a GPU, xla_mask elsewhere.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import block_sparse_attention, masks, plan_from_mask
from sparseformer.model.attention import context_parallel, kv_cache
from sparseformer.model.attention.base import CUSTOM, Mechanism, Option, no_aux, register, softmax_scale

DENSE_BACKENDS = ('auto', 'xla_mask', 'block_sparse')


def document_mask(segment_ids):
  """[B, 1, T, T] True where query and key belong to the same document (causality is
  added by `is_causal`)."""
  return (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])


def resolve_backend(backend, platform=None):
  """The backend 'auto' stands for on this platform; others unchanged."""
  if backend != 'auto':
    return backend
  platform = platform or jax.default_backend()
  return 'block_sparse' if platform == 'gpu' else 'xla_mask'


def causal_implementation(dtype, platform=None):
  """jax.nn.dot_product_attention's implementation for unmasked causal rows: cuDNN where
  it runs (jax's default, None, is XLA, which builds the T x T logits)."""
  platform = platform or jax.default_backend()
  half = dtype in (jnp.bfloat16, jnp.float16)
  return 'cudnn' if platform == 'gpu' and half else 'xla'


@register('dense')
class DenseAttention(Mechanism):
  options_section = ''  # model.attention.dense_backend
  OPTIONS = {'dense_backend': Option('auto', 'dense layers on packed rows: auto | xla_mask | block_sparse',
                                     choices=DENSE_BACKENDS)}
  placement = CUSTOM  # context parallelism: every device gathers the kv shards its queries see

  def uses_kernels(self, ctx):
    return ctx.segment_ids is not None and resolve_backend(self.options.dense_backend) == 'block_sparse'

  def forward(self, q, k, v, ctx):
    scale = softmax_scale(q, ctx)
    if ctx.segment_ids is None:
      y = jax.nn.dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                       implementation=causal_implementation(q.dtype))
    elif self.uses_kernels(ctx):
      block = self.block_size
      plan = plan_from_mask(masks.Causal(), q_len=q.shape[1], block_q=block, block_kv=block,
                            segment_ids=ctx.segment_ids)
      y = block_sparse_attention(q, k, v, plan, scale=scale)
    else:
      y = jax.nn.dot_product_attention(q, k, v, mask=document_mask(ctx.segment_ids), is_causal=True, scale=scale)
    return y, no_aux()

  def sharded_forward(self, placement, q, k, v, ctx):
    """XLA partitions the jnp paths by itself unless the sequence is split."""
    if not self.uses_kernels(ctx) and context_parallel.sequence_shards(placement) == 1:
      return self.forward(q, k, v, ctx)
    return context_parallel.sharded_attention(q, k, v, ctx.segment_ids, mask=masks.Causal(), block=self.block_size,
                                              scale=softmax_scale(q, ctx), placement=placement), no_aux()

  def decode_visible(self, cache, positions):
    return kv_cache.causal(cache, positions)
