"""The decoder-only language model: embed -> N x [norm, (short conv), attention, norm, MLP] -> logits
(or the final hidden states, for a loss that unembeds them in chunks)."""

import jax
import jax.numpy as jnp
from flax import nnx

from sparseformer.model import rope
from sparseformer.model.attention import AttentionContext, get_mechanism
from sparseformer.model.layers import Einsum, RMSNorm, ShortConv, SwiGLU, output_std, param


class AttentionLayer(nnx.Module):
  """Projections, rotary embedding and grouped-query layout shared by all mechanisms;
  the mechanism decides which keys each query sees, and which inputs it reads (RoPE is
  computed only for a mechanism that reads rotated q and k)."""

  def __init__(self, dims, layer_index, rngs):
    d, h, kv, hd = dims.d_model, dims.num_heads, dims.num_kv_heads, dims.head_dim
    qkv_bias = 2 if dims.qkv_bias else 0  # Qwen2: biases on the q, k and v projections
    self.query = Einsum('btd,dhk->bthk', (d, h, hd), ('embed', 'heads', 'head_dim'), dims, rngs, bias_dims=qkv_bias)
    self.key = Einsum('btd,dhk->bthk', (d, kv, hd), ('embed', 'kv_heads', 'head_dim'), dims, rngs,
                      bias_dims=qkv_bias)
    self.value = Einsum('btd,dhk->bthk', (d, kv, hd), ('embed', 'kv_heads', 'head_dim'), dims, rngs,
                        bias_dims=qkv_bias)
    self.out = Einsum('bthk,hkd->btd', (h, hd, d), ('heads', 'head_dim', 'embed'), dims, rngs,
                      std=output_std(dims), bias_dims=1 if dims.out_bias else 0)
    if dims.qk_norm:  # Qwen3: RMSNorm of each head's q and k (over head_dim) before RoPE
      self.query_norm = RMSNorm(dims, rngs, size=hd, axis='head_dim')
      self.key_norm = RMSNorm(dims, rngs, size=hd, axis='head_dim')
    mechanism_cls = get_mechanism(dims.layer_mechanisms[layer_index])
    self.mechanism = mechanism_cls(dims, layer_index, rngs)

  def __call__(self, x, ctx):
    q, k, v, inputs = self.project(x, ctx)
    y, aux = self.mechanism(q, k, v, ctx, **inputs)
    return self.out(y), aux

  def prefill(self, x, ctx, cache, lengths):
    q, k, v, inputs = self.project(x, ctx)
    y, cache = self.mechanism.prefill(q, k, v, ctx, cache, lengths, **inputs)
    return self.out(y), cache

  def decode(self, x, ctx, cache):
    q, k, v, inputs = self.project(x, ctx)
    y, cache = self.mechanism.decode(q, k, v, ctx, cache, **inputs)
    return self.out(y), cache

  def project(self, x, ctx):
    """q, k (rotated; None for a mechanism that does not read them), v and the
    mechanism's extra inputs."""
    q_pre, k_pre = self.query(x), self.key(x)
    if hasattr(self, 'query_norm'):
      q_pre, k_pre = self.query_norm(q_pre), self.key_norm(k_pre)
    mechanism = self.mechanism
    q, k = None, None
    if mechanism.rotary:
      q, k = rope.apply_rotary(q_pre, ctx.cos, ctx.sin), rope.apply_rotary(k_pre, ctx.cos, ctx.sin)
    return q, k, self.value(x), mechanism.layer_inputs(pre_rope=(q_pre, k_pre), layer_input=x)


class Block(nnx.Module):
  """norm -> [short convolution] -> attention, then norm -> MLP, each added to the residual.
  With model.short_conv, a layer's decoding cache is {'attention': the mechanism's cache,
  'conv': the convolution's last inputs}."""

  def __init__(self, dims, layer_index, rngs):
    self.attention_norm = RMSNorm(dims, rngs)
    if dims.short_conv:
      self.short_conv = ShortConv(dims, rngs)
    self.attention = AttentionLayer(dims, layer_index, rngs)
    self.mlp_norm = RMSNorm(dims, rngs)
    self.mlp = SwiGLU(dims, rngs)

  def __call__(self, x, ctx):
    h = self.attention_norm(x)
    if hasattr(self, 'short_conv'):
      h = self.short_conv(h, ctx.positions, ctx.segment_ids)
    y, aux = self.attention(h, ctx)
    return self.add_mlp(x + y), aux

  def init_cache(self, batch, max_len, dims):
    cache = self.attention.mechanism.init_cache(batch, max_len, dims.num_kv_heads, dims.head_dim, dims.compute_dtype)
    if not hasattr(self, 'short_conv'):
      return cache
    return {'attention': cache, 'conv': self.short_conv.init_state(batch, dims.d_model, dims.compute_dtype)}

  def prefill(self, x, ctx, cache, lengths):
    h = self.attention_norm(x)
    if hasattr(self, 'short_conv'):
      conv_state = self.short_conv.prefill_state(h, lengths)
      h = self.short_conv(h, ctx.positions, ctx.segment_ids)
      y, cache = self.attention.prefill(h, ctx, cache['attention'], lengths)
      return self.add_mlp(x + y), {'attention': cache, 'conv': conv_state}
    y, cache = self.attention.prefill(h, ctx, cache, lengths)
    return self.add_mlp(x + y), cache

  def decode(self, x, ctx, cache):
    h = self.attention_norm(x)
    if hasattr(self, 'short_conv'):
      h, conv_state = self.short_conv.decode(h, cache['conv'])
      y, cache = self.attention.decode(h, ctx, cache['attention'])
      return self.add_mlp(x + y), {'attention': cache, 'conv': conv_state}
    y, cache = self.attention.decode(h, ctx, cache)
    return self.add_mlp(x + y), cache

  def add_mlp(self, x):
    return x + self.mlp(self.mlp_norm(x))


