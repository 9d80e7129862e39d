"""Shared by the tests that compare a mesh of 8 CPU devices with one device: a tiny
window-attention model laid out on a mesh, and a script run in a child Python that sees
8 CPU devices (the parent's device count is fixed once JAX starts)."""

import json
import os
import subprocess
import sys

from sparseformer.distributed import host_device_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_window_model(axes, vocab_size, **model_fields):
  """(cfg, mesh, rules, spec) of a 1-layer, d_model 32, 4-head model with window:80
  attention in 64-token blocks and untied embeddings, on a mesh of `axes` sizes (data 1
  unless given) over the first devices; model_fields set further model fields."""
  import jax
  import numpy as np
  from sparseformer import config as config_lib, sharding
  from sparseformer.model import resolve_dims
  from sparseformer.training.state import model_spec
  cfg = config_lib.base_config()
  m = cfg.model
  m.d_model, m.num_layers, m.num_heads, m.tie_embeddings = 32, 1, 4, False
  m.attention.kind, m.attention.block_size = 'window:80', 64
  for field, value in model_fields.items():
    m[field] = value
  cfg.mesh.data = 1
  for axis, size in axes.items():
    cfg.mesh[axis] = size
  devices = jax.devices()[:int(np.prod(list(axes.values())))]
  mesh, rules = sharding.make_mesh(cfg.mesh, devices), tuple(cfg.mesh.rules)
  return cfg, mesh, rules, model_spec(resolve_dims(m, vocab_size), mesh, rules)


def results_on_8_cpu_devices(script, cases, timeout=300):
  """Runs `script` (python -c) with json.dumps(cases) as its argument in a child that sees 8
  CPU devices; returns the JSON it prints on its last line starting with 'RESULTS '."""
  env = {**os.environ, 'XLA_FLAGS': host_device_flags(8, os.environ.get('XLA_FLAGS', '')), 'PYTHONPATH': ROOT,
         'JAX_PLATFORMS': 'cpu'}
  result = subprocess.run([sys.executable, '-c', script, json.dumps(cases)], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)
  assert result.returncode == 0, result.stderr[-4000:]
  line = [line for line in result.stdout.splitlines() if line.startswith('RESULTS ')][-1]
  return json.loads(line[len('RESULTS '):])


LAYER_SCRIPT_HEADER = r'''
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from sparseformer import sharding
from sparseformer.config import base_config
from sparseformer.model import resolve_dims
from sparseformer.model.attention import AttentionContext, get_mechanism
'''

LAYER_SCRIPT_MESHES = r'''
sizes = []
kernel = MODULE.block_sparse_attention
MODULE.block_sparse_attention = lambda q, *a, **k: sizes.append(q.size) or kernel(q, *a, **k)
results = {}
for axes in json.loads(sys.argv[1]):
  mesh_cfg = {'data': 1, 'fsdp': 1, 'tensor': 1, 'sequence': 1, **axes}
  mesh = sharding.make_mesh(mesh_cfg, jax.devices()[:int(np.prod(list(mesh_cfg.values())))])
  rules = base_config().mesh.rules
  grad = jax.value_and_grad(loss, has_aux=True)
  sizes.clear()
  (_, y), grads = jax.jit(grad)(arrays)
  whole = list(sizes)
  sizes.clear()
  placed = jax.device_put(arrays, jax.NamedSharding(mesh, sharding.logical_spec(('batch', 'length'), rules)))
  (_, y_mesh), grads_mesh = jax.jit(sharding.with_activation_placement(grad, mesh, rules))(placed)
  worst = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)))) for a, b in
              zip(jax.tree.leaves((y, grads)), jax.tree.leaves((y_mesh, grads_mesh))))
  results[json.dumps(axes)] = {'worst': worst, 'whole': whole, 'per_device': list(sizes)}
print('RESULTS ' + json.dumps(results))
'''


QKV_LAYER = r'''
B, T, H, HKV, D = 4, 128, 4, 2, 16
m = base_config().model
m.num_layers, m.layer_attention, m.attention.block_size = 1, ({spec!r},), 16
m.num_heads, m.num_kv_heads, m.d_model = H, HKV, H * D
{options}
layer = get_mechanism({spec!r})(resolve_dims(m, 259), 0, nnx.Rngs(0))
keys = jax.random.split(jax.random.key(1), 4)
arrays = (jax.random.normal(keys[0], (B, T, H, D)), jax.random.normal(keys[1], (B, T, HKV, D)),
          jax.random.normal(keys[2], (B, T, HKV, D)))
cotangent = jax.random.normal(keys[3], (B, T, H, D))
segments = jnp.asarray(np.stack([np.ones(T), 1 + (np.arange(T) >= 40), np.ones(T), 1 + (np.arange(T) >= 100)]),
                       jnp.int32)

def loss(arrays):
  y, _ = layer(*arrays, AttentionContext(jnp.zeros((B, T), jnp.int32), segments, None, None))
  return jnp.sum(y * cotangent), y
'''


def qkv_layer(spec, options=''):
  """The setup of layer_on_meshes for a mechanism that reads q, k, v only: one layer of
  `spec` (4 heads, 2 kv heads, head_dim 16, 16-token blocks; `options`: lines setting
  fields of the model config `m`) on 4 rows of 128 tokens, two of them packed."""
  return QKV_LAYER.format(spec=spec, options=options)


def layer_on_meshes(setup, module, meshes):
  """A mechanism layer's loss and gradients on each mesh of `meshes` (axis sizes over 8 CPU
  devices) against one device, and the size of q at each kernel call, in a child process.
  `setup` (script text after LAYER_SCRIPT_HEADER's imports) defines `arrays` (a tuple
  whose leading dims are batch and length) and `loss(arrays) -> (scalar, output)`; the
  kernel calls counted are `sparseformer.model.attention.<module>.block_sparse_attention`.
  Returns {json.dumps(axes): {'worst': max |mesh - one device|, 'whole': q sizes on one
  device, 'per_device': q sizes on the mesh}}."""
  patch = f'from sparseformer.model.attention import {module} as MODULE\n'
  return results_on_8_cpu_devices(LAYER_SCRIPT_HEADER + setup + patch + LAYER_SCRIPT_MESHES, meshes)
