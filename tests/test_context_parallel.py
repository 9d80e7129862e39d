"""Context parallelism: attention over a sequence sharded 4 ways equals the unsharded
attention, forward and gradients (4 fake CPU devices, in a subprocess).

Tolerance: float32 inputs, |sharded - unsharded| <= 1e-5 + 1e-5 |unsharded| for outputs
and for dq, dk, dv (the sharded run sums the same terms in another order).
"""

import os
import subprocess
import sys

import pytest

from sparseformer.model.attention.context_parallel import QueryOffset, previous_shards
from pallas_kernels.block_sparse_attention import masks

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
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'PYTHONPATH': ROOT}
  result = subprocess.run([sys.executable, '-c', SHARDED_EQUALS_UNSHARDED, ','.join(cases)], capture_output=True,
                          text=True, cwd=ROOT, env=env)
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
