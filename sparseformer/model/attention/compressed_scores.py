"""Key-block selection scores from attention over compressed keys: the selection rule of
Native Sparse Attention (Yuan et al., 2025, "Native Sparse Attention: Hardware-Aligned and
Natively Trainable Sparse Attention", arXiv 2502.11089, section 3.3.2), shared by the
mechanisms that choose key blocks this way (nsa.py, InfLLM-V2).

Compressed key j summarises the tokens [j d, j d + l) (l = cmp_len, d = cmp_stride). A
query at t sees it once its span is complete, j d + l - 1 <= t, and, in a packed row, only
when the whole span lies in the query's document. p_cmp[t, h, j] is the softmax of the
scores q_t . k_j x scale over the compressed keys t sees (exp(s - lse) with the log-sum-exp
of that attention). Selection block s, the tokens [s l', (s + 1) l') (l' = select_block),
scores:

  - the p_cmp of every compressed key whose span overlaps it (paper eq. 9, which for l and
    l' multiples of d sums the keys the block's span touches);
  - summed over the query heads of a GQA group (eq. 10), so the group shares one choice;
  - summed over the tokens of a query block of `query_block` tokens. This is our deviation
    from the paper, which chooses per query token: the block-sparse plans choose key blocks
    per query block, so the block's tokens vote together. Padding queries (segment 0) do
    not vote.

The scores are computed under stop_gradient (the choice is discrete; the paper does not
differentiate it), by pallas_kernels.compressed_mass: never [T, Tc] for all heads at once.
"""

import jax.numpy as jnp
import numpy as np

from pallas_kernels.compressed_mass import compressed_mass
from pallas_kernels.compressed_mass.reference import softmax_where
from sparseformer.model.attention.gate import num_blocks

CROSSES_DOCUMENTS = -1  # segment id of a compressed key whose span crosses documents: no query has it


