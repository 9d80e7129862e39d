"""Training on meshes of 8 fake CPU devices gives the losses of the single-device run, and
a checkpoint saved on one mesh restores onto another and continues with the same losses.

A tiny model (a window layer and a dense layer, float32; in one slow case a hybrid of
sse, gated, dynamic_mask, routing and dense layers) trains 4 steps on fixed packed
batches. Tolerance: every loss within 1e-5 relative of the single-device loss (the
meshes sum the same terms in other orders; observed: at most 2.5e-7 over the meshes below).
Each case runs in one subprocess that compiles every mesh it is given.
"""

import json
import os
import subprocess
import sys

import pytest

from sparseformer.distributed import host_device_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOSS_RTOL = 1e-5

RUN_MESHES = r'''
import json, math, sys, tempfile
import jax, numpy as np
from sparseformer import config as config_lib, sharding
from sparseformer.model.attention import context_parallel
from sparseformer.training.assembly import build_train_step
from sparseformer.training.checkpoint import Checkpointer

STEPS, ROWS, LENGTH = 4, 8, 256
LAYERS = tuple(json.loads(sys.argv[2]))
sharded_layers = []
sharded_attention = context_parallel.sharded_attention
context_parallel.sharded_attention = lambda *a, **k: sharded_layers.append(k['mask']) or sharded_attention(*a, **k)


def tiny_config(axes):
  cfg = config_lib.base_config()
  m = cfg.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 32, len(LAYERS), 4, 2
  m.layer_attention, m.attention.block_size = LAYERS, 64
  cfg.data.seq_len, cfg.train.global_batch_size, cfg.train.steps, cfg.train.warmup_steps = LENGTH, ROWS, 10, 2
  cfg.train.lr = 1e-2
  cfg.mesh.data = 1
  for axis, size in axes.items():
    cfg.mesh[axis] = size
  config_lib.validate(cfg)
  return cfg


def packed_batches():
  """Fixed batches of rows packing 2-3 documents each."""
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    tokens = rng.integers(1, 256, (ROWS, LENGTH + 1)).astype(np.int32)
    cuts = np.sort(rng.integers(1, LENGTH, (ROWS, 2)), axis=1)
    index = np.arange(LENGTH)
    segment_ids = (1 + (index >= cuts[:, :1]) + (index >= cuts[:, 1:])).astype(np.int32)
    starts = np.where(segment_ids == 1, 0, np.where(segment_ids == 2, cuts[:, :1], cuts[:, 1:]))
    yield {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:], 'positions': (index - starts).astype(np.int32),
           'segment_ids': segment_ids, 'loss_mask': np.ones((ROWS, LENGTH), np.float32)}


def parts_on(axes):
  cfg = tiny_config(axes)
  devices = jax.devices()[:math.prod(axes.values())]
  return cfg, build_train_step(cfg, sharding.make_mesh(cfg.mesh, devices))


def train(parts, state, batches):
  losses = []
  for batch in batches:
    state, metrics = parts.step(state, {k: jax.device_put(v, parts.batch_sharding) for k, v in batch.items()})
    losses.append(float(metrics['loss']))
  return state, losses


def check_sharded_init(parts, state):
  """The state is created sharded (inside jit, with output shardings) as the rules say."""
  expected = parts.state_shardings['params']['embedding']
  actual = state['params']['embedding'].sharding
  assert actual.is_equivalent_to(expected, 2), (actual, expected)
  embedding = state['params']['embedding']
  ways = parts.spec.mesh.shape['fsdp'] * parts.spec.mesh.shape['tensor']  # embedding: (vocab, embed)
  assert embedding.addressable_shards[0].data.size * ways == embedding.size


def train_checking_attention(parts, state, batches, axes):
  """Trains; the window and dense layers attend per shard on a mesh of several devices
  (the window layer always, the dense one where the sequence is split); on one device
  neither does."""
  sharded_layers.clear()
  state, losses = train(parts, state, batches)
  several = math.prod(axes.values()) > 1
  expected = several * (LAYERS.count('window:80') + (axes.get('sequence', 1) > 1) * LAYERS.count('dense'))
  assert len(sharded_layers) == expected, (axes, sharded_layers)
  return state, losses


def fresh_run(axes):
  cfg, parts = parts_on(axes)
  state = parts.fresh_state(cfg.seed)
  check_sharded_init(parts, state)
  return train_checking_attention(parts, state, packed_batches(), axes)[1]


def checkpoint_run(save_axes, restore_axes):
  """2 steps on one mesh, saved; restored on another mesh, 2 more steps."""
  cfg, parts = parts_on(save_axes)
  batches = list(packed_batches())
  state = parts.fresh_state(cfg.seed)
  state, first = train_checking_attention(parts, state, batches[:2], save_axes)
  with tempfile.TemporaryDirectory() as directory:
    saver = Checkpointer(directory, keep=1, async_save=False)
    saver.save(state, {'batches_read': 2}, {'mesh': save_axes})
    saver.close()
    cfg, parts = parts_on(restore_axes)
    restorer = Checkpointer(directory, keep=1, async_save=False, read_only=True)
    state, data_state = restorer.restore(2, parts.abstract_state(cfg.seed))
    assert data_state == {'batches_read': 2}, data_state
    assert state['params']['embedding'].sharding.is_equivalent_to(parts.state_shardings['params']['embedding'], 2)
  return first + train(parts, state, batches[2:])[1]


results = {}
for case in json.loads(sys.argv[1]):
  if 'restore' in case:
    results[case['name']] = checkpoint_run(case['save'], case['restore'])
  else:
    results[case['name']] = fresh_run(case['mesh'])
print('RESULTS ' + json.dumps(results))
'''

