"""The gated mechanism (SeerAttention): gate pooling and scores against a direct
computation, the teacher against the full attention matrix, all blocks selected = dense,
prefill = incremental scores, the frozen-parameter optimizer, config errors, and tiny
training runs in both modes."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracles import attention_probabilities, masked_softmax_attention
from train_helpers import logged_losses, run_script, tiny_argv

from sparseformer import config as config_lib
from sparseformer import sharding
from sparseformer.config import base_config
from sparseformer.errors import UserError
from sparseformer.model import resolve_dims
from sparseformer.model.attention import AttentionContext, get_mechanism
from sparseformer.model.attention import gate as gate_lib
from sparseformer.training.checkpoint import path_name
from sparseformer.training.assembly import assemble_train_step
from sparseformer.training.state import model_spec

BLOCK = 16


def gated_dims(heads=4, kv_heads=2, head_dim=16, width=8, **gate):
  cfg = base_config().model
  cfg.num_layers, cfg.layer_attention, cfg.attention.block_size = 1, ('gated',), BLOCK
  cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_model = heads, kv_heads, head_dim, heads * head_dim
  cfg.attention.gate.width = width
  for key, value in gate.items():
    cfg.attention.gate[key] = value
  return resolve_dims(cfg, 259)


def random_qkv(b, t, heads, kv_heads, d, seed=0):
  keys = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(keys[0], (b, t, heads, d)), jax.random.normal(keys[1], (b, t, kv_heads, d)),
          jax.random.normal(keys[2], (b, t, kv_heads, d)))


# Row 0: two documents and padding, boundaries inside blocks; row 1: one document.
SEGMENTS = np.array([[1] * 21 + [2] * 40 + [3] * 7 + [0] * 7, [1] * 75])


def visibility(segments):
  """[B, T, T] token visibility: causal, same document."""
  t = segments.shape[1]
  causal = np.arange(t)[None, :] <= np.arange(t)[:, None]
  return causal[None] & (segments[:, :, None] == segments[:, None, :])


def rotate(x, position, width, theta=10000.0):
  """RoPE on the last axis (halves paired) at one integer position, in numpy."""
  inv_freq = 1.0 / theta ** (np.arange(0, width, 2) / width)
  angle = position * inv_freq
  x1, x2 = x[..., :width // 2], x[..., width // 2:]
  return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def direct_scores(q, k, segments, query_map, key_map, width, previous=False):
  """Gate scores block by block in numpy: pools over the tokens that can meet (read off
  the token visibility), per-head maps, block RoPE, block-causal allowed pairs. previous:
  query block i pools the tokens of block i - 1 in block i's first document."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, heads, _ = q.shape
  n = -(-t // BLOCK)
  seen = visibility(segments)
  scores = np.full((b, heads, n, n), -np.inf)
  group = heads // k.shape[2]
  for row in range(b):
    for i in range(n):
      rows = range(i * BLOCK, min(t, (i + 1) * BLOCK))
      for j in range(i + 1):
        cols = range(j * BLOCK, min(t, (j + 1) * BLOCK))
        meets = seen[row][np.ix_(rows, cols)]
        if j < i and not meets.any():
          continue
        q_tokens = [r for r in rows if seen[row, r, cols[0]:cols[-1] + 1].any()] if j < i else None
        k_tokens = [c for c in cols if seen[row, rows[0]:rows[-1] + 1, c].any()] if j < i else None
        if j == i:  # the diagonal pools the block's first / last document
          q_tokens = [r for r in rows if segments[row, r] == segments[row, rows[0]] and segments[row, r]]
          k_tokens = [c for c in cols if segments[row, c] == segments[row, cols[-1]] and segments[row, c]]
        if previous:
          q_tokens = [r for r in range((i - 1) * BLOCK, i * BLOCK) if i and segments[row, r] == segments[row, rows[0]]
                      and segments[row, r]]
        q_pool = q[row, q_tokens].mean(0) if q_tokens else np.zeros(q.shape[2:])
        k_sel = k[row, k_tokens] if k_tokens else np.zeros((1,) + k.shape[2:])
        k_pool = np.concatenate([k_sel.max(0), k_sel.min(0), k_sel.mean(0)], -1)
        for h in range(heads):
          qh = q_pool[h] @ query_map[h]
          kh = k_pool[h // group] @ key_map[h // group]
          scores[row, h, i, j] = rotate(qh, i * BLOCK, width) @ rotate(kh, j * BLOCK, width) / np.sqrt(width)
  return scores


@pytest.mark.parametrize('query_block', ['previous', 'own'])
def test_gate_pools_and_scores_match_a_direct_computation(query_block):
  dims = gated_dims(query_block=query_block)
  mechanism = get_mechanism('gated')(dims, 0, nnx.Rngs(1))
  q, k, _ = random_qkv(2, SEGMENTS.shape[1], 4, 2, 16)
  segments = jnp.asarray(SEGMENTS)
  got = np.asarray(jax.jit(lambda q, k: mechanism.block_gate.scores(
      q, k, gate_lib.block_documents(segments, q.shape[1], BLOCK)))(q, k))
  gate = mechanism.block_gate
  want = direct_scores(q, k, SEGMENTS, np.asarray(gate.query[...]), np.asarray(gate.key[...]), 8,
                       previous=query_block == 'previous')
  np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
  np.testing.assert_allclose(got[np.isfinite(got)], want[np.isfinite(want)], rtol=1e-4, atol=1e-4)


def test_allowed_pairs_are_those_with_visible_tokens():
  docs = gate_lib.block_documents(jnp.asarray(SEGMENTS), SEGMENTS.shape[1], BLOCK)
  seen = visibility(SEGMENTS)
  n = docs.allowed.shape[-1]
  padded = np.zeros((2, n * BLOCK, n * BLOCK), bool)
  padded[:, :seen.shape[1], :seen.shape[2]] = seen
  meets = padded.reshape(2, n, BLOCK, n, BLOCK).any((2, 4)) | np.eye(n, dtype=bool)
  np.testing.assert_array_equal(docs.allowed, meets)
  forced = np.asarray(docs.forced)
  assert forced[:, np.arange(n), np.arange(n)].all()
  assert forced[0, 2, 1] and not forced[0, 2, 0]  # block 2 starts in document 2, which starts in block 1
  assert forced[1, :, 0].all()


@pytest.mark.parametrize('t,documents', [(75, True), (64, False), (53, False), (9, False)])  # 9: under one block
def test_teacher_is_the_block_max_pooled_attention_map(t, documents):
  segments = SEGMENTS[:, :t] if documents else np.ones((2, t), np.int64)
  segment_ids = jnp.asarray(segments) if documents else None
  dims = gated_dims()
  mechanism = get_mechanism('gated')(dims, 0, nnx.Rngs(1))
  q, k, v = random_qkv(2, t, 4, 2, 16, seed=3)
  ctx = AttentionContext(jnp.zeros((2, t), jnp.int32), segment_ids, None, None)
  scale = 16 ** -0.5
  def teacher(q, k, v):
    _, lse = mechanism.dense_attention(q, k, v, ctx, scale)
    return gate_lib.teacher_block_map(q, k, lse, scale, BLOCK, segment_ids)
  got = np.asarray(jax.jit(teacher)(q, k, v))
  p = attention_probabilities(q, k, visibility(segments), scale=scale, float64=True)
  p = np.where((segments != 0)[:, None, :, None], p, 0.0)  # padding queries have no teacher
  n = -(-t // BLOCK)
  padded = np.zeros(p.shape[:2] + (n * BLOCK, n * BLOCK))
  padded[:, :, :t, :t] = p
  pooled = padded.reshape(*p.shape[:2], n, BLOCK, n, BLOCK).max((3, 5))
  total = pooled.sum(-1, keepdims=True)
  want = np.where(total > 0, pooled / np.where(total > 0, total, 1), 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  assert got.shape == (2, 4, n, n)


@pytest.mark.parametrize('gate', [dict(density=1.0), dict(eval_forward='dense', density=0.01),
                                  dict(selection='threshold', threshold=1e-30)])
def test_all_blocks_selected_or_dense_forward_equals_dense_attention(gate):
  dims = gated_dims(**gate)
  mechanism = get_mechanism('gated')(dims, 0, nnx.Rngs(1))
  q, k, v = random_qkv(2, SEGMENTS.shape[1], 4, 2, 16, seed=5)
  segments = jnp.asarray(SEGMENTS)
  ctx = AttentionContext(jnp.zeros(segments.shape, jnp.int32), segments, None, None)
  y, aux = jax.jit(lambda q, k, v: mechanism(q, k, v, ctx, pre_rope=(q, k)))(q, k, v)
  want = masked_softmax_attention(q, k, v, jnp.asarray(visibility(SEGMENTS)))
  real = SEGMENTS != 0  # padding queries see only their diagonal block in a gated plan
  np.testing.assert_allclose(np.asarray(y)[real], np.asarray(want)[real], rtol=2e-5, atol=2e-5)
  if gate.get('density') == 1.0:
    assert float(aux['stats']['gate_density']) == 1.0


def test_topk_keeps_the_rule_count_and_the_forced_blocks():
  n = 12
  docs = gate_lib.block_documents(None, n * BLOCK, BLOCK, batch=1)
  scores = gate_lib.block_scores(*(jax.random.normal(key, (1, n, 2, 8)) for key in jax.random.split(jax.random.key(0))),
                                 docs.allowed)
  keep = gate_lib.topk_blocks_per_row(0.6, n)
  assert keep == int((1 - 0.4 ** 0.5) * n) == 4
  chosen = np.asarray(gate_lib.select_topk(scores, docs, keep))
  counts = chosen.sum(-1)
  np.testing.assert_array_equal(counts[0, 0], np.minimum(np.maximum(keep, 2), np.arange(n) + 1))
  assert chosen[..., 0].all() and chosen[:, :, np.arange(n), np.arange(n)].all()
  assert not np.triu(chosen[0, 0], 1).any()
  best = np.asarray(scores)[0, 1, 8, 1:8]  # row 8: beyond the forced, the top scores win
  assert set(np.flatnonzero(chosen[0, 1, 8, 1:8])) == set(np.argsort(-best)[:keep - 2])


@pytest.mark.parametrize('heads,kv_heads,width,query_block', [(4, 2, 8, 'previous'), (2, 1, 16, 'previous'),
                                                             (4, 2, 8, 'own')])
def test_incremental_scores_equal_prefill_scores(heads, kv_heads, width, query_block):
  dims = gated_dims(heads=heads, kv_heads=kv_heads, width=width, query_block=query_block)
  gate = get_mechanism('gated')(dims, 0, nnx.Rngs(2)).block_gate
  assert (gate.query is None) == (width == 16)  # one query pool at the head width: no query map
  t = 3 * BLOCK + 7  # a partial last block
  q, k, _ = random_qkv(2, t, heads, kv_heads, 16, seed=4)
  docs = gate_lib.block_documents(None, t, BLOCK, batch=2)
  prefill = jax.jit(lambda q, k: gate.scores(q, k, docs))(q, k)
  n = prefill.shape[-1]
  key_entry, query_row = jax.jit(gate.key_entry), jax.jit(gate.query_row)
  cache, incremental = None, jnp.full(prefill.shape, -jnp.inf)
  for i in range(n):
    tokens = slice(i * BLOCK, min(t, (i + 1) * BLOCK))
    entry = key_entry(k[:, tokens], i)
    cache = entry if cache is None else jnp.concatenate([cache, entry], axis=1)
    if query_block == 'own':
      queries = q[:, tokens]
    else:  # the block before; block 0 has none, and zeros pool as an empty pool does
      queries = q[:, (i - 1) * BLOCK:i * BLOCK] if i else jnp.zeros_like(q[:, :BLOCK])
    row = query_row(queries, i, cache)[:, :, 0]
    # The same formula on other shapes: equal up to float32 summation order.
    np.testing.assert_allclose(row, prefill[:, :, i, :i + 1], rtol=1e-5, atol=1e-6, err_msg=f'row {i}')
    incremental = incremental.at[:, :, i, :i + 1].set(row)
  # The blocks chosen from the incremental rows are the prefill's, exactly.
  keep = gate_lib.topk_blocks_per_row(0.5, n)
  np.testing.assert_array_equal(gate_lib.select_topk(incremental, docs, keep),
                                gate_lib.select_topk(prefill, docs, keep))
  # The bug class this guards against: a cached key rotated at the wrong block start.
  wrong = cache.at[:, :1].set(key_entry(k[:, :BLOCK], 1))
  assert np.abs(query_row(q[:, (n - 1) * BLOCK:], n - 1, wrong)[:, :, 0] - prefill[:, :, -1]).max() > 1e-2


def tiny_train_setup(gate=(), **train):
  cfg = base_config()
  m = cfg.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.dtype = 32, 1, 2, 1, 'float32'
  m.layer_attention, m.attention.block_size = ('gated',), BLOCK
  m.attention.gate.width = 8
  for key, value in dict(gate).items():
    m.attention.gate[key] = value
  for key, value in train.items():
    cfg.train[key] = value
  mesh = sharding.make_mesh(cfg.mesh)
  parts = assemble_train_step(cfg, model_spec(resolve_dims(m, 259), mesh, cfg.mesh.rules))
  return parts.step, parts.fresh_state(seed=0)


def train_batch(rows=2, length=64):
  rng = np.random.default_rng(0)
  segments = np.ones((rows, length), np.int32)
  segments[0, 40:] = 2
  return {'tokens': rng.integers(3, 259, (rows, length)).astype(np.int32),
          'targets': rng.integers(3, 259, (rows, length)).astype(np.int32),
          'positions': np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
          'segment_ids': segments, 'loss_mask': np.ones((rows, length), np.float32)}


def flat_params(state):
  return {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(state['params'])}


@pytest.mark.parametrize('lm_loss_weight,forward', [(0.0, 'dense'), (1.0, 'sparse')])
def test_distillation_leaves_every_non_gate_parameter_bit_identical(lm_loss_weight, forward):
  step, state = tiny_train_setup(gate={'forward': forward}, trainable='/block_gate/', lm_loss_weight=lm_loss_weight,
                                 warmup_steps=0, weight_decay=0.1)
  before = flat_params(state)
  batch = train_batch()
  for _ in range(2):
    state, metrics = step(state, batch)
  after = flat_params(state)
  gate_paths = [p for p in before if '/block_gate/' in p]
  assert gate_paths == ['blocks/0/attention/mechanism/block_gate/key', 'blocks/0/attention/mechanism/block_gate/query']
  for path in before:
    changed = not np.array_equal(before[path].view(np.uint32), after[path].view(np.uint32))
    assert changed == (path in gate_paths), path
  assert float(metrics['aux_loss']) > 0 and np.isfinite(float(metrics['loss']))


@pytest.mark.parametrize('field,value,message', [
    ('model.attention.gate.density', 0.0, 'gate.density=0.0'),
    ('model.attention.gate.width', 7, 'gate.width=7'),
    ('model.attention.gate.selection', 'top', "gate.selection='top'"),
    ('model.attention.gate.forward', 'sparce', "gate.forward='sparce'"),
    ('model.attention.gate.k_pools', ('max', 'mean'), 'k_pools'),
    ('model.attention.gate.q_pools', (), 'q_pools'),
    ('model.attention.gate.threshold', 1.5, 'gate.threshold=1.5'),
    ('model.attention.gate.loss_slice', 1.0, 'gate.loss_slice=1.0'),
    ('train.lm_loss_weight', -1.0, 'lm_loss_weight=-1.0'),
    ('train.trainable', '(gate', 'not a valid regular expression'),
])
def test_bad_gate_configs_are_one_line_errors(field, value, message):
  cfg = base_config()
  *parents, leaf = field.split('.')
  node = cfg
  for part in parents:
    node = node[part]
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(UserError) as error:
    config_lib.validate(cfg)
  assert message in str(error.value) and '\n' not in str(error.value)


def test_a_trainable_pattern_matching_nothing_is_an_error():
  with pytest.raises(UserError, match=r"train.trainable='/blok_gate/' matches no parameter"):
    tiny_train_setup(trainable='/blok_gate/')


def test_gated_takes_no_argument():
  with pytest.raises(UserError, match='takes no argument'):
    get_mechanism('gated:3')


GATED_TINY = dict(data__seq_len=192, model__attention__block_size=64, model__attention__gate__width=8,
                  model__layer_attention="('gated', 'gated')", train__steps=10, checkpoint__every_steps=10)


@pytest.mark.slow  # 20 s: training steps; the gate and plan tests run by default
def test_joint_training_with_the_sparse_plan_lowers_the_loss(tmp_path, data_dir):
  result = run_script('train.py', tiny_argv(tmp_path / 'joint', data_dir, **GATED_TINY,
                                            model__attention__gate__density=0.3))
  assert result.returncode == 0, result.stderr[-2000:]
  losses = logged_losses(tmp_path / 'joint')
  assert losses[10] < losses[1] - 0.3, losses
  record = [json.loads(line) for line in open(tmp_path / 'joint' / 'metrics.jsonl') if 'train/aux_loss' in line][-1]
  assert record['train/aux_loss'] > 0 and 0 < record['train/layer0/gate_density'] < 1


@pytest.mark.slow
def test_distillation_from_a_dense_checkpoint_trains_only_gates(tmp_path, data_dir):
  dense = tmp_path / 'dense'
  fields = {**GATED_TINY, 'train__steps': 4, 'checkpoint__every_steps': 4}
  del fields['model__layer_attention']
  result = run_script('train.py', tiny_argv(dense, data_dir, **fields))
  assert result.returncode == 0, result.stderr[-2000:]
  gates = tmp_path / 'gates'
  result = run_script('train.py', tiny_argv(gates, data_dir, **GATED_TINY, init_from=str(dense),
                                            train__trainable='/block_gate/', train__lm_loss_weight=0.0,
                                            model__attention__gate__forward='dense', train__lr=1e-2))
  assert result.returncode == 0, result.stderr[-2000:]
  for layer in (0, 1):
    name = f'params/blocks/{layer}/attention/mechanism/block_gate/key'
    assert f'initialised: {name}' in result.stdout, result.stdout[-2000:]
  records = [json.loads(line) for line in open(gates / 'metrics.jsonl') if 'train/aux_loss' in line]
  assert records[-1]['train/aux_loss'] < records[0]['train/aux_loss'], records
  result = run_script('eval.py', ['--workdir', str(gates), '--config.model.attention.gate.density=0.5',
                                  '--config.eval.max_batches=1'])
  assert result.returncode == 0, result.stderr[-2000:]
  assert os.listdir(gates / 'eval')


def chosen_block_visibility(chosen, segments):
  """[B, H, T, T] the elements the gated layer should attend: the key's block is chosen for
  the query's block, causal, same document (padding, segment 0, is its own document)."""
  t = segments.shape[1]
  block_of = np.arange(t) // BLOCK
  chosen_elements = np.asarray(chosen)[:, :, block_of[:, None], block_of[None, :]]
  return chosen_elements & visibility(segments)[:, None]


def test_partial_density_output_and_gradients_equal_dense_attention_on_the_chosen_blocks():
  # Ten blocks, the last ragged; documents crossing block edges and padding in row 0.
  segments = np.array([[1] * 37 + [2] * 70 + [3] * 30 + [0] * 13, [1] * 150])
  b, t, heads, kv_heads, d = 2, segments.shape[1], 4, 2, 16
  graphdef, params = nnx.split(get_mechanism('gated')(gated_dims(density=0.6), 0, nnx.Rngs(1)))
  q, k, v = random_qkv(b, t, heads, kv_heads, d, seed=7)
  d_out = jax.random.normal(jax.random.key(8), q.shape)
  ctx = AttentionContext(jnp.zeros(segments.shape, jnp.int32), jnp.asarray(segments), None, None)
  docs = gate_lib.block_documents(ctx.segment_ids, t, BLOCK, b)

  def gated(params, q, k, v):
    mechanism = nnx.merge(graphdef, params)
    y, _ = mechanism(q, k, v, ctx, pre_rope=(q, k))
    return jnp.sum(y * d_out), (y, mechanism.select(mechanism.block_gate.scores(q, k, docs), docs))

  (_, (y, chosen)), (param_grads, *grads) = jax.jit(jax.value_and_grad(gated, (0, 1, 2, 3), has_aux=True))(
      params, q, k, v)
  chosen = np.asarray(chosen)
  allowed_blocks = np.broadcast_to(np.asarray(docs.allowed)[:, None], chosen.shape)
  density = chosen.sum() / allowed_blocks.sum()
  assert 0.4 < density < 0.7, density
  assert (chosen & ~np.asarray(docs.forced)[:, None]).any()  # the scores chose some blocks
  assert (allowed_blocks & ~chosen).any(axis=(2, 3)).all()  # and left some out in every head
  allowed = jnp.asarray(chosen_block_visibility(chosen, segments))

  def dense(q, k, v):
    y = masked_softmax_attention(q, k, v, allowed, scale=d ** -0.5)
    return jnp.sum(y * d_out), y

  (_, y_want), grads_want = jax.jit(jax.value_and_grad(dense, (0, 1, 2), has_aux=True))(q, k, v)
  np.testing.assert_allclose(y, y_want, rtol=1e-5, atol=1e-5)
  for name, got, want in zip(('dq', 'dk', 'dv'), grads, grads_want):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=name)
  # The gate reads q and k under stop_gradient: the output gives its query and key maps nothing.
  param_grads = jax.tree.leaves(param_grads)
  assert len(param_grads) == 2 and not any(np.asarray(g).any() for g in param_grads)


@pytest.mark.parametrize('query_block', ['previous', 'own'])
def test_only_the_previous_query_block_keeps_outputs_independent_of_later_tokens(query_block):
  """Every q, k and v after token 250 (inside block 15 of 16 tokens, which keeps 5 of its
  16 blocks) changed: with query_block previous no earlier output moves; with own
  (SeerAttention's prefill rule) the tokens 240..249 get other blocks, since their block's
  pooled query includes the later tokens."""
  mechanism = get_mechanism('gated')(gated_dims(density=0.5, query_block=query_block), 0, nnx.Rngs(1))
  t, later = 320, 250
  q, k, v = random_qkv(1, t, 4, 2, 16, seed=3)
  q2, k2, v2 = (x.at[:, later:].set(y[:, later:]) for x, y in zip((q, k, v), random_qkv(1, t, 4, 2, 16, seed=9)))
  ctx = AttentionContext(jnp.zeros((1, t), jnp.int32), None, None, None)
  y = mechanism(q, k, v, ctx, pre_rope=(q, k))[0]
  y2 = mechanism(q2, k2, v2, ctx, pre_rope=(q2, k2))[0]
  unchanged = np.allclose(y[:, :later], y2[:, :later], rtol=1e-6, atol=1e-6)
  assert unchanged == (query_block == 'previous')


def test_threshold_choices_do_not_read_the_diagonal_score():
  """The keys after token 250 (inside block 15) scaled by 3: the diagonal score of block
  15 moves, and no earlier output does. The threshold's softmax leaves the diagonal out;
  with it in, tokens 240..249 of that block saw other blocks (a leak of the future, also
  under query_block=previous, which top-k never had: it forces the diagonal)."""
  mechanism = get_mechanism('gated')(gated_dims(selection='threshold', threshold=0.1), 0, nnx.Rngs(1))
  t, later = 320, 250
  q, k, v = random_qkv(1, t, 4, 2, 16, seed=3)
  k2 = k.at[:, later:].multiply(3.0)
  ctx = AttentionContext(jnp.zeros((1, t), jnp.int32), None, None, None)
  y = mechanism(q, k, v, ctx, pre_rope=(q, k))[0]
  y2 = mechanism(q, k2, v, ctx, pre_rope=(q, k2))[0]
  np.testing.assert_allclose(y[:, :later], y2[:, :later], rtol=1e-6, atol=1e-6)
  assert np.abs(y[:, later:] - y2[:, later:]).max() > 0.1
