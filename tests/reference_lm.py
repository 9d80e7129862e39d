"""A plain NumPy (float64) forward pass of the Llama / Mistral / Qwen2 / Qwen3 decoder,
written from the published architecture, not from sparseformer's modules: the oracle
for the model's optional parts (q/k/v and output biases, per-head q/k RMSNorm, untied
embeddings, RoPE scalings) on one unpacked row of dense causal attention.

`logits` reads sparseformer's parameter tree as a pure dict (nnx.state(model,
nnx.Param).to_pure_dict()); its layout is the only thing taken from sparseformer.
`hf_logits` reads transformers' tensor names and layouts and its config.json fields
(as transformers' modeling_llama / mistral / qwen2 / qwen3 compute them), the oracle of
the import mapping."""

import numpy as np
from oracles import masked_softmax_attention


def rms_norm(x, scale, eps):
  return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rotate(x, inv_freq):
  """RoPE on x [T, heads, head_dim], pairing feature i with i + head_dim / 2."""
  angles = np.arange(x.shape[0])[:, None] * inv_freq[None, :]  # [T, head_dim / 2]
  cos, sin = np.cos(angles)[:, None, :], np.sin(angles)[:, None, :]
  half = x.shape[-1] // 2
  first, second = x[..., :half], x[..., half:]
  return np.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


def projection(x, layer, name, equation):
  y = np.einsum(equation, x, np.asarray(layer[name]['kernel'], np.float64))
  if 'bias' in layer[name]:
    y = y + np.asarray(layer[name]['bias'], np.float64)
  return y


def causal_attention(q, k, v, logit_scale=1.0, window=None):
  """softmax(q k^T / sqrt(d)) v over keys at or before each query (within the last
  `window` keys), with k, v [T, kv_heads, d] shared by groups of q's [T, heads, d]."""
  return masked_softmax_attention(q[None], k[None], v[None], causal=True, window=window,
                                  scale=logit_scale / np.sqrt(q.shape[-1]), float64=True)[0]


def attention(x, layer, inv_freq, eps, logit_scale=1.0):
  q = projection(x, layer, 'query', 'td,dhk->thk')
  k = projection(x, layer, 'key', 'td,dhk->thk')
  v = projection(x, layer, 'value', 'td,dhk->thk')
  if 'query_norm' in layer:
    q = rms_norm(q, np.asarray(layer['query_norm']['scale'], np.float64), eps)
    k = rms_norm(k, np.asarray(layer['key_norm']['scale'], np.float64), eps)
  mixed = causal_attention(rotate(q, inv_freq), rotate(k, inv_freq), v, logit_scale)
  return projection(mixed, layer, 'out', 'thk,hkd->td')


def swiglu(x, mlp):
  gate = x @ np.asarray(mlp['gate']['kernel'], np.float64)
  up = x @ np.asarray(mlp['up']['kernel'], np.float64)
  return (gate / (1 + np.exp(-gate)) * up) @ np.asarray(mlp['down']['kernel'], np.float64)


def logits(params, tokens, inv_freq, eps, logit_scale=1.0):
  """float64 logits [T, vocab] of one row of token ids [T] (positions 0..T-1)."""
  embedding = np.asarray(params['embedding'], np.float64)
  x = embedding[np.asarray(tokens)]
  for index in sorted(params['blocks']):
    block = params['blocks'][index]
    x = x + attention(rms_norm(x, np.asarray(block['attention_norm']['scale'], np.float64), eps),
                      block['attention'], inv_freq, eps, logit_scale)
    x = x + swiglu(rms_norm(x, np.asarray(block['mlp_norm']['scale'], np.float64), eps), block['mlp'])
  x = rms_norm(x, np.asarray(params['final_norm']['scale'], np.float64), eps)
  unembedding = np.asarray(params['unembedding'], np.float64) if 'unembedding' in params else embedding.T
  return x @ unembedding


# ---------------------------------------------------------------------------------------
# transformers' layout: weight [out, in], y = x W^T + b


def hf_inverse_frequencies(hf, head_dim):
  """RoPE inverse frequencies of a config.json: default, linear or llama3 rope_scaling."""
  inv_freq = 1.0 / float(hf.get('rope_theta', 10000.0)) ** (np.arange(0, head_dim, 2) / head_dim)
  scaling = hf.get('rope_scaling') or {}
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind == 'linear':
    return inv_freq / scaling['factor']
  if kind == 'llama3':
    factor, original = scaling['factor'], scaling['original_max_position_embeddings']
    low, high = scaling['low_freq_factor'], scaling['high_freq_factor']
    wavelength = 2 * np.pi / inv_freq
    smooth = (original / wavelength - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    return np.where(wavelength < original / high, inv_freq, np.where(wavelength > original / low,
                                                                     inv_freq / factor, blended))
  assert kind == 'default', kind
  return inv_freq


def hf_linear(x, tensors, name):
  y = x @ np.asarray(tensors[f'{name}.weight'], np.float64).T
  if f'{name}.bias' in tensors:
    y = y + np.asarray(tensors[f'{name}.bias'], np.float64)
  return y


def hf_logits(tensors, hf, tokens):
  """float64 logits [T, vocab] of token ids [T] from transformers-named tensors."""
  heads, d_model = hf['num_attention_heads'], hf['hidden_size']
  kv_heads, head_dim = hf.get('num_key_value_heads') or heads, hf.get('head_dim') or d_model // heads
  eps, inv_freq = hf['rms_norm_eps'], hf_inverse_frequencies(hf, head_dim)
  window = hf.get('sliding_window') if hf['model_type'] == 'mistral' else None
  weight = lambda name: np.asarray(tensors[name], np.float64)  # noqa: E731
  x = weight('model.embed_tokens.weight')[np.asarray(tokens)]
  length = x.shape[0]
  for i in range(hf['num_hidden_layers']):
    prefix = f'model.layers.{i}'
    h = rms_norm(x, weight(f'{prefix}.input_layernorm.weight'), eps)
    q = hf_linear(h, tensors, f'{prefix}.self_attn.q_proj').reshape(length, heads, head_dim)
    k = hf_linear(h, tensors, f'{prefix}.self_attn.k_proj').reshape(length, kv_heads, head_dim)
    v = hf_linear(h, tensors, f'{prefix}.self_attn.v_proj').reshape(length, kv_heads, head_dim)
    if f'{prefix}.self_attn.q_norm.weight' in tensors:
      q = rms_norm(q, weight(f'{prefix}.self_attn.q_norm.weight'), eps)
      k = rms_norm(k, weight(f'{prefix}.self_attn.k_norm.weight'), eps)
    mixed = causal_attention(rotate(q, inv_freq), rotate(k, inv_freq), v, window=window)
    x = x + hf_linear(mixed.reshape(length, heads * head_dim), tensors, f'{prefix}.self_attn.o_proj')
    h = rms_norm(x, weight(f'{prefix}.post_attention_layernorm.weight'), eps)
    gate, up = hf_linear(h, tensors, f'{prefix}.mlp.gate_proj'), hf_linear(h, tensors, f'{prefix}.mlp.up_proj')
    x = x + hf_linear(gate / (1 + np.exp(-gate)) * up, tensors, f'{prefix}.mlp.down_proj')
  x = rms_norm(x, weight('model.norm.weight'), eps)
  head = weight('model.embed_tokens.weight') if hf.get('tie_word_embeddings') else weight('lm_head.weight')
  return x @ head.T
