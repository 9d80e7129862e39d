"""Native Sparse Attention (NSA; Yuan et al., 2025, "Native Sparse Attention: Hardware-Aligned
and Natively Trainable Sparse Attention", arXiv 2502.11089), through the block-sparse plan.

    nsa    (no argument; options model.attention.nsa.*, docs/nsa.md)

Three branches over the same rotated q, k, v, mixed per token and query head by learned
sigmoid gates of the layer input x (paper eq. 5):

    y = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win,    (g_cmp, g_slc, g_win) = sigmoid(x W_g)

1. Compression (section 3.3.1): keys and values are cut into spans of l = cmp_len tokens
   every d = cmp_stride tokens; phi turns span j, the tokens [j d, j d + l), into one key
   (and, with its own weights, one value) per kv head: a learned position embedding
   [l, D] added to the span's tokens, flattened to l x D, a linear map to D
   (`compression=linear`: 2 l D^2 parameters per kv head and layer, the bulk of a small
   model's; `weighted` keeps the position embedding and learns one weight per span
   position instead). phi starts as mean pooling (identity / l per position, no position
   embedding), so a layer converted
   from a dense checkpoint starts from pooled keys. The keys are made from post-RoPE keys
   (ours; the paper leaves it open). Queries attend densely over the compressed keys a
   span at a time complete, j d + l - 1 <= t, within their document
   (masks.CompressedCausal; a span that crosses documents is seen by no query). The first
   l - 1 tokens see none and get 0 from this branch.
2. Selection (section 3.3.2): blocks of l' = select_block tokens scored by the
   compression branch's attention probabilities (compressed_scores.py: eq. 9 maps keys to
   blocks, eq. 10 sums a GQA group's heads, so the group shares the choice). The top
   n = select_count blocks, always including the first block of the document and the
   local_blocks most recent (the query's own and those before it), form a plan per kv
   head. Two deviations, both because our plans choose key blocks per query block of
   model.attention.block_size tokens, not per query token as the paper's kernel does:
   the block's tokens vote together (their scores summed), and query block I takes the
   votes of the query block before it, I - 1. Votes of block I itself would make token t's
   choice depend on the queries and keys of the later tokens of its block: a leak of the
   future in training, and a choice decoding could not make. With the previous block's
   votes every choice is known when the block's first token arrives. Query block 0 has
   the forced blocks only. The choice is not differentiated (as in the paper).
3. Sliding window (section 3.3.3): the last `window` tokens of the query's document.

The compression and window branches run on kernel tiles of `branch_block` tokens (128 by
default) whatever model.attention.block_size is: their outputs do not depend on the tile,
and on a GPU 128-token tiles run faster than the paper's 64-token selection blocks.

Gates: W_g [d_model, 3, H] starts at zero, so every gate starts at sigmoid(0) = 1/2: no
branch is preferred before training, and the three branches (each a convex combination of
values) start summed at the scale of 1.5 dense outputs; the paper leaves the gates'
initialisation open.

Decoding (docs/nsa.md) computes the three branches of one token in plain jnp over a cache
of every token's key and value, phi's key and value of each complete span and the votes of
the newest token's query block and the one before.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import block_sparse_attention, masks, plan_from_block_mask, plan_from_mask
from sparseformer.model.attention import block_selection, kv_cache
from sparseformer.model.attention.base import (KEYS, QUERIES, ROWS, Mechanism, Option, first_problem, kernel,
                                               mean_causal_keys, no_aux, register, softmax_flops, softmax_scale)
from sparseformer.model.attention.block_selection import choose_by_compressed_scores, chosen_fraction
from sparseformer.model.attention.compressed_scores import compressed_key_segments, span_tokens
from sparseformer.model.layers import param

BRANCHES = ('cmp', 'slc', 'win')  # the order of the gates in W_g
COMPRESSIONS = ('linear', 'weighted')
KV_HEAD_BLOCKS = 'batch kv_heads . .'  # [B, Hkv, nQ, nK] per-kv-head block choices


BRANCH_BLOCKS = (64, 128, 256, 512)  # model.attention.block_size's values


def positive(n):
  return n >= 1


def compress(x, position, weight, cmp_len, cmp_stride):
  """phi of every complete span: x [B, T, Hkv, D], position [Hkv, l, D], weight [Hkv, l, D, D]
  (compression=linear) or [Hkv, l] (weighted: a learned weight per position) -> [B, Tc, Hkv, D].
  cmp_len is a multiple of cmp_stride: span j is the stride chunks j .. j + l/d - 1."""
  spans = span_tokens(x, cmp_len, cmp_stride) + jnp.swapaxes(position, 0, 1).astype(x.dtype)  # [B, Tc, l, Hkv, D]
  if weight.ndim == 2:
    return jnp.einsum('bjlhd,hl->bjhd', spans, weight.astype(x.dtype))
  return jnp.einsum('bjlhd,hlde->bjhe', spans, weight.astype(x.dtype))


def mean_pooling_map(kv_heads, cmp_len, dim, compression):
  """phi's initial weight, [Hkv, l, D, D] (linear) or [Hkv, l] (weighted): the mean of the
  span's tokens."""
  if compression == 'weighted':
    return jnp.full((kv_heads, cmp_len), 1 / cmp_len)
  return jnp.broadcast_to(jnp.eye(dim) / cmp_len, (kv_heads, cmp_len, dim, dim))


