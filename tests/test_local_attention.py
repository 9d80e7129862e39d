"""Sliding-window and block-local mechanisms (MASFormer's sparse layers) against dense
masked attention with the same mask, spec errors, and a mixed-span model training."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracles import masked_softmax_attention
from train_helpers import logged_losses, run_script, tiny_argv

from sparseformer.config import base_config
from sparseformer.errors import UserError
from sparseformer.model import resolve_dims
from sparseformer.model.attention import AttentionContext, get_mechanism


def explicit_mask(spec, segments):
  name, size = spec.split(':')
  size = int(size)
  t = segments.shape[1]
  q, k = np.arange(t)[:, None], np.arange(t)[None, :]
  allowed = (k <= q) & (k > q - size) if name == 'window' else (k <= q) & (q // size == k // size)
  same_document = np.asarray(segments)[:, :, None] == np.asarray(segments)[:, None, :]
  return jnp.asarray(allowed[None] & same_document)


def run_mechanism(spec, q, k, v, segments, block_size):
  cfg = base_config().model
  cfg.num_layers, cfg.layer_attention, cfg.attention.block_size = 1, (spec,), block_size
  dims = resolve_dims(cfg, 259)
  ctx = AttentionContext(jnp.zeros(segments.shape, jnp.int32), segments, None, None)
  y, aux = get_mechanism(spec)(dims, 0, nnx.Rngs(0))(q, k, v, ctx)
  assert aux == {'losses': {}, 'stats': {}}
  return y


@pytest.mark.parametrize('spec', ['window:5', 'window:64', 'block_local:24', 'block_local:7'])
@pytest.mark.parametrize('kv_heads', [4, 1])
def test_local_layer_equals_dense_masked_attention(spec, kv_heads):
  keys = jax.random.split(jax.random.key(2), 3)
  b, t, h, d = 2, 150, 4, 16
  q = jax.random.normal(keys[0], (b, t, h, d))
  k = jax.random.normal(keys[1], (b, t, kv_heads, d))
  v = jax.random.normal(keys[2], (b, t, kv_heads, d))
  segments = jnp.asarray([[1] * 70 + [2] * 80, [1] * 150], jnp.int32)
  y = run_mechanism(spec, q, k, v, segments, block_size=64)
  want = masked_softmax_attention(q, k, v, explicit_mask(spec, segments))
  np.testing.assert_allclose(y, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('spec,message', [
    ('window', 'needs a positive size'), ('window:0', 'needs a positive size'), ('block_local:x', 'needs a positive size'),
    ('dense:3', 'takes no argument'), ('windw:8', "did you mean 'window'"),
])
def test_bad_specs_are_user_errors(spec, message):
  with pytest.raises(UserError, match=message):
    get_mechanism(spec)


def test_mixed_span_model_trains(tmp_path, data_dir):
  spec = "('dense', 'window:8', 'block_local:16', 'dense')"
  result = run_script('train.py', tiny_argv(tmp_path / 'run', data_dir, model__num_layers=4,
                                            model__layer_attention=spec, model__attention__block_size=64,
                                            train__steps=12))
  assert result.returncode == 0, result.stderr[-2000:]
  losses = logged_losses(tmp_path / 'run')
  assert losses[12] < losses[1] - 0.5, losses


@pytest.mark.parametrize('pattern,full', [('', ()), ('bottom:2', (0, 1)), ('top:1', (5,)), ('every:3', (2, 5)),
                                          ('0,4', (0, 4))])
def test_full_layer_patterns(pattern, full):
  m = base_config().model
  m.num_layers, m.attention.kind, m.attention.full_layers = 6, 'window:64', pattern
  expected = tuple('dense' if i in full else 'window:64' for i in range(6))
  assert resolve_dims(m, 259).layer_mechanisms == expected


@pytest.mark.parametrize('field,value,message', [
    ('full_layers', 'top:x', 'top needs a positive count'), ('full_layers', '7', r'lie in \[0, 4\)'),
    ('full_layers', 'middle', 'bottom:N, top:N'), ('kind', 'window', 'needs a positive size'),
    ('block_size', 100, 'use 64 or 128'),
])
def test_bad_attention_config_is_a_user_error(field, value, message):
  from sparseformer import config as config_lib
  cfg = base_config()
  cfg.model.attention[field] = value
  with pytest.raises(UserError, match=message):
    config_lib.validate(cfg)
