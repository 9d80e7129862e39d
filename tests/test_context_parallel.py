"""Context parallelism: attention over a sequence sharded 4 ways equals the unsharded
attention, forward and gradients (4 fake CPU devices, in a subprocess); and mechanism
layers run per device (sse passing state between sequence shards; gated, dynamic_mask and
routing per row and head) equal the layer on one device (8 fake CPU devices).

Tolerance: float32 inputs, |sharded - unsharded| <= 1e-5 + 1e-5 |unsharded| for outputs
and for dq, dk, dv (the sharded run sums the same terms in another order).
"""

import json
import os
import subprocess
import sys

import pytest

from sparseformer.model.attention.context_parallel import QueryOffset, previous_shards
from pallas_kernels.block_sparse_attention import masks
from sparseformer.distributed import host_device_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHARDED_EQUALS_UNSHARDED = r'''
import sys
import jax, jax.numpy as jnp, numpy as np
from pallas_kernels.block_sparse_attention import block_sparse_attention, masks, plan_from_mask
from sparseformer import sharding
from sparseformer.model.attention import context_parallel

assert jax.device_count() == 4
mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1, 'sequence': 4})
rules = (('batch', ('data', 'fsdp')), ('length', 'sequence'), ('heads', 'tensor'), ('kv_heads', 'tensor'))
placement = sharding.ActivationPlacement(mesh, rules)
b, t, h, hkv, d, block = 2, 64, 4, 2, 16, 8
keys = jax.random.split(jax.random.key(0), 4)
q = jax.random.normal(keys[0], (b, t, h, d))
k = jax.random.normal(keys[1], (b, t, hkv, d))
v = jax.random.normal(keys[2], (b, t, hkv, d))
cotangent = jax.random.normal(keys[3], (b, t, h, d))
documents = jnp.stack([jnp.zeros(t, jnp.int32), (jnp.arange(t) >= 27).astype(jnp.int32) + (jnp.arange(t) >= 50)])

def unsharded(mask, segment_ids):
  def f(q, k, v):
    plan = plan_from_mask(mask, q_len=t, block_q=block, block_kv=block, segment_ids=segment_ids)
    return block_sparse_attention(q, k, v, plan)
  return f

def sharded(mask, segment_ids):
  def f(q, k, v):
    return context_parallel.sharded_attention(q, k, v, segment_ids, mask=mask, block=block, scale=d ** -0.5,
                                              placement=placement)
  return f

def output_and_grads(f):
  y, pullback = jax.vjp(jax.jit(f), q, k, v)
  return (y,) + pullback(cotangent)

all_masks = {'dense': masks.Causal(), 'window:12': masks.causal_window(12), 'window:30': masks.causal_window(30),
             'block_local:16': masks.Chunked(16) & masks.Causal()}
all_rows = {'one document': None, 'packed': documents}
for case in sys.argv[1].split(','):
  name, rows = case.split('/')
  mask, segment_ids = all_masks[name], all_rows[rows]
  expected = output_and_grads(unsharded(mask, segment_ids))
  got = output_and_grads(sharded(mask, segment_ids))
  for what, a, e in zip(('y', 'dq', 'dk', 'dv'), got, expected):
    np.testing.assert_allclose(a, e, rtol=1e-5, atol=1e-5, err_msg=f'{name} {rows} {what}')
  print(name, rows, 'ok')

# Inside jit on inputs placed on the mesh, the result stays sharded along the sequence.
y = jax.jit(sharded(masks.Causal(), None))(*[jax.device_put(x, jax.NamedSharding(mesh, jax.P(None, 'sequence')))
                                              for x in (q, k, v)])
assert y.sharding.spec[1] == 'sequence', y.sharding
print('all equal')
'''


def check_sharded_equals_unsharded(cases):
  """cases: 'mask/rows' names of the script's tables, run in one subprocess of 4 devices."""
  env = {**os.environ, 'XLA_FLAGS': host_device_flags(4, os.environ.get('XLA_FLAGS', '')), 'PYTHONPATH': ROOT}
  result = subprocess.run([sys.executable, '-c', SHARDED_EQUALS_UNSHARDED, ','.join(cases)], capture_output=True,
                          text=True, cwd=ROOT, env=env)
  assert result.returncode == 0, result.stdout + result.stderr[-4000:]
  assert result.stdout.strip().endswith('all equal'), result.stdout


MECHANISM_SHARDED_EQUALS_UNSHARDED = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from sparseformer import sharding
from sparseformer.config import base_config
from sparseformer.model import resolve_dims
from sparseformer.model.attention import AttentionContext, get_mechanism, context_parallel, context_parallel_linear
from sparseformer.model.attention import dynamic_mask, gated, routing, routing_plan, sse

# The size of q at every kernel call: per device it must be the whole's over the devices
# that split it (rows, heads, and the sequence for sse), so no device runs the whole kernel.
kernel_q_sizes = []