SINGLE = {'name': 'single device', 'mesh': {'data': 1}}
WINDOW_AND_DENSE = ('window:80', 'dense')


def run_cases(cases, layers=WINDOW_AND_DENSE):
  """{case name: [loss of each step]} from one subprocess with 8 CPU devices, the model's
  layers being `layers`."""
  env = {**os.environ, 'XLA_FLAGS': host_device_flags(8, os.environ.get('XLA_FLAGS', '')), 'PYTHONPATH': ROOT,
         'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', RUN_MESHES, json.dumps([SINGLE] + cases), json.dumps(layers)],
                          capture_output=True, text=True, cwd=ROOT, env=env)
  assert result.returncode == 0, result.stderr[-4000:]
  line = [line for line in result.stdout.splitlines() if line.startswith('RESULTS ')][-1]
  return json.loads(line[len('RESULTS '):])


def assert_same_losses(results):
  reference = results.pop(SINGLE['name'])
  assert len(reference) == 4 and reference[-1] < reference[0], reference
  for name, losses in results.items():
    for step, (loss, expected) in enumerate(zip(losses, reference), 1):
      assert abs(loss - expected) <= LOSS_RTOL * abs(expected), (name, step, losses, reference)


@pytest.mark.slow  # 30 s: sequence-parallel training; the mesh tests above run by default
def test_sequence_parallel_training_then_a_checkpoint_moved_to_an_fsdp_tensor_mesh():
  assert_same_losses(run_cases([
      {'name': 'sequence 4 -> fsdp 2 x tensor 2', 'save': {'sequence': 4}, 'restore': {'fsdp': 2, 'tensor': 2}},
  ]))


@pytest.mark.slow
def test_data_fsdp_tensor_sequence_and_combined_meshes_train_like_one_device():
  assert_same_losses(run_cases([
      {'name': 'data 8', 'mesh': {'data': 8}},
      {'name': 'fsdp 8', 'mesh': {'fsdp': 8}},
      {'name': 'tensor 2', 'mesh': {'tensor': 2}},
      {'name': 'sequence 4', 'mesh': {'sequence': 4}},
      {'name': 'data 2 x fsdp 2 x tensor 2', 'mesh': {'data': 2, 'fsdp': 2, 'tensor': 2}},
      {'name': 'fsdp 2 x tensor 2 x sequence 2', 'mesh': {'fsdp': 2, 'tensor': 2, 'sequence': 2}},
      {'name': 'fsdp 8 -> data 2 x tensor 2', 'save': {'fsdp': 8}, 'restore': {'data': 2, 'tensor': 2}},
      {'name': 'sequence 2 -> data 8', 'save': {'sequence': 2}, 'restore': {'data': 8}},
  ]))


@pytest.mark.slow
def test_hybrid_model_with_sse_state_passing_trains_on_sequence_and_tensor_meshes_like_one_device():
  # sse passes state between the 4 sequence shards; the other mechanisms run per row and
  # head (the sequence gathered where it is split)
  assert_same_losses(run_cases([
      {'name': 'sequence 4', 'mesh': {'sequence': 4}},
      {'name': 'data 2 x tensor 2 x sequence 2', 'mesh': {'data': 2, 'tensor': 2, 'sequence': 2}},
  ], layers=('sse:2', 'gated', 'dynamic_mask:48', 'routing:2', 'dense')))