@register('nsa')
class NativeSparseAttention(Mechanism):
  extra_inputs = ('layer_input',)  # the branch gates read the normed layer input
  options_section = 'nsa'  # model.attention.nsa, docs/nsa.md
  OPTIONS = {
      'cmp_len': Option(32, 'tokens each compressed key summarises (l), a multiple of cmp_stride', positive,
                        'use a positive length'),
      'cmp_stride': Option(16, 'tokens between the starts of consecutive compressed keys (d)', positive,
                           'use a positive stride'),
      'select_block': Option(64, 'tokens of a selection block (l\'), a multiple of block_size and of cmp_stride',
                             positive, 'use a positive length'),
      'select_count': Option(16, 'selection blocks per query block (n), the first and the local ones included',
                             positive, 'use a count >= 1'),
      'local_blocks': Option(2, 'most recent selection blocks always chosen, the query\'s own included', positive,
                             'use a count >= 1'),
      'compression': Option('linear', 'phi: linear (the span flattened, mapped l x D -> D per kv head: the paper\'s '
                            'learned map) | weighted (a learned weight per span position: l parameters, for models '
                            'too small for l x D x D)', choices=COMPRESSIONS),
      'window': Option(512, 'tokens of the sliding-window branch (w), the query included', positive,
                       'use a positive length'),
      'branch_block': Option(128, 'kernel tile (tokens) of the compression and window branches; the selection '
                             'branch tiles by model.attention.block_size. The outputs do not depend on it; on a GPU '
                             '128 runs faster than 64', lambda b: b in BRANCH_BLOCKS, 'use 64, 128, 256 or 512'),
  }

  @classmethod
  def validate_options(cls, options, model_cfg, arguments):
    """Own values; with nsa layers, the lengths the compression and the plans need."""
    problem = super().validate_options(options, model_cfg, arguments)
    if problem or not arguments:
      return problem
    block, o, path = model_cfg.attention.block_size, options, 'model.attention.nsa'
    return first_problem([
        (o.cmp_len % o.cmp_stride == 0, f'{path}.cmp_len={o.cmp_len}: use a multiple of {path}.cmp_stride '
                                        f'({o.cmp_stride})'),
        (o.select_block % block == 0, f'{path}.select_block={o.select_block}: use a multiple of '
                                      f'model.attention.block_size ({block})'),
        (o.select_block % o.cmp_stride == 0, f'{path}.select_block={o.select_block}: use a multiple of '
                                             f'{path}.cmp_stride ({o.cmp_stride})'),
    ])

  def __init__(self, dims, layer_index, rngs):
    super().__init__(dims, layer_index, rngs)
    o = self.options.nsa
    kv_heads, dim = dims.num_kv_heads, dims.head_dim
    positions, maps = ('kv_heads', 'nsa_span', 'head_dim'), ('kv_heads', 'nsa_span', 'head_dim', 'nsa_out')

    def position():
      return param(rngs, (kv_heads, o.cmp_len, dim), positions, dtype=dims.weight_dtype,
                   value=jnp.zeros((kv_heads, o.cmp_len, dim)))

    def linear_map():
      value = mean_pooling_map(kv_heads, o.cmp_len, dim, o.compression)
      return param(rngs, value.shape, maps[:value.ndim], dtype=dims.weight_dtype, value=value)

    self.key_position, self.key_map = position(), linear_map()
    self.value_position, self.value_map = position(), linear_map()
    # Zero: every gate starts at 1/2 (module docstring).
    self.gate = param(rngs, (dims.d_model, len(BRANCHES), dims.num_heads), ('embed', 'nsa_branch', 'heads'),
                      dtype=dims.weight_dtype, value=jnp.zeros((dims.d_model, len(BRANCHES), dims.num_heads)))

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    """Per token: the complete compressed keys, the keys of the chosen blocks (count of them
    or all the causal ones; the own block up to the query) and the window, averaged over
    the positions of one document; plus the selection's second pass over the compressed
    keys (scores, no values) and phi's maps of keys and values (one span every stride
    tokens). The gates are a projection of the layer input, as q, k, v: not counted."""
    o, heads, dim = options.nsa, dims.num_heads, dims.head_dim
    t = np.arange(seq_len)
    compressed = np.maximum(0, (t - o.cmp_len + 1) // o.cmp_stride + 1).mean()
    own = t // o.select_block
    selected = ((np.minimum(o.select_count, own + 1) - 1) * o.select_block + t - own * o.select_block + 1).mean()
    keys = compressed + selected + mean_causal_keys(seq_len, o.window)
    scoring = 2 * heads * dim * compressed
    phi = 2 * 2 * dims.num_kv_heads * o.cmp_len * dim * (dim if o.compression == 'linear' else 1) / o.cmp_stride
    return softmax_flops(heads, dim, keys) + scoring + phi

  # --------------------------------------------------------------------------------------
  # the layer

  def forward(self, q, k, v, ctx, layer_input):
    scale = softmax_scale(q, ctx)
    segments = None if ctx.segment_ids is None else ctx.segment_ids.astype(jnp.int32)
    k_cmp, v_cmp = self.compressed_keys(k, v)
    o_cmp, lse = self.compressed_attention(q, k_cmp, v_cmp, segments, self.compressed_segments(segments), scale=scale)
    chosen, allowed = self.choose(q, k_cmp, lse, segments, scale)
    o_slc = self.selected_attention(q, k, v, chosen, segments, scale=scale)
    o_win = self.window_attention(q, k, v, segments, scale=scale)
    gates = self.branch_gates(layer_input)  # [B, T, 3, H]
    y = sum(gates[:, :, i, :, None] * branch for i, branch in enumerate((o_cmp, o_slc, o_win)))
    aux = no_aux()
    aux['stats']['nsa_select_fraction'] = chosen_fraction(chosen, allowed, self.block_size,
                                                          self.options.nsa.select_block)
    return y.astype(q.dtype), aux

  def compressed_keys(self, k, v):
    """(k_cmp, v_cmp) [B, Tc, Hkv, D]: phi of every complete span of the keys and values."""
    o = self.options.nsa
    return (compress(k, self.key_position[...], self.key_map[...], o.cmp_len, o.cmp_stride),
            compress(v, self.value_position[...], self.value_map[...], o.cmp_len, o.cmp_stride))

  def compress(self, k, v):
    """compressed_keys as the decoding cache's entries {'k_cmp': ..., 'v_cmp': ...}."""
    return dict(zip(('k_cmp', 'v_cmp'), self.compressed_keys(k, v)))

  def compressed_segments(self, segment_ids):
    return compressed_key_segments(segment_ids, self.options.nsa.cmp_len, self.options.nsa.cmp_stride)

  def branch_gates(self, x):
    """[B, T, 3, H] float32: sigmoid(x W_g), the gates of BRANCHES."""
    return jax.nn.sigmoid(jnp.einsum('btd,dnh->btnh', x.astype(jnp.float32), self.gate[...].astype(jnp.float32)))

  def choose(self, q, k_cmp, lse, segment_ids, scale):
    """(chosen [B, Hkv, nQ, nK] kernel blocks, allowed [B, nQ, nS] selection blocks) of
    every query block, from the previous query block's votes (module docstring)."""
    o = self.options.nsa
    return choose_by_compressed_scores(q, k_cmp, lse, segment_ids, scale=scale, block=self.block_size,
                                       cmp_len=o.cmp_len, cmp_stride=o.cmp_stride, select_block=o.select_block,
                                       select_count=o.select_count, local_blocks=o.local_blocks)

  # --------------------------------------------------------------------------------------
  # decoding: the key/value slots of every token (the selection and window branches read
  # them), phi's key and value of every complete span and the vote sums of
  # block_selection.py

  def init_cache(self, batch, max_len, kv_heads, head_dim, dtype):
    cache = super().init_cache(batch, max_len, kv_heads, head_dim, dtype)
    return block_selection.init_compressed_cache(cache, self.compress, self.options.nsa)

  def prefill(self, q, k, v, ctx, cache, lengths, layer_input):
    y, _ = self(q, k, v, ctx, layer_input=layer_input)
    cache = kv_cache.fill(cache, k, v, lengths)
    return y, block_selection.prefill_compressed_cache(q, cache, lengths, self.compress, self.options.nsa,
                                                       scale=softmax_scale(q, ctx), block=self.block_size)

  def decode(self, q, k, v, ctx, cache, layer_input):
    """The gated sum of the three branches for one token per row (the training forward's,
    in plain jnp over the cache)."""
    scale, positions = softmax_scale(q, ctx), ctx.positions[:, 0]
    cache, p, selected = block_selection.decode_compressed_cache(q, k, v, cache, positions, self.compress,
                                                                 self.options.nsa, scale=scale, block=self.block_size)
    o_cmp = jnp.einsum('bnkgj,bjkd->bnkgd', p, cache['v_cmp'].astype(jnp.float32)).reshape(q.shape)
    window = kv_cache.causal(cache, positions) & (positions[:, None] - cache['position'] < self.options.nsa.window)
    branches = (o_cmp, kv_cache.attend(q, cache, selected, scale), kv_cache.attend(q, cache, window, scale))
    gates = self.branch_gates(layer_input)  # [B, 1, 3, H]
    y = sum(gates[:, :, i, :, None] * branch for i, branch in enumerate(branches))
    return y.astype(q.dtype), cache

  # --------------------------------------------------------------------------------------
  # kernels

  @kernel(QUERIES, KEYS, KEYS, ROWS, ROWS, out=(QUERIES, 'batch heads .'))
  def compressed_attention(self, q, k_cmp, v_cmp, segment_ids, cmp_segment_ids, *, scale):
    """(output [B, T, H, D], LSE [B, H, T]) of the queries over the compressed keys."""
    o = self.options.nsa
    block = o.branch_block
    if k_cmp.shape[1] == 0:  # a row shorter than one span: no query sees a compressed key
      return jnp.zeros_like(q), jnp.full((q.shape[0], q.shape[2], q.shape[1]), -jnp.inf, jnp.float32)
    plan = plan_from_mask(masks.CompressedCausal(o.cmp_len, o.cmp_stride), q_len=q.shape[1], kv_len=k_cmp.shape[1],
                          block_q=block, block_kv=block, q_segment_ids=segment_ids, kv_segment_ids=cmp_segment_ids)
    return block_sparse_attention(q, k_cmp, v_cmp, plan, scale=scale, return_lse=True)

  @kernel(QUERIES, KEYS, KEYS, KV_HEAD_BLOCKS, ROWS, out=QUERIES)
  def selected_attention(self, q, k, v, chosen, segment_ids, *, scale):
    """Attention over the chosen blocks [B, Hkv, nQ, nK] (a plan per kv head), causal."""
    block = self.block_size
    plan = plan_from_block_mask(chosen, q_len=q.shape[1], block_q=block, block_kv=block, segment_ids=segment_ids)
    return block_sparse_attention(q, k, v, plan, scale=scale)

  @kernel(QUERIES, KEYS, KEYS, ROWS, out=QUERIES)
  def window_attention(self, q, k, v, segment_ids, *, scale):
    block = self.options.nsa.branch_block
    plan = plan_from_mask(masks.causal_window(self.options.nsa.window), q_len=q.shape[1], block_q=block,
                          block_kv=block, segment_ids=segment_ids)
    return block_sparse_attention(q, k, v, plan, scale=scale)