REMAT_POLICIES = {
    'full': None,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class LanguageModel(nnx.Module):

  def __init__(self, dims, rngs):
    self.dims = dims
    self.embedding = param(rngs, (dims.vocab_size, dims.d_model), ('vocab', 'embed'),
                           dtype=dims.weight_dtype, std=dims.init_std)
    self.blocks = nnx.List([Block(dims, i, rngs) for i in range(dims.num_layers)])
    self.final_norm = RMSNorm(dims, rngs)
    if not dims.tie_embeddings:
      self.unembedding = param(rngs, (dims.d_model, dims.vocab_size), ('embed', 'vocab'),
                               dtype=dims.weight_dtype, std=dims.init_std)

  def __call__(self, tokens, positions, segment_ids, *, training=False):
    """logits [B, T, vocab] (float32) and aux {'losses': {...}, 'stats': {...}} per layer.
    segment_ids None: each row is one document starting at position 0 (no document masks)."""
    hidden, aux = self.hidden(tokens, positions, segment_ids, training=training)
    return self.logits(hidden), aux

  def hidden(self, tokens, positions, segment_ids, *, training=False):
    """The final hidden states [B, T, d_model] (after the final norm, compute dtype) and aux:
    the loss can then unembed them a chunk at a time (training/loss.py)."""
    x, ctx = self.embed(tokens, positions, segment_ids, training)
    aux = {'losses': {}, 'stats': {}}
    for i, block in enumerate(self.blocks):
      x, layer_aux = self._run_block(block, x, ctx)
      for kind in ('losses', 'stats'):
        aux[kind].update({f'layer{i}/{name}': value for name, value in layer_aux[kind].items()})
    return self.final_norm(x), aux

  def embed(self, tokens, positions, segment_ids, training=False):
    """The embedded tokens (compute dtype) and the layers' AttentionContext."""
    dims = self.dims
    x = jnp.take(self.embedding[...], tokens, axis=0).astype(dims.compute_dtype)
    inv_freq, logit_scale = rope.inverse_frequencies(dims.head_dim, dims.rope)
    cos, sin = rope.rotary_angles(positions, inv_freq)
    return x, AttentionContext(positions, segment_ids, cos, sin, logit_scale=logit_scale, training=training)

  # --------------------------------------------------------------------------------------
  # decoding (sparseformer/generation.py drives these)

  def decoding_problems(self):
    """'layer i (spec): why' for each layer that cannot decode."""
    problems = []
    for i, block in enumerate(self.blocks):
      problem = block.attention.mechanism.decode_problem()
      if problem:
        problems.append(f'layer {i} ({self.dims.layer_mechanisms[i]}): {problem}')
    return problems

  def init_cache(self, batch, max_len):
    """Every layer's empty cache, for `batch` rows of up to `max_len` tokens."""
    return [block.init_cache(batch, max_len, self.dims) for block in self.blocks]

  def prefill(self, tokens, lengths, cache):
    """(logits [B, vocab] float32 of each row's last prompt token, cache) of prompts
    `tokens` [B, P] right-padded past `lengths` [B] (each row one document)."""
    length = tokens.shape[1]
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), tokens.shape)
    segment_ids = (positions < lengths[:, None]).astype(jnp.int32)
    x, ctx = self.embed(tokens, positions, segment_ids)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache, strict=True):
      x, layer_cache = block.prefill(x, ctx, layer_cache, lengths)
      new_cache.append(layer_cache)
    last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return self.logits(self.final_norm(last)), new_cache

  def decode(self, tokens, positions, cache):
    """(logits [B, vocab] float32, cache) of one token per row, `tokens` [B] at `positions` [B]."""
    x, ctx = self.embed(tokens[:, None], positions[:, None], None)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache, strict=True):
      x, layer_cache = block.decode(x, ctx, layer_cache)
      new_cache.append(layer_cache)
    return self.logits(self.final_norm(x[:, 0])), new_cache

  def logits(self, hidden):
    """float32 logits [..., vocab] of hidden states [..., d_model] (tied or untied unembedding)."""
    dtype = self.dims.compute_dtype
    if self.dims.tie_embeddings:
      logits = jnp.einsum('...d,vd->...v', hidden, self.embedding[...].astype(dtype))
    else:
      logits = jnp.einsum('...d,dv->...v', hidden, self.unembedding[...].astype(dtype))
    return logits.astype(jnp.float32)

  def _run_block(self, block, x, ctx):
    if self.dims.remat == 'none':
      return block(x, ctx)
    policy = REMAT_POLICIES[self.dims.remat]
    return nnx.remat(lambda b, x, c: b(x, c), policy=policy)(block, x, ctx)
