"""The static-pattern layer specs (power, neighborhood, neighborhood2d/3d, fixed, radial, bigbird) against
dense softmax attention under the pattern's mask written out per token from the paper's definition
(test_block_sparse_patterns.py's brute force) and causality: outputs and q, k, v
gradients, packed documents, GQA; teacher-forced decoding; their cost; a model that trains
a few steps on the CPU; bad specs.

Tolerance: float32, |pattern - dense| <= 2e-5 + 2e-5 |dense| (as the other mechanisms')."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_helpers import check_teacher_forcing
from flax import nnx
from mask_oracle import per_document
from oracles import check_layer_against_oracle
from test_block_sparse_patterns import (bigbird_brute, fixed_brute, neighborhood2d_brute, neighborhood_brute,
                                        neighborhood_grid_brute, power_brute, radial_brute)

from sparseformer.config import base_config
from sparseformer.errors import UserError
from sparseformer.model import LanguageModel, resolve_dims
from sparseformer.model.attention import AttentionContext, get_mechanism
from sparseformer.model.attention.base import layer_attention_flops

BLOCK = 16
LENGTH = 150  # the last block of 16 is partial

# spec, model.attention options, brute-force mask [T, T] (before causality)
CASES = {
    'power': ('power:4', {'power': {'sink': 3, 'granularity': 'token'}}, lambda n: power_brute(n, 4, 3)),
    'power_blocks': ('power:20', {'power': {'sink': 3}}, lambda n: power_brute(n, 2, 3, BLOCK)),
    'neighborhood': ('neighborhood:6', {'neighborhood': {'dilation': 3}},
                     lambda n: neighborhood_brute(n, 6, 3, causal=True)),
    'neighborhood2d': ('neighborhood2d:3', {'neighborhood2d': {'columns': 10, 'dilation': 2}},
                       lambda n: raster_neighborhood_brute(n, 10, 3, 2)),
    'neighborhood3d': ('neighborhood3d:3', {'neighborhood3d': {'rows': 6, 'columns': 5, 'dilation': 2}},
                       lambda n: video_neighborhood_brute(n, (6, 5), 3, 2)),
    'neighborhood_ragged': ('neighborhood:5', {'neighborhood': {'dilation': 4}},  # 150 tokens: 4 groups of 38, 38, 37, 37
                            lambda n: neighborhood_brute(n, 5, 4, causal=True)),
    'neighborhood_rows': ('neighborhood:6', {'neighborhood': {'dilation': 3, 'tiling': 'rows'}},
                          lambda n: neighborhood_brute(n, 6, 3, causal=True)),
    'fixed': ('fixed:32', {'fixed': {'summary': 4}}, lambda n: fixed_brute(n, 32, 4)),
    'fixed_ragged': ('fixed:20', {'fixed': {'summary': 3}}, lambda n: fixed_brute(n, 20, 3)),  # 150 = 7.5 chunks
    'fixed_rows': ('fixed:32', {'fixed': {'summary': 4, 'tiling': 'rows'}}, lambda n: fixed_brute(n, 32, 4)),
    'radial': ('radial:8', {}, lambda n: radial_brute(n, 8)),
    'bigbird': ('bigbird:1', {'bigbird': {'global_blocks': 1, 'random_blocks': 2, 'seed': 4}},
                lambda n: bigbird_brute(n, BLOCK, 1, BLOCK, 2, 4, causal_draws=True)),
}


def raster_neighborhood_brute(n, columns, kernel, dilation):
  """The 2-D neighborhood of n tokens in raster order on a grid `columns` wide with as many
  rows as needed: the brute force of a grid with spare rows below (the layer's grid never
  ends, so no window is shifted up at a bottom edge), cut to the n tokens."""
  rows = -(-n // columns) + 2 * kernel * dilation
  return neighborhood2d_brute((rows, columns), (kernel, kernel), (dilation, dilation))[:n, :n]


def video_neighborhood_brute(n, frame, kernel, dilation):
  """The 3-D neighborhood of n tokens in raster order over frames of frame = (rows,
  columns) tokens, as many as needed: spare frames after the last, cut to the n tokens."""
  frames = -(-n // int(np.prod(frame))) + 2 * kernel * dilation
  return neighborhood_grid_brute((frames,) + frame, (kernel,) * 3, (dilation,) * 3)[:n, :n]


def model_cfg(spec, options, heads=4, kv_heads=2, head_dim=16):
  cfg = base_config().model
  cfg.num_layers, cfg.layer_attention, cfg.attention.block_size = 1, (spec,), BLOCK
  cfg.num_heads, cfg.num_kv_heads, cfg.d_model = heads, kv_heads, heads * head_dim
  for section, values in options.items():
    cfg.attention[section].update(values)
  return cfg


@pytest.mark.parametrize('name, packed', [pytest.param(name, packed, marks=pytest.mark.slow)
                                          if (name, packed) == ('radial', False) else (name, packed)
                                          for name in sorted(CASES) for packed in (False, True)])
def test_layer_equals_dense_attention_under_the_papers_mask(name, packed):
  spec, options, brute = CASES[name]
  b, t, h, d, kv_heads = 2, LENGTH, 4, 16, 2
  keys = jax.random.split(jax.random.key(3), 4)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k, v = (jax.random.normal(key, (b, t, kv_heads, d)) for key in keys[1:3])
  d_out = jax.random.normal(keys[3], (b, t, h, d))
  # The second document starts off every grid row, frame and block: its positions differ from the row's.
  segments = jnp.asarray([[1] * 67 + [2] * 63 + [0] * 20, [1] * t], jnp.int32) if packed else None
  layer = get_mechanism(spec)(resolve_dims(model_cfg(spec, options), 259), 0, nnx.Rngs(0))
  ctx = AttentionContext(jnp.zeros((b, t), jnp.int32), segments, None, None)
  if packed and not name.startswith('fixed'):  # fixed cuts its chunks in the packed row
    allowed = per_document(lambda n: brute(n) & np.tri(n, dtype=bool), segments)
  else:
    allowed = (brute(t) & np.tri(t, dtype=bool))[None]
  check_layer_against_oracle(lambda q, k, v: layer(q, k, v, ctx), q, k, v, d_out, allowed, segments)


@pytest.mark.parametrize('name', [pytest.param(n, marks=pytest.mark.slow) if n == 'radial' else n
                                  for n in sorted(CASES)])  # radial: 19 s
def test_teacher_forced_decoding_matches_the_forward_pass(name):
  spec, options, _ = CASES[name]
  small = {'power': ('power:2', {'power': {'sink': 1, 'granularity': 'token'}}),
           'power_blocks': ('power:8', {'power': {'sink': 1}}), 'neighborhood': ('neighborhood:4', {'neighborhood': {
      'dilation': 2}}), 'neighborhood_ragged': ('neighborhood:3', {'neighborhood': {'dilation': 3}}),
      'neighborhood_rows': ('neighborhood:4', {'neighborhood': {'dilation': 2, 'tiling': 'rows'}}),
      'neighborhood2d': ('neighborhood2d:3', {'neighborhood2d': {'columns': 4}}),
      'neighborhood3d': ('neighborhood3d:3', {'neighborhood3d': {'rows': 3, 'columns': 4}}), 'fixed': ('fixed:8', {'fixed': {'summary': 2}}),
      'fixed_ragged': ('fixed:5', {'fixed': {'summary': 2}}),
      'fixed_rows': ('fixed:8', {'fixed': {'summary': 2, 'tiling': 'rows'}}), 'radial': ('radial:4', {}),
      'bigbird': ('bigbird:1', {'bigbird': {'global_blocks': 1, 'random_blocks': 1}})}[name]
  check_teacher_forcing([small[0], 'dense'], small[1])


def test_dilated_neighborhood_groups_fill_whole_tiles():
  """tiling=grouped gathers each dilation group contiguous: 4096 tokens, dilation 4, K=256,
  blocks of 64 give 4 groups of 16 blocks, each query block seeing its own and up to 4
  earlier ones of its group (1+2+3+4+5*12 = 70 tiles a group), where the row's dilated
  window spans 1021 tokens and touches 17 blocks a query block."""
  from pallas_kernels.block_sparse_attention import plan_from_mask
  from pallas_kernels.block_sparse_attention.dilation_groups import group_segment_ids
  from sparseformer.model.attention.static_patterns import CAUSAL_LENGTH
  from pallas_kernels.block_sparse_attention import masks, patterns
  length, dilation, kernel, block = 4096, 4, 256, 64
  segments = group_segment_ids(None, 1, length, dilation)
  grouped = plan_from_mask(masks.causal_window(kernel), q_len=length, block_q=block, block_kv=block,
                           segment_ids=segments)
  rows = plan_from_mask(patterns.Neighborhood(CAUSAL_LENGTH, kernel, dilation, causal=True) & masks.Causal(),
                        q_len=length, block_q=block, block_kv=block)
  assert int(grouped.kv_count.sum()) == 4 * 70
  assert int(rows.kv_count.sum()) == sum(min(qb + 1, 17) for qb in range(64))


def test_cost_counts_the_keys_of_the_pattern():
  for name, (spec, options, brute) in CASES.items():
    cfg = model_cfg(spec, options)
    flops = layer_attention_flops(resolve_dims(cfg, 259), 256)[0]
    keys = (brute(256) & np.tri(256, dtype=bool)).sum(1).mean()
    assert flops == pytest.approx(4 * 4 * 16 * keys), name


@pytest.mark.slow  # 25 s: bash scripts/test.sh -m slow
def test_a_model_of_pattern_layers_trains():
  m = base_config().model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.dtype = 32, 4, 2, 1, 'float32'
  m.num_layers = 7
  m.layer_attention = ('power:16', 'neighborhood:32', 'neighborhood2d:5', 'neighborhood3d:3', 'fixed:64', 'radial:32',
                       'bigbird:1')
  model = LanguageModel(resolve_dims(m, 259), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 257), 3, 20)  # a small alphabet: learnable in a few steps
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  positions = jnp.broadcast_to(jnp.arange(256), inputs.shape)

  def loss_of(model):
    logits, _ = model(inputs, positions, None)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))
  step = nnx.jit(lambda model: nnx.value_and_grad(loss_of)(model))
  losses = []
  for _ in range(6):
    loss, grads = step(model)
    losses.append(float(loss))
    nnx.update(model, jax.tree.map(lambda p, g: p - 0.5 * g, nnx.state(model, nnx.Param), grads))
  assert np.isfinite(losses).all() and losses[-1] < losses[0] - 0.5, losses


@pytest.mark.parametrize('spec, message', [('power', 'positive local window'), ('radial:0', 'positive frame size'),
                                           ('neighborhood:x', 'positive kernel size'),
                                           ('neighborhood2d:0', 'positive kernel size'),
                                           ('neighborhood3d:-1', 'positive kernel size'), ('fixed', 'positive stride')])
def test_bad_specs_are_user_errors(spec, message):
  with pytest.raises(UserError, match=message):
    get_mechanism(spec)


@pytest.mark.parametrize('kind, message', [
    ('neighborhood2d:4', r'neighborhood2d:4: use an odd kernel size'),
    ('neighborhood2d:41', r'neighborhood2d:41: the kernel is wider than the grid \(model.attention.neighborhood2d.columns=32\)'),
    ('neighborhood3d:6', r'neighborhood3d:6: use an odd kernel size'),
    ('neighborhood3d:17', r'neighborhood3d:17: the kernel is wider than the grid \(model.attention.neighborhood3d.rows=16\)'),
])
def test_a_grid_kernel_that_cannot_be_centred_or_fit_is_refused(kind, message):
  from sparseformer.config import validate
  cfg = base_config()
  cfg.model.attention.kind = kind
  with pytest.raises(UserError, match=message):
    validate(cfg)


def test_a_summary_longer_than_the_stride_is_refused():
  from sparseformer.config import validate
  cfg = base_config()
  cfg.model.attention.kind, cfg.model.attention.fixed.summary = 'fixed:16', 32
  with pytest.raises(UserError, match=r'model.attention.fixed.summary=32: use at most the stride \(16\)'):
    validate(cfg)
