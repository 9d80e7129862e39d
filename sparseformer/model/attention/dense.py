"""Dense causal attention: cuDNN flash attention on GPU, XLA elsewhere.

Packed documents are kept apart by a segment mask, so a token only sees earlier tokens
of its own document.
"""

import jax

from sparseformer.model.attention.base import Mechanism, no_aux, register


def document_mask(segment_ids):
  """[B, 1, T, T] True where query and key belong to the same document (causality is
  added by `is_causal`)."""
  return (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])


@register('dense')
class DenseAttention(Mechanism):

  def __call__(self, q, k, v, ctx):
    scale = ctx.logit_scale / q.shape[-1] ** 0.5
    y = jax.nn.dot_product_attention(q, k, v, mask=document_mask(ctx.segment_ids), is_causal=True, scale=scale)
    return y, no_aux()
