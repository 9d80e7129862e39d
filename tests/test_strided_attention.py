"""The strided mechanism (Sparse Transformer's strided pattern at block granularity)
against dense softmax attention under the same mask written out per token: outputs and
gradients, single-document and packed rows, GQA, lengths that are not a multiple of the
block; its config errors; and its kernel run per device on a mesh of 8 CPU devices from
the layout it declares, equal to one device.

Tolerance: float32, |strided - dense| <= 2e-5 + 2e-5 |dense| (as the other mechanisms')."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mesh_helpers import layer_on_meshes, qkv_layer
from oracles import check_layer_against_oracle

from sparseformer import config as config_lib
from sparseformer.cli import compare
from sparseformer.cli.compare_arms import paper_arms, suite_run
from sparseformer.config import base_config
from sparseformer.errors import UserError
from sparseformer.model import LanguageModel, resolve_dims
from sparseformer.model.attention import AttentionContext, get_mechanism
from sparseformer.model.attention.base import layer_attention_flops
from sparseformer.model.attention.strided import strided_blocks

BLOCK = 16


def strided_mask(t, block, stride, local):
  """bool [T, T] from the definition, token by token: key j is visible from query i when
  j <= i and the blocks' distance d = i // block - j // block is below local / block or a
  multiple of stride / block."""
  i, j = np.arange(t)[:, None], np.arange(t)[None, :]
  d = i // block - j // block
  return (j <= i) & ((d < local // block) | (d % (stride // block) == 0))


def make_layer(spec, kv_heads=2, heads=4, head_dim=16, local=0):
  cfg = base_config().model
  cfg.num_layers, cfg.layer_attention, cfg.attention.block_size = 1, (spec,), BLOCK
  cfg.num_heads, cfg.num_kv_heads, cfg.d_model = heads, kv_heads, heads * head_dim
  cfg.attention.strided.local = local
  return get_mechanism(spec)(resolve_dims(cfg, 259), 0, nnx.Rngs(0))


def test_block_pattern_is_local_blocks_and_every_stride_th_block_back():
  pattern = strided_blocks(8, 3, 3).astype(int)
  for i in range(8):
    assert [j for j in range(8) if pattern[i, j]] == sorted(
        {j for j in range(i + 1) if i - j < 3 or (i - j) % 3 == 0}), i
  # two hops reach every earlier block (Child et al.): through J + (I - J) % n
  reach = (pattern.astype(int) @ pattern.astype(int)) > 0
  assert reach[np.tril_indices(8)].all()


@pytest.mark.parametrize('stride,local', [(32, 0), (48, 16), (16, 0), (64, 32)])
@pytest.mark.parametrize('kv_heads', [4, 2])
@pytest.mark.parametrize('packed', [False, True])
def test_layer_equals_dense_attention_under_the_strided_mask(stride, local, kv_heads, packed):
  b, t, h, d = 2, 150, 4, 16  # 150 tokens: the last block of 16 is partial
  keys = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k, v = (jax.random.normal(key, (b, t, kv_heads, d)) for key in keys[1:3])
  d_out = jax.random.normal(keys[3], (b, t, h, d))
  segments = jnp.asarray([[1] * 70 + [2] * 60 + [0] * 20, [1] * t], jnp.int32) if packed else None
  layer = make_layer(f'strided:{stride}', kv_heads, h, d, local)
  ctx = AttentionContext(jnp.zeros((b, t), jnp.int32), segments, None, None)
  allowed = strided_mask(t, BLOCK, stride, local or stride)[None]

  aux = check_layer_against_oracle(lambda q, k, v: layer(q, k, v, ctx), q, k, v, d_out, allowed, segments)
  assert aux == {'losses': {}, 'stats': {}}


def test_a_model_with_strided_layers_gives_finite_outputs_and_gradients():
  m = base_config().model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.dtype = 32, 2, 2, 1, 'float32'
  m.attention.kind, m.attention.alternate_kind, m.attention.alternate_layers = 'strided:128', 'dense', 'top:1'
  model = LanguageModel(resolve_dims(m, 259), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 300), 3, 259)
  positions = jnp.broadcast_to(jnp.arange(300), tokens.shape)
  loss, grads = nnx.value_and_grad(lambda model: model(tokens, positions, None)[0].mean())(model)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


@pytest.mark.parametrize('spec', ['strided', 'strided:0', 'strided:x'])
def test_bad_specs_are_user_errors(spec):
  with pytest.raises(UserError, match='positive stride'):
    get_mechanism(spec)


@pytest.mark.parametrize('kind,local,message', [
    ('strided:200', 0, 'strided:200: use a stride that is a multiple of model.attention.block_size'),
    ('strided:256', 100, 'model.attention.strided.local=100: use a multiple'),
    ('strided:256', -128, 'model.attention.strided.local=-128: use a length >= 0'),
])
def test_bad_strided_configs_are_one_line_errors(kind, local, message):
  cfg = base_config()
  cfg.model.attention.kind, cfg.model.attention.strided.local = kind, local
  with pytest.raises(UserError, match=message) as error:
    config_lib.validate(cfg)
  assert '\n' not in str(error.value)


def test_flops_count_the_visible_blocks():
  def flops(kind, local=0):
    m = base_config().model
    m.d_model, m.num_layers, m.num_heads, m.attention.kind, m.attention.strided.local = 256, 1, 4, kind, local
    return layer_attention_flops(resolve_dims(m, 259), 1000)[0]
  # local part as long as the row: every causal block, as dense (1000 tokens: a partial last block)
  assert flops('strided:1024') == pytest.approx(flops('dense'))
  keys = strided_mask(1000, 128, 256, 256).sum() / 1000
  assert flops('strided:256') == pytest.approx(4 * 4 * 64 * keys)
  assert flops('strided:256', local=128) < flops('strided:256') < flops('dense')


@pytest.mark.parametrize('seq_len', [256, 512, 2048, 8192])
def test_the_comparison_arm_validates_at_the_suites_lengths(seq_len):
  run = suite_run()
  run.data.seq_len = seq_len
  (name, changes), = paper_arms(seq_len, names=('strided',))
  assert compare.arm_config(run, name, changes).model.attention.kind == f'strided:{max(seq_len // 8, 64)}'


LAYER = qkv_layer('strided:32', '')


def test_the_declared_layout_runs_the_kernel_per_row_and_head_and_equals_one_device():
  """data x fsdp x tensor: each device runs the kernel on its rows and heads (1/8 of q);
  with the sequence split 2 ways, the rows are gathered whole along it (1/4 of q)."""
  meshes = [{'data': 2, 'fsdp': 2, 'tensor': 2}, {'data': 2, 'tensor': 2, 'sequence': 2}]
  results = layer_on_meshes(LAYER, 'strided', meshes)
  for axes, ways in zip(meshes, (8, 4)):
    got = results[json.dumps(axes)]
    assert got['worst'] < 1e-5, (axes, got)
    assert got['whole'] and sorted(got['per_device']) == sorted(s // ways for s in got['whole']), (axes, got)
