"""InfLLM-V2: dense-sparse switchable attention (Zhao et al., OpenBMB, 2025, arXiv
2509.24663; github.com/OpenBMB/infllmv2_cuda_impl, MiniCPM4): block-sparse attention that
reuses the dense layer's projections unchanged, so a dense checkpoint continues training
or runs inference with it as it is (no new parameters), dense for short rows and sparse
above a length.

    infllm_v2    options model.attention.infllm_v2

Rows shorter than `sparse_from` tokens run dense causal attention (the switch is by the
row length, known when the step is traced). Longer rows:

  1. Stage 1, choosing blocks: the keys are mean-pooled over spans of `cmp_len` tokens
     every `cmp_stride` tokens (the paper's compressed "semantic kernels"; no learned
     map, unlike NSA). Each query's softmax over the spans it can see (a span is visible
     once complete, and only within the query's document) is summed over the query heads
     of its GQA group, onto the selection blocks of `select_block` tokens each span
     overlaps, and over the tokens of a query block of model.attention.block_size
     (compressed_scores.selection_scores, shared with NSA). No gradient flows through
     the choice.
  2. Stage 2: per query block, the first block of its document, its own selection block
     and the `local_blocks - 1` before it (the paper's initial and local tokens) and the
     best-scoring others up to `select_count` blocks in all, one choice per kv head; the
     block-sparse kernel attends over them (causal, within documents).

Where it differs from the paper: the paper chooses per query token; our plans choose per
query block, and a query block ranks with the previous query block's scores, so that no
token's choice depends on later tokens (block_selection.py says why).

The paper's kernels fuse stage 1 with a max-pooling and an LSE approximation; here stage 1
is plain jax.numpy, one query block at a time (its cost, T x T / cmp_stride dot products
per head, is 1/cmp_stride of dense attention's).

Decoding (docs/block_selection.md) is dense or sparse as the forward over rows of the
cache's length; sparse, the cache keeps every token's key and value, the mean-pooled key
of each complete span and the votes of the newest token's query block and the one before.
"""

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import block_sparse_attention, masks, plan_from_block_mask, plan_from_mask
from sparseformer.model.attention import block_selection, compressed_scores, kv_cache
from sparseformer.model.attention.base import (KEYS, QUERIES, ROWS, Mechanism, Option, first_problem, kernel,
                                               mean_causal_keys, no_aux, plan_layout, register, softmax_flops,
                                               softmax_scale)


def mean_pooled_keys(k, cmp_len, cmp_stride):
  """[B, Tc, Hkv, D] in k's dtype: the mean of each span [j d, j d + l) of k [B, T, Hkv, D]
  (summed in float32; k's dtype so that the selection-score kernel takes it with q)."""
  return compressed_scores.span_tokens(k.astype(jnp.float32), cmp_len, cmp_stride).mean(2).astype(k.dtype)


