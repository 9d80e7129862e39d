"""The sse mechanism (sparse state expansion): the layer against a direct per-token
recurrence in numpy, mask mode == varlen mode (outputs and gradients), parallel forward ==
token-by-token decoding (and prefill + decoding), deterministic router ties, partitions
frozen bit for bit where not routed, N=1 without a shared branch == plain GLA through the
kernel api, document resets, the balance loss, config errors, and a tiny SSE-H model
that trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pallas_kernels.linear_attention import gated_linear_attention
from sparseformer import config as config_lib
from sparseformer.config import base_config
from sparseformer.errors import UserError
from sparseformer.model import resolve_dims
from sparseformer.model.attention import AttentionContext, get_mechanism
from sparseformer.model.attention import sse_router

HEADS, KV_HEADS, HEAD_DIM = 4, 2, 8
D_MODEL = HEADS * HEAD_DIM
T = 70  # two chunks of the kernel, the second partial
# Row 0: two documents then padding, boundaries inside chunks; row 1: one document.
SEGMENTS = np.array([[1] * 23 + [2] * 38 + [0] * 9, [1] * T], np.int32)


def make_mechanism(partitions=4, seed=0, **sse):
  cfg = base_config().model
  cfg.num_layers, cfg.layer_attention = 1, (f'sse:{partitions}',)
  cfg.num_heads, cfg.num_kv_heads, cfg.d_model = HEADS, KV_HEADS, D_MODEL
  for name, value in sse.items():
    cfg.attention.sse[name] = value
  dims = resolve_dims(cfg, 259)
  return get_mechanism(f'sse:{partitions}')(dims, 0, nnx.Rngs(seed))


def random_inputs(b=2, t=T, seed=1):
  """(q_pre, k_pre, v, x): [B, T, H, d], [B, T, Hkv, d] twice, [B, T, D]."""
  keys = jax.random.split(jax.random.key(seed), 4)
  return (jax.random.normal(keys[0], (b, t, HEADS, HEAD_DIM)), jax.random.normal(keys[1], (b, t, KV_HEADS, HEAD_DIM)),
          jax.random.normal(keys[2], (b, t, KV_HEADS, HEAD_DIM)), jax.random.normal(keys[3], (b, t, D_MODEL)))


def context(segments, b=2, t=T):
  segments = None if segments is None else jnp.asarray(segments)
  return AttentionContext(jnp.zeros((b, t), jnp.int32), segments, None, None)


def forward(mechanism, inputs, segments, mode=None):
  """(y, aux) of the mechanism under jit (mode overrides model.attention.sse.mode)."""
  graph, state = nnx.split(mechanism)

  @jax.jit
  def apply(state, inputs):
    model = nnx.merge(graph, state)
    if mode:
      model.mode = mode
    q_pre, k_pre, v, x = inputs
    return model(None, None, v, context(segments, *x.shape[:2]), pre_rope=(q_pre, k_pre), layer_input=x)

  return apply(state, inputs)


def numpy_params(mechanism):
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nnx.to_pure_dict(nnx.state(mechanism, nnx.Param)))

  def low_rank(name, x):
    y = np.einsum('btr,rhk->bthk', x @ p[name]['down']['kernel'], p[name]['up']['kernel'])
    return y + p[name]['bias'] if 'bias' in p[name] else y

  return p, low_rank


def silu(x):
  return x / (1 + np.exp(-x))


def softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def log_sigmoid(x):
  return -np.logaddexp(0.0, -x)


def direct_sse(mechanism, inputs, segments, top_k, shared):
  """The layer token by token in float64 numpy, written from the spec: y [B, T, H, d]."""
  p, low_rank = numpy_params(mechanism)
  q_pre, k_pre, v, x = (np.asarray(a, np.float64) for a in inputs)
  group = HEADS // KV_HEADS
  k_pre, v = np.repeat(k_pre, group, axis=2), silu(np.repeat(v, group, axis=2))
  q1, k1 = silu(q_pre), softmax(k_pre)
  q2, k2 = silu(q_pre + low_rank('query_delta', x)), softmax(k_pre + low_rank('key_delta', x))
  decay2 = np.exp(log_sigmoid(low_rank('partition_decay', x)) / 16)
  decay1 = np.exp(log_sigmoid(low_rank('shared_decay', x)) / 16) if shared else None
  probs = softmax(x @ p['router']['kernel'])
  n = probs.shape[-1]
  b, t = x.shape[:2]
  o = np.zeros(q2.shape)
  for row in range(b):
    s0 = np.zeros((HEADS, HEAD_DIM, HEAD_DIM))
    s = np.zeros((n, HEADS, HEAD_DIM, HEAD_DIM))
    for i in range(t):
      if segments is not None and i and segments[row, i] != segments[row, i - 1]:
        s0, s = np.zeros_like(s0), np.zeros_like(s)
      chosen = np.argsort(-probs[row, i], kind='stable')[:top_k]
      if shared:
        s0 = decay1[row, i][..., None] * s0 + k1[row, i][..., None] * v[row, i][:, None, :]
        o[row, i] += np.einsum('hd,hdv->hv', q1[row, i], s0)
      for c in chosen:
        w = probs[row, i, c]
        s[c] = decay2[row, i][..., None] * s[c] + (w * k2[row, i])[..., None] * v[row, i][:, None, :]
        o[row, i] += np.einsum('hd,hdv->hv', w * q2[row, i], s[c])
  o *= HEAD_DIM ** -0.5
  normed = o / np.sqrt(np.mean(o * o, -1, keepdims=True) + 1e-6)
  return normed * p['norm_scale'] * silu(low_rank('output_gate', x))


@pytest.mark.parametrize('partitions,top_k,shared', [(4, 2, True), (3, 1, False)])
def test_the_layer_equals_a_direct_recurrence(partitions, top_k, shared):
  mechanism = make_mechanism(partitions, top_k=top_k, shared=shared)
  inputs = random_inputs()
  y, _ = forward(mechanism, inputs, SEGMENTS)
  expected = direct_sse(mechanism, inputs, SEGMENTS, top_k, shared)
  valid = SEGMENTS != 0
  np.testing.assert_allclose(np.asarray(y)[valid], expected[valid], rtol=2e-4, atol=2e-4)


def loss_and_grads(mechanism, inputs, segments, mode):
  graph, params, rest = nnx.split(mechanism, nnx.Param, ...)
  weights = jax.random.normal(jax.random.key(7), inputs[0].shape)

  @jax.jit
  def loss(params, inputs):
    model = nnx.merge(graph, params, rest)
    model.mode = mode
    q_pre, k_pre, v, x = inputs
    y, aux = model(None, None, v, context(segments), pre_rope=(q_pre, k_pre), layer_input=x)
    return jnp.sum(y * weights) + aux['losses']['sse_balance']

  return jax.value_and_grad(loss, argnums=(0, 1))(params, inputs)


@pytest.mark.parametrize('shared', [True, pytest.param(False, marks=pytest.mark.slow)])
def test_mask_and_varlen_modes_agree_on_outputs_and_gradients(shared):
  mechanism = make_mechanism(4, top_k=2, shared=shared)
  inputs = random_inputs()
  mask_loss, mask_grads = loss_and_grads(mechanism, inputs, SEGMENTS, 'mask')
  varlen_loss, varlen_grads = loss_and_grads(mechanism, inputs, SEGMENTS, 'varlen')
  np.testing.assert_allclose(mask_loss, varlen_loss, rtol=1e-5)
  for path, a, b in zip(jax.tree_util.tree_leaves_with_path(mask_grads), jax.tree.leaves(mask_grads),
                        jax.tree.leaves(varlen_grads)):
    scale = max(float(jnp.abs(a).max()), 1e-6)
    np.testing.assert_allclose(np.asarray(b) / scale, np.asarray(a) / scale, atol=2e-5, err_msg=str(path[0]))
  assert float(jnp.abs(mask_grads[0]['router']['kernel'][...]).max()) > 0  # the router learns through p


def test_token_by_token_decoding_and_prefill_equal_the_parallel_forward():
  mechanism = make_mechanism(4, top_k=2)
  inputs = random_inputs()
  parallel, _ = forward(mechanism, inputs, None)
  decode = jax.jit(mechanism.decode_step)
  state, steps = mechanism.initial_state(2), []
  for i in range(T):
    y, state = decode(*(a[:, i:i + 1] for a in inputs), state)
    steps.append(y)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), parallel, rtol=1e-4, atol=1e-4)
  split = 50
  prompt, state = mechanism.prefill_state(*(a[:, :split] for a in inputs))
  np.testing.assert_allclose(prompt, parallel[:, :split], rtol=1e-4, atol=1e-4)
  for i in range(split, T):
    y, state = decode(*(a[:, i:i + 1] for a in inputs), state)
    np.testing.assert_allclose(y[:, 0], parallel[:, i], rtol=1e-4, atol=1e-4)


def test_router_ties_go_to_the_lower_index():
  probs = jnp.array([[0.25, 0.25, 0.25, 0.25], [0.1, 0.3, 0.3, 0.3], [0.4, 0.1, 0.4, 0.1], [0.1, 0.2, 0.3, 0.4]])
  expected = np.array([[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 1, 1]], bool)
  mask = sse_router.top_k_mask(probs, 2)
  np.testing.assert_array_equal(mask, expected)
  np.testing.assert_array_equal(jax.jit(sse_router.top_k_mask, static_argnums=1)(probs, 2), expected)
  np.testing.assert_array_equal(sse_router.chosen_partitions(mask, 2), [[0, 1], [1, 2], [0, 2], [2, 3]])
  random_probs = np.round(np.random.default_rng(0).random((500, 6)), 1)  # many ties
  for k in (1, 3, 6):
    ranks = np.argsort(np.argsort(-random_probs, axis=-1, kind='stable'), axis=-1)
    np.testing.assert_array_equal(sse_router.top_k_mask(jnp.asarray(random_probs), k), ranks < k)


def test_a_partition_not_chosen_is_frozen_bit_for_bit():
  mechanism = make_mechanism(4, top_k=1)
  inputs = random_inputs(b=1, t=12)
  state = mechanism.initial_state(1)
  for i in range(11):  # some history in every partition the first tokens visited
    _, state = mechanism.decode_step(*(a[:, i:i + 1] for a in inputs), state)
  token = [a[:, 11:12] for a in inputs]
  _, new_state = mechanism.decode_step(*token, state)
  _, mask = mechanism.route(token[3])
  chosen = np.asarray(mask[0, 0])
  before, after = np.asarray(state['partitions'][0]), np.asarray(new_state['partitions'][0])
  assert chosen.sum() == 1 and any(np.abs(before[i]).max() > 0 for i in np.flatnonzero(~chosen))
  for i in range(4):
    assert np.array_equal(before[i], after[i]) != chosen[i], i
  assert not np.array_equal(state['shared'], new_state['shared'])
  # The kernel sees the same thing: key 0 and log decay 0 exactly for the partitions not chosen.
  probs, mask = mechanism.route(inputs[3])
  q, k, _, g = mechanism.mask_heads(mechanism.branches(*inputs), probs, mask)
  frozen = ~np.repeat(np.asarray(mask), HEADS, axis=-1)  # partition-major heads after the shared ones
  for a in (q, k, g):
    partition_heads = np.asarray(a)[:, :, HEADS:]
    assert np.all(partition_heads[frozen] == 0) and np.all(np.any(partition_heads[~frozen] != 0, axis=-1))


def test_one_partition_without_routing_is_plain_gla_through_the_kernel_api():
  mechanism = make_mechanism(1, top_k=1, shared=False)
  inputs = random_inputs()
  y, aux = forward(mechanism, inputs, SEGMENTS)
  p = nnx.to_pure_dict(nnx.state(mechanism, nnx.Param))

  def low_rank(name, x):
    return jnp.einsum('btr,rhk->bthk', x @ p[name]['down']['kernel'], p[name]['up']['kernel'])

  q_pre, k_pre, v, x = inputs
  k_pre, v = jnp.repeat(k_pre, 2, axis=2), jnp.repeat(v, 2, axis=2)
  g = jax.nn.log_sigmoid(low_rank('partition_decay', x) + p['partition_decay']['bias']) / 16
  o = gated_linear_attention(jax.nn.silu(q_pre + low_rank('query_delta', x)),
                             jax.nn.softmax(k_pre + low_rank('key_delta', x), axis=-1), jax.nn.silu(v), g,
                             segment_ids=jnp.asarray(SEGMENTS))
  normed = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + 1e-6)
  expected = normed * p['norm_scale'] * jax.nn.silu(low_rank('output_gate', x))
  np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
  assert float(aux['stats']['sse_load0']) == 1.0


@pytest.mark.parametrize('mode', ['mask', 'varlen'])
def test_every_state_resets_at_a_document_start(mode):
  """Each document of a packed row gives what it gives alone in a row."""
  mechanism = make_mechanism(4, top_k=2, mode=mode)
  inputs = random_inputs(b=1)
  packed, _ = forward(mechanism, inputs, SEGMENTS[:1])
  start, end = 23, 61  # the second document
  alone, _ = forward(mechanism, [a[:, start:end] for a in inputs], None)
  np.testing.assert_allclose(packed[:, start:end], alone, rtol=1e-5, atol=1e-5)


def test_balance_loss_and_loads_against_a_direct_computation():
  mechanism = make_mechanism(4, top_k=2, balance_weight=0.5)
  inputs = random_inputs()
  _, aux = forward(mechanism, inputs, SEGMENTS)
  x = np.asarray(inputs[3], np.float64)[SEGMENTS != 0]  # padding left out
  probs = softmax(x @ np.asarray(nnx.state(mechanism, nnx.Param)['router']['kernel'][...], np.float64))
  writes = np.zeros_like(probs)
  np.put_along_axis(writes, np.argsort(-probs, axis=-1, kind='stable')[:, :2], 1.0, axis=-1)
  expected = 0.5 * 4 / 2 * np.sum(probs.mean(0) * writes.mean(0))
  np.testing.assert_allclose(aux['losses']['sse_balance'], expected, rtol=1e-5)
  loads = [float(aux['stats'][f'sse_load{i}']) for i in range(4)]
  np.testing.assert_allclose(loads, writes.mean(0) / 2, rtol=1e-5)
  collapsed = jnp.tile(jnp.array([0.7, 0.2, 0.05, 0.05]), (1, 5, 1))
  uniform = jnp.full((1, 5, 4), 0.25)
  weights = jnp.ones((1, 5))
  assert float(sse_router.balance_loss(uniform, sse_router.top_k_mask(uniform, 2), weights, 2)) == pytest.approx(1.0)
  assert float(sse_router.balance_loss(collapsed, sse_router.top_k_mask(collapsed, 2), weights, 2)) > 1.5


@pytest.mark.parametrize('field,value,message', [
    ('mode', 'packed', "sse.mode='packed': use mask or varlen"),
    ('top_k', 5, 'sse.top_k=5 exceeds the 4 partitions of sse:4'),
    ('top_k', 0, 'sse.top_k=0: use a count >= 1'),
    ('balance_weight', -1.0, 'sse.balance_weight=-1.0'),
])
def test_bad_sse_configs_are_one_line_errors(field, value, message):
  cfg = base_config()
  cfg.model.attention.kind = 'sse:4'
  cfg.model.attention.sse[field] = value
  with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')) as error:
    config_lib.validate(cfg)
  assert '\n' not in str(error.value)
  cfg.model.attention.kind = 'dense'  # unused sse options are not checked
  if field == 'top_k' and value > 0:
    config_lib.validate(cfg)


@pytest.mark.parametrize('spec', ['sse', 'sse:0', 'sse:x'])
def test_sse_needs_a_positive_partition_count(spec):
  with pytest.raises(UserError, match='positive number of state partitions'):
    get_mechanism(spec)


def test_a_tiny_sse_hybrid_model_trains():
  """SSE-H: sse:4 below a dense layer; the loss of one repeated batch falls."""
  from sparseformer import sharding
  from sparseformer.training.assembly import assemble_train_step
  from sparseformer.training.state import model_spec
  cfg = base_config()
  m = cfg.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.dtype = 32, 2, 4, 2, 'float32'
  m.attention.kind, m.attention.full_layers = 'sse:4', 'top:1'
  cfg.train.lr, cfg.train.warmup_steps, cfg.train.steps = 1e-2, 1, 12
  mesh = sharding.make_mesh(cfg.mesh)
  parts = assemble_train_step(cfg, model_spec(resolve_dims(m, 259), mesh, cfg.mesh.rules))
  step, state = parts.step, parts.fresh_state(seed=0)
  rng = np.random.default_rng(0)
  tokens = rng.integers(3, 40, (4, 33)).astype(np.int32)
  batch = {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:],
           'positions': np.tile(np.arange(32, dtype=np.int32), (4, 1)),
           'segment_ids': np.repeat([[1] * 20 + [2] * 12], 4, axis=0).astype(np.int32),
           'loss_mask': np.ones((4, 32), np.float32)}
  losses = []
  for _ in range(12):
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 1.0, losses
  assert 0 < float(metrics['aux_loss']) < 0.1 and 'layer0/sse_load3' in metrics


@pytest.mark.parametrize('preset,layers', [
    ('', ('sse:4', 'sse:4', 'sse:4', 'dense')),
    (':gla', ('sse:1', 'sse:1', 'sse:1', 'dense')),
    (':dense', ('dense',) * 4),
    (':varlen', ('sse:4', 'sse:4', 'sse:4', 'dense')),
])
def test_the_sse_hybrid_config_and_its_presets(preset, layers):
  import os
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs', 'sse_hybrid.py')
  cfg = config_lib.load_config_file(path + preset)
  config_lib.validate(cfg)
  assert resolve_dims(cfg.model, 259).layer_mechanisms == layers
  sse = cfg.model.attention.sse
  assert (sse.top_k, sse.shared) == ((1, False) if preset == ':gla' else (2, True))
  assert sse.mode == ('varlen' if preset == ':varlen' else 'mask')
