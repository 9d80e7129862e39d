"""A plain NumPy (float64) forward pass of the Llama / Mistral / Qwen2 / Qwen3 decoder,
written from the published architecture, not from sparseformer's modules: the oracle
for the model's optional parts (q/k/v and output biases, per-head q/k RMSNorm, untied
embeddings, RoPE scalings) on one unpacked row of dense causal attention.

`params` is sparseformer's parameter tree as a pure dict (nnx.state(model,
nnx.Param).to_pure_dict()); its layout is the only thing taken from sparseformer."""

import numpy as np


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


def attention(x, layer, inv_freq, eps, logit_scale=1.0):
  q = projection(x, layer, 'query', 'td,dhk->thk')
  k = projection(x, layer, 'key', 'td,dhk->thk')
  v = projection(x, layer, 'value', 'td,dhk->thk')
  if 'query_norm' in layer:
    q = rms_norm(q, np.asarray(layer['query_norm']['scale'], np.float64), eps)
    k = rms_norm(k, np.asarray(layer['key_norm']['scale'], np.float64), eps)
  q, k = rotate(q, inv_freq), rotate(k, inv_freq)
  group = q.shape[1] // k.shape[1]
  k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
  scores = np.einsum('qhk,shk->hqs', q, k) * logit_scale / np.sqrt(q.shape[-1])
  length = x.shape[0]
  scores = np.where(np.tril(np.ones((length, length), bool))[None], scores, -np.inf)
  weights = np.exp(scores - scores.max(-1, keepdims=True))
  weights /= weights.sum(-1, keepdims=True)
  mixed = np.einsum('hqs,shk->qhk', weights, v)
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
