"""The train step: gradient accumulation, weight-decay mask, learning-rate schedule."""

import jax
import numpy as np

from sparseformer import sharding
from sparseformer.config import base_config
from sparseformer.model import resolve_dims
from sparseformer.training.assembly import assemble_train_step
from sparseformer.training.optimizer import learning_rate_schedule, weight_decay_mask
from sparseformer.training.state import model_spec


def tiny_parts(grad_accum_steps):
  cfg = base_config()
  m = cfg.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.dtype = 32, 2, 2, 1, 'float32'
  cfg.train.grad_accum_steps = grad_accum_steps
  mesh = sharding.make_mesh(cfg.mesh)
  return assemble_train_step(cfg, model_spec(resolve_dims(m, 259), mesh, cfg.mesh.rules))


def tiny_setup(grad_accum_steps):
  parts = tiny_parts(grad_accum_steps)
  return parts.step, parts.fresh_state(seed=0), parts.spec


def random_batch(rows=4, length=16):
  rng = np.random.default_rng(0)
  mask = np.ones((rows, length), np.float32)
  mask[1, 10:] = 0  # unequal token counts per micro-batch: weighting must be by token
  return {'tokens': rng.integers(3, 259, (rows, length)).astype(np.int32),
          'targets': rng.integers(3, 259, (rows, length)).astype(np.int32),
          'positions': np.tile(np.arange(length, dtype=np.int32), (rows, 1)),
          'segment_ids': np.ones((rows, length), np.int32), 'loss_mask': mask}


def test_gradient_accumulation_matches_one_big_batch():
  batch = random_batch()
  step_1, state_1, _ = tiny_setup(1)
  step_2, state_2, _ = tiny_setup(2)
  new_1, metrics_1 = step_1(state_1, batch)
  new_2, metrics_2 = step_2(state_2, batch)
  np.testing.assert_allclose(metrics_1['loss'], metrics_2['loss'], rtol=1e-6)
  np.testing.assert_allclose(metrics_1['grad_norm'], metrics_2['grad_norm'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), new_1['params'], new_2['params'])
  assert int(new_2['step']) == 1


def test_weight_decay_skips_norms_and_embeddings():
  _, _, spec = tiny_setup(1)
  mask = weight_decay_mask(spec.abstract_params, decay_embeddings=False)
  assert mask['embedding'] is False and mask['final_norm']['scale'] is False
  assert mask['blocks'][0]['mlp']['up']['kernel'] is True
  assert weight_decay_mask(spec.abstract_params, decay_embeddings=True)['embedding'] is True


def test_schedule_warms_up_then_decays_to_the_floor():
  cfg = base_config().train
  cfg.steps, cfg.warmup_steps, cfg.lr, cfg.min_lr_ratio = 100, 10, 1.0, 0.1
  schedule = learning_rate_schedule(cfg)
  assert float(schedule(0)) == 0.0 and abs(float(schedule(10)) - 1.0) < 1e-6
  assert abs(float(schedule(100)) - 0.1) < 1e-6 and float(schedule(50)) < 1.0


def test_fresh_state_lowers_its_random_draws_to_the_gpu_kernel():
  """make_train_state compiles the init with jaxlib's threefry kernel on a GPU (the same
  bits, a fraction of the compile time); the flag is scoped to the init."""
  from sparseformer.training.state import fast_random_compile, train_state_factory
  parts = tiny_parts(1)
  create = jax.jit(train_state_factory(parts.spec, parts.tx, 0))
  with fast_random_compile(parts.state_shardings['params']):  # one device: replicated
    assert 'threefry2x32_ffi' in create.trace().lower(lowering_platforms=('cuda',)).as_text()
  assert not jax.config.jax_threefry_gpu_kernel_lowering
  assert 'threefry2x32_ffi' not in create.trace().lower(lowering_platforms=('cuda',)).as_text()
  sharded = jax.sharding.NamedSharding(jax.sharding.AbstractMesh((2,), ('fsdp',)), jax.sharding.PartitionSpec('fsdp'))
  with fast_random_compile({'w': sharded}):
    assert not jax.config.jax_threefry_gpu_kernel_lowering