def recording(module, name):
  kernel = getattr(module, name)
  setattr(module, name, lambda q, *a, **k: kernel_q_sizes.append(q.size) or kernel(q, *a, **k))


for module in (gated, dynamic_mask, routing, routing_plan):
  recording(module, 'block_sparse_attention')
for module in (sse, context_parallel_linear):
  recording(module, 'gated_linear_attention')

B, T, H, HKV, D = 4, 128, 4, 2, 16
mesh_axes, cases = json.loads(sys.argv[1]), sys.argv[2].split(',')
mesh_cfg = {'data': 1, 'fsdp': 1, 'tensor': 1, 'sequence': 1, **mesh_axes}
mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:int(np.prod(list(mesh_cfg.values())))])
rules = base_config().mesh.rules


def make_layer(spec, options):
  cfg = base_config().model
  cfg.num_layers, cfg.layer_attention = 1, (spec,)
  cfg.num_heads, cfg.num_kv_heads, cfg.d_model, cfg.attention.block_size = H, HKV, H * D, 16
  for path, value in options.items():
    node = cfg.attention
    *parents, leaf = path.split('.')
    for p in parents:
      node = node[p]
    node[leaf] = value
  return get_mechanism(spec)(resolve_dims(cfg, 259), 0, nnx.Rngs(0))


def inputs():
  keys = jax.random.split(jax.random.key(1), 7)
  q, q_pre = (jax.random.normal(keys[i], (B, T, H, D)) for i in (0, 1))
  k, k_pre, v = (jax.random.normal(keys[i], (B, T, HKV, D)) for i in (2, 3, 4))
  x = jax.random.normal(keys[5], (B, T, H * D))
  cotangent = jax.random.normal(keys[6], (B, T, H, D))
  # documents crossing the 4 shard boundaries (32 tokens each), a boundary on one, padding
  index = np.arange(T)
  segments = np.stack([np.ones(T), 1 + (index >= 40) + (index >= 64) + (index >= 100), 1 + (index >= 32),
                       np.where(index < 120, 1 + (index >= 13), 0)]).astype(np.int32)
  return (q, k, v, q_pre, k_pre, x), cotangent, jnp.asarray(segments)


def loss_fn(layer, segments, cotangent):
  graph, params, rest = nnx.split(layer, nnx.Param, ...)

  def loss(params, arrays):
    model = nnx.merge(graph, params, rest)
    q, k, v, q_pre, k_pre, x = arrays
    extra = {}
    if model.needs_pre_rope:
      extra['pre_rope'] = (q_pre, k_pre)
    if model.needs_layer_input:
      extra['layer_input'] = x
    ctx = AttentionContext(jnp.zeros((B, T), jnp.int32), segments, None, None)
    y, aux = model(q, k, v, ctx, **extra)
    total = jnp.sum(y.astype(jnp.float32) * cotangent) + sum(aux['losses'].values())
    return total, (y, aux)

  return loss, params


def run(layer, segments, cotangent, arrays, placed):
  loss, params = loss_fn(layer, segments, cotangent)
  grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
  if placed:
    grad = sharding.with_activation_placement(grad, mesh, rules)
    arrays = jax.device_put(arrays, jax.NamedSharding(mesh, sharding.logical_spec(('batch', 'length'), rules)))
  (_, (y, aux)), grads = jax.jit(grad)(params, arrays)
  return y, aux, grads


CASES = {
  'sse_mask': ('sse:4', {'sse.mode': 'mask'}),
  'sse_varlen': ('sse:4', {'sse.mode': 'varlen'}),
  'sse_noshared': ('sse:2', {'sse.shared': False, 'sse.top_k': 1}),
  'gated_sparse': ('gated', {'gate.forward': 'sparse', 'gate.density': 0.5}),
  'gated_dense_distill': ('gated', {'gate.forward': 'dense', 'gate.distill': True}),
  'dynamic_mask': ('dynamic_mask:24', {}),
  'dynamic_mask_smoothed': ('dynamic_mask:24', {'dynamic_mask.block_smooth': 'budget'}),
  'routing': ('routing:4', {'routing.local_heads': 0}),
  'routing_local': ('routing:4', {'routing.local_heads': 2, 'routing.local_window': 24}),
  'routing_topw': ('routing:4', {'routing.local_heads': 0, 'routing.selection': 'balanced_topw'}),
}
arrays, cotangent, segments = inputs()
for case in cases:
  spec, options = CASES[case]
  layer = make_layer(spec, options)
  kernel_q_sizes.clear()
  expected = run(layer, segments, cotangent, arrays, False)
  whole_sizes = list(kernel_q_sizes)
  kernel_q_sizes.clear()
  got = run(layer, segments, cotangent, arrays, True)
  ways = mesh.size // (1 if spec.startswith('sse') else mesh.shape['sequence'])
  # varlen runs as mask where the sequence is split; routing_local's window heads have one
  # kv head, which tensor 2 cannot split: that call runs per row only
  if not (case == 'sse_varlen' and mesh.shape['sequence'] > 1) and case != 'routing_local':
    assert sorted(kernel_q_sizes) == sorted(s // ways for s in whole_sizes), (case, kernel_q_sizes, whole_sizes)
  worst = max(float(np.max(np.abs(np.asarray(g, np.float64) - np.asarray(e, np.float64))))
              for e, g in zip(jax.tree.leaves(expected), jax.tree.leaves(got)))
  print(case, 'largest difference', worst, 'kernel q sizes', whole_sizes, '->', kernel_q_sizes)
  flat_e, flat_g = jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(got)
  assert len(flat_e) == len(flat_g)
  for (path, e), g in zip(flat_e, flat_g):
    np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(e, np.float64), rtol=2e-5, atol=2e-5,
                               err_msg=f'{case} {jax.tree_util.keystr(path)}')
  print(case, 'ok', flush=True)
