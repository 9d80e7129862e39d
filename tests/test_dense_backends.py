"""The dense mechanism's paths: packed rows through the block-sparse kernels equal the
XLA document mask (outputs and gradients), rows without segment ids equal one document
per row, the backend choice per platform, and the config check."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparseformer import config as config_lib
from sparseformer.config import base_config
from sparseformer.errors import UserError
from sparseformer.model import LanguageModel, resolve_dims
from sparseformer.model.attention import AttentionContext
from sparseformer.model.attention.dense import DenseAttention, causal_implementation, resolve_backend


def dense_layer(backend, block_size=64):
  m = base_config().model
  m.num_layers, m.attention.dense_backend, m.attention.block_size = 1, backend, block_size
  return DenseAttention(resolve_dims(m, 259), 0, nnx.Rngs(0))


def attend(layer, q, k, v, segments):
  ctx = AttentionContext(jnp.zeros(q.shape[:2], jnp.int32), segments, None, None)
  return layer(q, k, v, ctx)[0]


def random_qkv(t, heads, kv_heads, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  b, d = 2, 16
  return (jax.random.normal(keys[0], (b, t, heads, d)), jax.random.normal(keys[1], (b, t, kv_heads, d)),
          jax.random.normal(keys[2], (b, t, kv_heads, d)))


@pytest.mark.parametrize('kv_heads', [4, 2])
def test_block_sparse_backend_equals_xla_mask_on_packed_documents(kv_heads):
  t = 150  # not a multiple of the 64-token block
  q, k, v = random_qkv(t, 4, kv_heads)
  segments = jnp.asarray([[1] * 40 + [2] * 90 + [0] * 20, [1] * 70 + [2] * 5 + [3] * 75], jnp.int32)
  weights = jax.random.normal(jax.random.key(9), q.shape)

  def loss_and_grads(backend):
    layer = dense_layer(backend)
    loss = lambda q, k, v: (attend(layer, q, k, v, segments) * weights).sum()
    return attend(layer, q, k, v, segments), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  y_sparse, grads_sparse = loss_and_grads('block_sparse')
  y_mask, grads_mask = loss_and_grads('xla_mask')
  np.testing.assert_allclose(y_sparse, y_mask, rtol=2e-5, atol=2e-5)
  for sparse, masked in zip(grads_sparse, grads_mask):
    np.testing.assert_allclose(sparse, masked, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('backend', ['xla_mask', 'block_sparse'])
def test_no_segment_ids_equals_one_document_per_row(backend):
  q, k, v = random_qkv(96, 4, 2, seed=1)
  layer = dense_layer(backend)
  ones = jnp.ones(q.shape[:2], jnp.int32)
  np.testing.assert_allclose(attend(layer, q, k, v, None), attend(layer, q, k, v, ones), rtol=2e-5, atol=2e-5)


def test_model_without_segment_ids_equals_all_ones():
  m = base_config().model
  m.d_model, m.num_layers, m.num_heads, m.dtype = 64, 2, 4, 'float32'
  m.attention.kind, m.attention.full_layers, m.attention.block_size = 'window:16', 'top:1', 64
  model = LanguageModel(resolve_dims(m, 259), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(3), (2, 80), 3, 259)
  positions = jnp.broadcast_to(jnp.arange(80), tokens.shape)

  def loss_and_grads(segments):
    def loss(model):
      return model(tokens, positions, segments)[0].mean()
    return nnx.value_and_grad(loss)(model)

  loss_none, grads_none = loss_and_grads(None)
  loss_ones, grads_ones = loss_and_grads(jnp.ones(tokens.shape, jnp.int32))
  np.testing.assert_allclose(loss_none, loss_ones, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(grads_none), jax.tree.leaves(grads_ones)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_backend_and_implementation_per_platform():
  assert resolve_backend('auto', 'gpu') == 'block_sparse'
  assert resolve_backend('auto', 'cpu') == resolve_backend('auto', 'tpu') == 'xla_mask'
  assert resolve_backend('block_sparse', 'cpu') == 'block_sparse'
  assert causal_implementation(jnp.bfloat16, 'gpu') == 'cudnn'
  assert causal_implementation(jnp.float32, 'gpu') == 'xla'  # cuDNN takes half precision only
  assert causal_implementation(jnp.bfloat16, 'cpu') == 'xla'


def test_unknown_dense_backend_is_a_user_error():
  cfg = base_config()
  cfg.model.attention.dense_backend = 'cudnn'
  with pytest.raises(UserError, match='dense_backend.*auto, xla_mask, block_sparse'):
    config_lib.validate(cfg)