@register('infllm_v2')
class InfLLMv2Attention(Mechanism):
  options_section = 'infllm_v2'  # model.attention.infllm_v2
  OPTIONS = {
      'sparse_from': Option(8192, 'rows of at least this many tokens run sparse, shorter ones dense',
                            lambda n: n >= 1, 'use a length of at least 1'),
      'cmp_len': Option(32, 'tokens of each mean-pooled key span (stage 1), a multiple of cmp_stride',
                        lambda n: n >= 1, 'use at least 1'),
      'cmp_stride': Option(16, 'tokens between the starts of consecutive spans', lambda n: n >= 1, 'use at least 1'),
      'select_block': Option(128, 'tokens of a selection block, a multiple of model.attention.block_size (the '
                             'paper: 64, with block_size 64)',
                             lambda n: n >= 1, 'use at least 1'),
      'select_count': Option(16, 'selection blocks per query block, the forced ones included',
                             lambda n: n >= 1, 'use at least 1'),
      'local_blocks': Option(2, 'local selection blocks always kept: the own block and the ones before it',
                             lambda n: n >= 1, 'use at least 1 (the own block)'),
  }

  @classmethod
  def validate_options(cls, options, model_cfg, arguments):
    problem = super().validate_options(options, model_cfg, arguments)
    if problem or not arguments:
      return problem
    block, path = model_cfg.attention.block_size, 'model.attention.infllm_v2'
    return first_problem([
        (options.select_block % block == 0, f'{path}.select_block={options.select_block}: use a multiple of '
                                            f'model.attention.block_size ({block})'),
        (options.cmp_len % options.cmp_stride == 0, f'{path}.cmp_len={options.cmp_len}: use a multiple of '
                                                    f'{path}.cmp_stride ({options.cmp_stride})'),
        (options.local_blocks + 1 <= options.select_count,
         f'{path}.select_count={options.select_count}: use at least local_blocks + 1 ({options.local_blocks + 1}): '
         'the first and the local blocks are always kept'),
    ])

  def forward(self, q, k, v, ctx):
    return self.attention(q, k, v, ctx, sparse=self.is_sparse(q.shape[1]))

  def is_sparse(self, length):
    """Whether rows of `length` tokens run sparse (shorter than sparse_from: dense)."""
    return length >= self.options.infllm_v2.sparse_from

  def attention(self, q, k, v, ctx, *, sparse):
    """(y, aux) of the layer, dense causal or (sparse) over the chosen blocks."""
    o = self.options.infllm_v2
    scale = softmax_scale(q, ctx)
    if not sparse:
      return self.dense_attention(q, k, v, ctx.segment_ids, scale=scale), no_aux()
    chosen, allowed = self.choose(q, k, ctx.segment_ids, scale)
    aux = no_aux()
    aux['stats']['infllm_v2_select_fraction'] = block_selection.chosen_fraction(chosen, allowed, self.block_size,
                                                                                o.select_block)
    plan = plan_from_block_mask(chosen, q_len=q.shape[1], block_q=self.block_size, block_kv=self.block_size,
                                segment_ids=ctx.segment_ids)
    return self.sparse_attention(q, k, v, plan, scale=scale), aux

  def choose(self, q, k, segment_ids, scale):
    """(chosen [B, Hkv, nQ, nK] kernel blocks, allowed [B, nQ, nS] selection blocks) of
    every query block (block_selection.py: from the previous query block's votes)."""
    o = self.options.infllm_v2
    k_cmp = self.compress(jax.lax.stop_gradient(k), None)['k_cmp']
    return block_selection.choose_by_compressed_scores(
        q, k_cmp, None, segment_ids, scale=scale, block=self.block_size, cmp_len=o.cmp_len,
        cmp_stride=o.cmp_stride, select_block=o.select_block, select_count=o.select_count,
        local_blocks=o.local_blocks)

  def compress(self, k, v):
    """Stage 1's compressed keys of k [B, T, Hkv, D]: {'k_cmp': [B, Tc, Hkv, D]}."""
    o = self.options.infllm_v2
    return {'k_cmp': mean_pooled_keys(k, o.cmp_len, o.cmp_stride)}

  # --------------------------------------------------------------------------------------
  # decoding: dense or sparse as the forward over rows of the cache's length (max_len);
  # sparse, the key/value slots of every token, the mean-pooled key of every complete span
  # and the vote sums of block_selection.py

  def init_cache(self, batch, max_len, kv_heads, head_dim, dtype):
    cache = super().init_cache(batch, max_len, kv_heads, head_dim, dtype)
    if not self.is_sparse(max_len):
      return cache
    return block_selection.init_compressed_cache(cache, self.compress, self.options.infllm_v2)

  def prefill(self, q, k, v, ctx, cache, lengths):
    sparse = self.is_sparse(cache['k'].shape[1])
    y, _ = self.attention(q, k, v, ctx, sparse=sparse)
    cache = kv_cache.fill(cache, k, v, lengths)
    if sparse:
      cache = block_selection.prefill_compressed_cache(q, cache, lengths, self.compress, self.options.infllm_v2,
                                                       scale=softmax_scale(q, ctx), block=self.block_size)
    return y, cache

  def decode(self, q, k, v, ctx, cache):
    if not self.is_sparse(cache['k'].shape[1]):
      return super().decode(q, k, v, ctx, cache)
    scale = softmax_scale(q, ctx)
    cache, _, visible = block_selection.decode_compressed_cache(
        q, k, v, cache, ctx.positions[:, 0], self.compress, self.options.infllm_v2, scale=scale,
        block=self.block_size)
    return kv_cache.attend(q, cache, visible, scale), cache

  def decode_visible(self, cache, positions):
    """Dense rows (cache shorter than sparse_from): every earlier token."""
    return kv_cache.causal(cache, positions)

  @kernel(QUERIES, KEYS, KEYS, plan_layout('kv_heads'), out=QUERIES)
  def sparse_attention(self, q, k, v, plan, *, scale):
    return block_sparse_attention(q, k, v, plan, scale=scale)

  @kernel(QUERIES, KEYS, KEYS, ROWS, out=QUERIES)
  def dense_attention(self, q, k, v, segment_ids, *, scale):
    block = self.block_size
    plan = plan_from_mask(masks.Causal(), q_len=q.shape[1], block_q=block, block_kv=block, segment_ids=segment_ids)
    return block_sparse_attention(q, k, v, plan, scale=scale)

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    """Dense below sparse_from; above, the select_count blocks of each query (fewer near
    the start) plus stage 1's scores against the spans (one D-wide dot per span and head)."""
    o = options.infllm_v2
    if seq_len < o.sparse_from:
      return super().attention_flops(argument, options, dims, seq_len)
    keys = mean_causal_keys(seq_len, o.select_count * o.select_block)
    spans = compressed_scores.num_compressed(seq_len, o.cmp_len, o.cmp_stride) / 2  # a query sees half on average
    return softmax_flops(dims.num_heads, dims.head_dim, keys) + 2 * dims.num_heads * dims.head_dim * spans