print('all equal')
'''


def check_layers_sharded_equal_unsharded(mesh, cases):
  """Each case's layer, jitted within the placement of `mesh` (8 fake CPU devices, inputs
  placed by the rules), equals the layer on one device: output, aux and the gradients of
  every parameter and input, |sharded - unsharded| <= 2e-5 + 2e-5 |unsharded| (float32)."""
  env = {**os.environ, 'XLA_FLAGS': host_device_flags(8, os.environ.get('XLA_FLAGS', '')), 'PYTHONPATH': ROOT,
         'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', MECHANISM_SHARDED_EQUALS_UNSHARDED, json.dumps(mesh), ','.join(cases)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
  assert result.returncode == 0, result.stdout + result.stderr[-4000:]
  assert result.stdout.strip().endswith('all equal'), result.stdout


def test_dense_and_window_attention_sharded_4_ways_equal_unsharded_forward_and_gradients():
  # dense: an all_gather of every shard; window:30: permutes from the two shards before.
  check_sharded_equals_unsharded(['dense/packed', 'window:30/packed'])


@pytest.mark.slow
def test_every_local_mask_and_unpacked_rows_sharded_equal_unsharded():
  check_sharded_equals_unsharded(['dense/one document', 'window:12/one document', 'window:12/packed',
                                  'window:30/one document', 'block_local:16/one document', 'block_local:16/packed'])


@pytest.mark.parametrize('mask,shard_len,expected', [
    (masks.Causal(), 16, 3),  # every earlier shard
    (masks.causal_window(12), 16, 1),  # 11 keys back fit in the previous shard
    (masks.causal_window(17), 16, 1),
    (masks.causal_window(18), 16, 2),  # 17 keys back reach two shards back
    (masks.causal_window(1), 16, 0),
    (masks.causal_window(1000), 16, 3),
])
def test_kv_shards_the_plan_never_visits_are_not_gathered(mask, shard_len, expected):
  assert previous_shards(mask, 4, shard_len) == expected


def test_query_offset_moves_queries_only():
  import jax.numpy as jnp
  shifted = QueryOffset(masks.causal_window(4), 8)
  assert bool(shifted.elements(jnp.int32(0), jnp.int32(8))) and not bool(shifted.elements(jnp.int32(0), jnp.int32(9)))
  assert not bool(shifted.elements(jnp.int32(0), jnp.int32(4)))
  assert int(shifted.block_kind(0, 4, 8, 12)) == masks.PARTIAL and int(shifted.block_kind(0, 4, 0, 4)) == masks.EMPTY


def test_sse_layer_over_4_sequence_shards_passes_state_and_equals_unsharded():
  # documents cross the shard boundaries (and one starts exactly on one): the states
  # entering shards 1-3 are gathered and combined, and cut where a document starts.
  check_layers_sharded_equal_unsharded({'sequence': 4}, ['sse_mask'])


@pytest.mark.slow
def test_sse_variants_on_sequence_and_combined_meshes_equal_unsharded():
  # varlen runs as the mask mode under a split sequence (a warning says so), per device otherwise
  check_layers_sharded_equal_unsharded({'sequence': 4}, ['sse_varlen', 'sse_noshared'])
  check_layers_sharded_equal_unsharded({'data': 2, 'tensor': 2, 'sequence': 2}, ['sse_mask', 'sse_varlen'])
  check_layers_sharded_equal_unsharded({'data': 2, 'tensor': 2}, ['sse_varlen'])


def test_gated_dynamic_mask_and_routing_layers_run_per_row_and_head_and_equal_one_device():
  check_layers_sharded_equal_unsharded({'data': 2, 'fsdp': 2, 'tensor': 2}, ['gated_sparse', 'dynamic_mask', 'routing'])


@pytest.mark.slow
def test_mechanism_variants_per_device_and_gathered_where_the_sequence_is_split():
  cases = ['gated_dense_distill', 'dynamic_mask_smoothed', 'routing_topw', 'routing_local']
  check_layers_sharded_equal_unsharded({'data': 2, 'tensor': 2, 'sequence': 2}, cases)
