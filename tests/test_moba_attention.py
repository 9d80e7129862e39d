"""MoBA against dense softmax attention restricted to the blocks MoBA's rule picks, the
rule written out here from its definition in NumPy (mean query of a block's first
document, mean key of a block's last document, scores summed over a GQA group, own block
plus the best top_k - 1 earlier blocks of the document): outputs and gradients, single
and packed rows, GQA, ragged lengths; the choice shared by a group; config errors; FLOPs;
a model with MoBA layers trains; the kernel per device on a mesh of 8 CPU devices.

Tolerance: float32, |moba - dense| <= 2e-5 + 2e-5 |dense| (as the other mechanisms')."""

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

BLOCK = 16


def make_layer(kv_heads=2, heads=4, head_dim=16, moba_block=32, top_k=2, share='group'):
  cfg = base_config().model
  cfg.num_layers, cfg.layer_attention, cfg.attention.block_size = 1, ('moba',), BLOCK
  cfg.num_heads, cfg.num_kv_heads, cfg.d_model = heads, kv_heads, heads * head_dim
  cfg.attention.moba.block, cfg.attention.moba.top_k, cfg.attention.moba.share = moba_block, top_k, share
  return get_mechanism('moba')(resolve_dims(cfg, 259), 0, nnx.Rngs(0))


def best_others(scores, candidates, wanted):
  """The `wanted` best candidates by score, ties to the earlier block."""
  return set(sorted(candidates, key=lambda j: (-scores[j], j))[:max(wanted, 0)])