def num_compressed(length, cmp_len, cmp_stride):
  """Compressed keys of a row of `length` tokens: its complete spans [j d, j d + l)."""
  return max(0, (length - cmp_len) // cmp_stride + 1)


def span_tokens(x, cmp_len, cmp_stride):
  """[B, Tc, l, ...]: the tokens of every complete span [j d, j d + l) of x [B, T, ...], for
  cmp_len a multiple of cmp_stride (span j is the stride chunks j .. j + l/d - 1: no gather)."""
  b, length = x.shape[:2]
  count = num_compressed(length, cmp_len, cmp_stride)
  parts = cmp_len // cmp_stride
  if count == 0:
    return jnp.zeros((b, 0, cmp_len) + x.shape[2:], x.dtype)
  chunks = x[:, :(count + parts - 1) * cmp_stride].reshape(b, count + parts - 1, cmp_stride, *x.shape[2:])
  return jnp.concatenate([chunks[:, i:i + count] for i in range(parts)], axis=2)


def compressed_key_segments(segment_ids, cmp_len, cmp_stride):
  """[B, Tc] int32: the document of each compressed key's span when the whole span lies in
  one document (0 for a span of padding, which only padding queries see), CROSSES_DOCUMENTS
  otherwise; None for segment_ids None (each row one document)."""
  if segment_ids is None:
    return None
  count = num_compressed(segment_ids.shape[1], cmp_len, cmp_stride)
  tokens = np.arange(count)[:, None] * cmp_stride + np.arange(cmp_len)[None, :]  # [Tc, l]
  spans = segment_ids.astype(jnp.int32)[:, tokens]  # [B, Tc, l]
  one_document = spans.min(-1) == spans.max(-1)
  return jnp.where(one_document, spans[..., 0], CROSSES_DOCUMENTS)


def span_overlaps(count, cmp_len, cmp_stride, num_select, select_block):
  """float32 [Tc, nS]: 1 where compressed key j's span overlaps selection block s."""
  start = np.arange(count)[:, None] * cmp_stride
  block_start = np.arange(num_select)[None, :] * select_block
  return ((start < block_start + select_block) & (start + cmp_len > block_start)).astype(np.float32)


def complete_spans(positions, cmp_len, cmp_stride, count):
  """bool [..., Tc]: compressed key j complete at the token at `positions` [...]
  (j d + l - 1 <= t), documents aside."""
  key_end = np.arange(count) * cmp_stride + cmp_len - 1
  return key_end <= positions[..., None]


def selection_scores(q, k_cmp, lse, *, scale, cmp_len, cmp_stride, select_block, query_block, segment_ids,
                     kv_segment_ids):
  """float32 [B, Hkv, nQ, nS]: the compressed attention's probability mass of each
  selection block (module docstring), per kv head and query block.

  q [B, T, H, D] (post-RoPE), k_cmp [B, Tc, Hkv, D], lse [B, H, T] the compressed
  attention's log-sum-exp (None: computed here), nQ = ceil(T / query_block), nS =
  ceil(T / select_block), segment_ids [B, T] or None, kv_segment_ids [B, Tc] (from
  compressed_key_segments) or None. The mass per kv head (summed over its GQA group) and
  compressed key comes from pallas_kernels.compressed_mass (a Triton kernel on GPUs)."""
  b, length = q.shape[:2]
  count, kv_heads = k_cmp.shape[1], k_cmp.shape[2]
  nq, ns = num_blocks(length, query_block), num_blocks(length, select_block)
  if count == 0:
    return jnp.zeros((b, kv_heads, nq, ns), jnp.float32)
  mass = compressed_mass(q, k_cmp, lse, None if segment_ids is None else segment_ids.astype(jnp.int32),
                         kv_segment_ids, scale=scale, cmp_len=cmp_len, cmp_stride=cmp_stride,
                         query_block=query_block)  # [B, Hkv, nQ, Tc]: summed over each GQA group
  return mass @ jnp.asarray(span_overlaps(count, cmp_len, cmp_stride, ns, select_block))


# ---------------------------------------------------------------------------------------
# Decoding: the compressed keys of a cache, and the votes of single queries. Each row is
# one document from position 0; the key/value slots hold every token, token p in slot p.


def compressed_after_prompt(cache, lengths, compress, cmp_len, cmp_stride):
  """The cache with `compress`(k, v) of its key/value slots -> {name: [B, Tc, ...]}
  (spans of max_len slots) added, zero where a span is not complete within its row's
  `lengths` [B] tokens (written once it is, compressed_after_token)."""
  compressed = compress(cache['k'], cache['v'])
  count = num_compressed(cache['k'].shape[1], cmp_len, cmp_stride)
  complete = complete_spans(lengths - 1, cmp_len, cmp_stride, count)
  return {**cache, **{name: jnp.where(expand_to(complete, x), x, 0) for name, x in compressed.items()}}


def compressed_after_token(cache, positions, compress, cmp_len, cmp_stride):
  """The cache once the token at `positions` [B] is in its slots: the span that this
  token completes (if any) compressed from the slots and written at its index."""
  span = positions - cmp_len + 1  # the first token of the span ending here
  tokens = span[:, None] + jnp.arange(cmp_len)
  compressed = compress(take_tokens(cache['k'], tokens), take_tokens(cache['v'], tokens))  # {name: [B, 1, ...]}
  count = num_compressed(cache['k'].shape[1], cmp_len, cmp_stride)
  here = (jnp.arange(count) == span[:, None] // cmp_stride) & ((span >= 0) & (span % cmp_stride == 0))[:, None]
  return {**cache, **{name: jnp.where(expand_to(here, x), x.astype(cache[name].dtype), cache[name])
                      for name, x in compressed.items()}}


def take_tokens(x, positions):
  """x [B, T, ...] at `positions` [B, n] (clipped into the row) -> [B, n, ...]."""
  index = jnp.clip(positions, 0, x.shape[1] - 1)
  return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def expand_to(mask, x):
  """`mask` [B, n] with trailing axes of size 1 to broadcast against x [B, n, ...]."""
  return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def token_probabilities(q, positions, k_cmp, *, scale, cmp_len, cmp_stride):
  """float32 [B, n, Hkv, G, Tc]: the softmax of each query q [B, n, H, D] at `positions`
  [B, n] over the compressed keys k_cmp [B, Tc, Hkv, D] complete at its position (all 0
  for a query that sees none)."""
  b, n, heads, dim = q.shape
  count, kv_heads = k_cmp.shape[1], k_cmp.shape[2]
  queries = q.reshape(b, n, kv_heads, heads // kv_heads, dim)
  s = jnp.einsum('bnkgd,bjkd->bnkgj', queries, k_cmp, preferred_element_type=jnp.float32) * scale
  return softmax_where(s, complete_spans(positions, cmp_len, cmp_stride, count)[:, :, None, None])


def token_votes(p, *, cmp_len, cmp_stride, num_select, select_block):
  """float32 [B, n, Hkv, nS]: each query's probabilities p [B, n, Hkv, G, Tc] summed over
  its GQA group onto the selection blocks their spans overlap (eqs. 9 and 10)."""
  return p.sum(3) @ span_overlaps(p.shape[-1], cmp_len, cmp_stride, num_select, select_block)
