"""The dense attention oracle of the tests: softmax attention under an explicit mask,
written from its definition (no kernel, no mechanism, nothing of sparseformer's), which
every check of a kernel or a mechanism against dense attention uses.

    masked_softmax_attention(q, k, v, allowed=None, *, causal=False, window=None,
                             segment_ids=None, key_bias=None, scale=None,
                             float64=False, return_lse=False)

Shapes: q [B, Tq, H, D]; k, v [B, Tk, Hkv, D] with H a multiple of Hkv (grouped-query
attention: query head h reads kv head h // (H // Hkv)).

The keys a query sees are those that every given condition allows:
  allowed      bool [B or 1, Tq, Tk] for every head, or [B or 1, Hm, Tq, Tk] with H a
               multiple of Hm: query head h follows mask head h // (H // Hm) (masks per
               query head, per kv head or per plan head);
  causal       key index <= query index;
  window       query index - key index < window (with causal: the query and the
               window - 1 keys before it);
  segment_ids  [B, T]: query and key in the same document (Tq == Tk).

Scores are q . k x scale (default D ** -0.5), plus key_bias [B, Hkv, Tk] where given
(the bias of the key's kv head). A query that sees no key gets output 0 with zero
gradients, and log-sum-exp EMPTY_ROW_LSE (the block-sparse kernels' convention).

Arithmetic: float32 in jax.numpy (differentiable, traceable under jit), or float64 in
NumPy with float64=True (no gradients). `attention_probabilities` gives the softmax
weights [B, H, Tq, Tk] themselves. tests/mask_oracle.py builds the `allowed` masks that
block-sparse plans stand for.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention.reference import EMPTY_ROW_LSE


def masked_softmax_attention(q, k, v, allowed=None, *, causal=False, window=None, segment_ids=None, key_bias=None,
                             scale=None, float64=False, return_lse=False):
  """Output [B, Tq, H, D] (and log-sum-exp [B, H, Tq] with return_lse); see the module."""
  xp = np if float64 else jnp
  weights, lse = softmax_weights(q, k, allowed, causal=causal, window=window, segment_ids=segment_ids,
                                 key_bias=key_bias, scale=scale, float64=float64)
  values = repeat_heads(as_float(v, float64), q.shape[2], axis=2, xp=xp)
  out = xp.einsum('bhqk,bkhd->bqhd', weights, values)
  return (out, lse) if return_lse else out


def attention_probabilities(q, k, allowed=None, **conditions):
  """The softmax weights [B, H, Tq, Tk] (0 for keys not seen); arguments as
  masked_softmax_attention's."""
  return softmax_weights(q, k, allowed, **conditions)[0]


def softmax_weights(q, k, allowed=None, *, causal=False, window=None, segment_ids=None, key_bias=None, scale=None,
                    float64=False):
  """(weights [B, H, Tq, Tk], log-sum-exp [B, H, Tq]) of the visible keys' scores."""
  xp = np if float64 else jnp
  scores = attention_scores(as_float(q, float64), as_float(k, float64), key_bias, scale, float64)
  visible = visible_keys(scores.shape, allowed, causal, window, segment_ids, xp)
  return masked_softmax(scores, visible, xp)


def attention_scores(q, k, key_bias, scale, float64):
  """[B, H, Tq, Tk]: q . k x scale (default D ** -0.5) + the key's bias."""
  xp = np if float64 else jnp
  heads = q.shape[2]
  scale = q.shape[-1] ** -0.5 if scale is None else scale
  scores = xp.einsum('bqhd,bkhd->bhqk', q, repeat_heads(k, heads, axis=2, xp=xp)) * scale
  if key_bias is not None:
    scores = scores + repeat_heads(as_float(key_bias, float64), heads, axis=1, xp=xp)[:, :, None, :]
  return scores


def visible_keys(shape, allowed, causal, window, segment_ids, xp):
  """bool, broadcastable to `shape` [B, H, Tq, Tk]: the keys every condition allows."""
  heads, q_len, kv_len = shape[1:]
  query, key = xp.arange(q_len)[:, None], xp.arange(kv_len)[None, :]
  visible = xp.ones((1, 1, q_len, kv_len), bool)
  if allowed is not None:
    allowed = xp.asarray(allowed, bool)
    visible = visible & repeat_heads(allowed[:, None] if allowed.ndim == 3 else allowed, heads, axis=1, xp=xp)
  if causal:
    visible = visible & (key <= query)
  if window:
    visible = visible & (query - key < window)
  if segment_ids is not None:
    ids = xp.asarray(segment_ids)
    visible = visible & (ids[:, None, :, None] == ids[:, None, None, :])
  return visible


def masked_softmax(scores, visible, xp):
  """(weights, log-sum-exp) over the last axis of the visible scores, stabilised by the row
  maximum; a row with no visible score has weights 0 and log-sum-exp EMPTY_ROW_LSE."""
  scores = xp.where(visible, scores, -xp.inf)
  row_max = scores.max(-1, keepdims=True)
  row_max = xp.where(xp.isfinite(row_max), row_max, 0.0)
  exps = xp.exp(scores - row_max)
  total = exps.sum(-1, keepdims=True)
  weights = exps / xp.where(total > 0, total, 1.0)
  total, row_max = total[..., 0], row_max[..., 0]
  lse = xp.where(total > 0, row_max + xp.log(xp.where(total > 0, total, 1.0)), EMPTY_ROW_LSE)
  return weights, lse


def repeat_heads(x, heads, axis, xp=np):
  """x with its head `axis` widened to `heads` entries: entry h is x's h // (heads // n)."""
  return xp.repeat(x, heads // x.shape[axis], axis=axis)


def as_float(x, float64):
  """float64 NumPy, or float32 jax.numpy."""
  return np.asarray(x, np.float64) if float64 else jnp.asarray(x).astype(jnp.float32)


def check_layer_against_oracle(layer_call, q, k, v, d_out, allowed, segment_ids=None, tolerance=2e-5):
  """A layer's output and q, k, v gradients (of sum(y * d_out), under jit) against
  masked_softmax_attention with `allowed`, to `tolerance` absolute and relative; returns
  the layer's aux. layer_call(q, k, v) -> (y, aux)."""
  def ours(q, k, v):
    y, aux = layer_call(q, k, v)
    return jnp.sum(y * d_out), (y, aux)

  def dense(q, k, v):
    y = masked_softmax_attention(q, k, v, allowed, segment_ids=segment_ids)
    return jnp.sum(y * d_out), y

  (_, (y, aux)), grads = jax.jit(jax.value_and_grad(ours, (0, 1, 2), has_aux=True))(q, k, v)
  (_, y_dense), dense_grads = jax.jit(jax.value_and_grad(dense, (0, 1, 2), has_aux=True))(q, k, v)
  np.testing.assert_allclose(y, y_dense, rtol=tolerance, atol=tolerance)
  for name, got, want in zip(('dq', 'dk', 'dv'), grads, dense_grads):
    np.testing.assert_allclose(got, want, rtol=tolerance, atol=tolerance, err_msg=name)
  return aux