def moba_mask(q, k, segments, block, top_k, share):
  """bool [B, Hp, T, T] from MoBA's rule as sparseformer applies it, token by token (Hp:
  kv heads or query heads): query block I (of BLOCK tokens) takes its own MoBA block and
  the top_k - 1 best earlier MoBA blocks of its document, ranked by the mean query of
  query block I - 1 (its first document's tokens) against each block's mean key (its last
  document's), summed over the group's heads."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, h, _ = q.shape
  hkv = k.shape[2]
  segments = np.ones((b, t), int) if segments is None else np.asarray(segments)
  nq, nm = -(-t // BLOCK), -(-t // block)
  plan_heads = hkv if share == 'group' else h
  allowed = np.zeros((b, plan_heads, t, t), bool)

  def pooled(x, seg, start, end, doc):
    tokens = seg[start:end] == doc
    return x[start:end][tokens].mean(0) if tokens.any() else np.zeros(x.shape[1:])
  for row in range(b):
    seg = segments[row]
    mean_q = [pooled(q[row], seg, i * BLOCK, min(t, (i + 1) * BLOCK), seg[i * BLOCK]) for i in range(nq)]
    last_doc = [seg[min(t, (j + 1) * block) - 1] for j in range(nm)]
    mean_k = [pooled(k[row], seg, j * block, min(t, (j + 1) * block), last_doc[j]) for j in range(nm)]
    for head in range(plan_heads):
      heads = range(head * (h // hkv), (head + 1) * (h // hkv)) if share == 'group' else [head]
      for i in range(nq):
        own = i * BLOCK // block
        candidates = [j for j in range(own) if last_doc[j] == seg[i * BLOCK]]
        votes = mean_q[i - 1] if i else np.zeros_like(mean_q[0])
        score = {j: sum(votes[x] @ mean_k[j][x // (h // hkv)] for x in heads) for j in candidates}
        for j in {own} | best_others(score, candidates, top_k - 1):
          allowed[row, head, i * BLOCK:(i + 1) * BLOCK, j * block:(j + 1) * block] = True
  causal = np.tril(np.ones((t, t), bool))
  same_doc = segments[:, :, None] == segments[:, None, :]  # padding (0) sees padding, as in the kernels
  return allowed & causal & same_doc[:, None]


CASES = [  # t, kv_heads, moba block, top_k, share, packed
    (150, 2, 32, 2, 'group', False), (150, 2, 32, 3, 'group', True), (160, 4, 16, 4, 'group', True),
    (200, 2, 48, 2, 'head', True), (100, 1, 32, 1, 'group', False),
]


@pytest.mark.parametrize('t,kv_heads,moba_block,top_k,share,packed', CASES)
def test_layer_equals_dense_attention_on_the_blocks_moba_picks(t, kv_heads, moba_block, top_k, share, packed):
  b, h, d = 2, 4, 16
  keys = jax.random.split(jax.random.key(5), 4)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k, v = (jax.random.normal(key, (b, t, kv_heads, d)) for key in keys[1:3])
  d_out = jax.random.normal(keys[3], (b, t, h, d))
  docs = [1] * (t // 2 - 7) + [2] * (t // 2 - 5) + [3] * 8
  segments = jnp.asarray([docs + [0] * (t - len(docs)), [1] * t], jnp.int32) if packed else None
  layer = make_layer(kv_heads, h, d, moba_block, top_k, share)
  ctx = AttentionContext(jnp.zeros((b, t), jnp.int32), segments, None, None)
  allowed = moba_mask(q, k, segments, moba_block, top_k, share)

  aux = check_layer_against_oracle(lambda q, k, v: layer(q, k, v, ctx), q, k, v, d_out, allowed, segments)
  assert 0 < float(aux['stats']['moba_select_fraction']) <= 1


def test_a_group_shares_its_blocks_and_more_blocks_cost_more():
  b, t, h, d = 1, 256, 4, 16
  keys = jax.random.split(jax.random.key(2), 3)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k, v = (jax.random.normal(key, (b, t, 2, d)) for key in keys[1:])
  by_group = moba_mask(q, k, None, 32, 3, 'group')
  by_head = moba_mask(q, k, None, 32, 3, 'head')
  assert by_group.shape[1] == 2 and by_head.shape[1] == 4
  assert (by_head[:, 0::2] != by_head[:, 1::2]).any()  # heads of a group differ when ranking alone
  ctx = AttentionContext(jnp.zeros((b, t), jnp.int32), None, None, None)
  fraction = [float(make_layer(2, h, d, 32, top_k)(q, k, v, ctx)[1]['stats']['moba_select_fraction'])
              for top_k in (1, 3, 8)]
  assert fraction[0] < fraction[1] < fraction[2] == 1  # top 8 of 8 MoBA blocks: every allowed one


def test_no_output_depends_on_a_later_token():
  """Every q, k and v after token 70 (inside a query block) changed: nothing before it moves."""
  b, t, h, d = 1, 128, 2, 16
  keys = jax.random.split(jax.random.key(4), 3)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k, v = (jax.random.normal(key, (b, t, 1, d)) for key in keys[1:])
  layer = make_layer(1, h, d, 32, 4)
  ctx = AttentionContext(jnp.zeros((b, t), jnp.int32), None, None, None)
  y = layer(q, k, v, ctx)[0]
  later = 70
  k2, v2 = k.at[:, later:].set(jax.random.normal(keys[0], (b, t - later, 1, d))), v.at[:, later:].multiply(-3.0)
  q2 = q.at[:, later:].set(jax.random.normal(keys[1], (b, t - later, h, d)))
  y2 = layer(q2, k2, v2, ctx)[0]
  np.testing.assert_allclose(y[:, :later], y2[:, :later], rtol=1e-6, atol=1e-6)
  assert not np.allclose(y[:, later:], y2[:, later:])


@pytest.mark.parametrize('field,value,message', [
    ('block', 40, 'model.attention.moba.block=40: use a multiple of model.attention.block_size'),
    ('block', 0, 'model.attention.moba.block=0: use a positive number of tokens'),
    ('top_k', 0, 'model.attention.moba.top_k=0: use at least 1'),
    ('share', 'row', "model.attention.moba.share='row': use group or head"),
])
def test_bad_moba_configs_are_one_line_errors(field, value, message):
  cfg = base_config()
  cfg.model.attention.kind = 'moba'
  cfg.model.attention.moba[field] = value
  with pytest.raises(UserError, match=message) as error:
    config_lib.validate(cfg)
  assert '\n' not in str(error.value)


def test_moba_takes_no_argument():
  with pytest.raises(UserError, match='moba takes no argument'):
    get_mechanism('moba:4')


def test_flops_count_own_block_and_top_k_minus_one_blocks():
  def flops(block, top_k, seq_len=2048):
    m = base_config().model
    m.d_model, m.num_layers, m.num_heads, m.attention.kind = 256, 1, 4, 'moba'
    m.attention.moba.block, m.attention.moba.top_k = block, top_k
    return layer_attention_flops(resolve_dims(m, 259), seq_len)[0]
  dense = base_config().model
  dense.d_model, dense.num_layers, dense.num_heads = 256, 1, 4
  assert flops(512, 4) == pytest.approx(layer_attention_flops(resolve_dims(dense, 259), 2048)[0])
  keys = sum(512 * 513 / 2 + 512 * min(2, i) * 512 for i in range(4)) / 2048
  assert flops(512, 3) == pytest.approx(4 * 4 * 64 * keys)
  assert flops(256, 3) < flops(512, 3)


@pytest.mark.parametrize('seq_len', [256, 512, 2048, 8192])
def test_the_comparison_arm_validates_at_the_suites_lengths(seq_len):
  run = suite_run()
  run.data.seq_len = seq_len
  (name, changes), = paper_arms(seq_len, names=('moba',))
  cfg = compare.arm_config(run, name, changes)
  assert cfg.model.attention.kind == 'moba' and cfg.model.attention.moba.block == max(seq_len // 16, 64)


def test_a_model_with_moba_layers_gives_finite_outputs_and_gradients():
  m = base_config().model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.dtype = 32, 2, 2, 1, 'float32'
  m.attention.kind, m.attention.alternate_kind, m.attention.alternate_layers = 'moba', 'dense', 'top:1'
  m.attention.moba.block = 128
  model = LanguageModel(resolve_dims(m, 259), nnx.Rngs(0))
  tokens = jax.random.randint(jax.random.key(1), (2, 300), 3, 259)
  positions = jnp.broadcast_to(jnp.arange(300), tokens.shape)
  loss, grads = nnx.value_and_grad(lambda model: model(tokens, positions, None)[0].mean())(model)
  assert np.isfinite(float(loss))
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


LAYER = qkv_layer('moba', 'm.attention.moba.block, m.attention.moba.top_k = 32, 2')


def test_the_declared_layout_runs_the_kernel_per_row_and_kv_head_and_equals_one_device():
  meshes = [{'data': 2, 'fsdp': 2, 'tensor': 2}]
  results = layer_on_meshes(LAYER, 'moba', meshes)
  got = results[json.dumps(meshes[0])]
  assert got['worst'] < 1e-5, got
  assert got['whole'] and sorted(got['per_device']) == sorted(s // 8 for s in got['whole']), got
