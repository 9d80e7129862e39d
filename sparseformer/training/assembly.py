"""The train step assembled in one place: the optimizer, the shardings of the train state
and the jitted step (training/step.py) of a config's model. The trainer, `fit`, the
benchmarks and the tests all take their step from here, so they run the same program.

  assemble_train_step(cfg, spec, batch_sharding)  from a model spec (the trainer has one)
  build_train_step(cfg, mesh, platform)           from the config alone, no data read
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer import data, sharding
from sparseformer.config import ATTENTION_BACKWARDS
from sparseformer.model import resolve_dims
from sparseformer.training.optimizer import make_optimizer
from sparseformer.training.state import abstract_train_state, make_train_state, model_spec, state_shardings
from sparseformer.training.step import jit_train_step, make_train_step

BATCH_DTYPES = {'tokens': jnp.int32, 'targets': jnp.int32, 'positions': jnp.int32, 'segment_ids': jnp.int32,
                'loss_mask': jnp.float32}


@dataclasses.dataclass
class TrainStepParts:
  """What the train step is made of, built from a config and a mesh without data."""
  spec: Any  # training.state.ModelSpec
  tx: Any  # the optax optimizer
  schedule: Any  # step -> learning rate
  state_shardings: Any  # of the train state: optimizer moments follow their parameters
  batch_sharding: Any  # None: the step is jitted without shardings
  train_step: Any  # the pure step: (state, batch) -> (state, metrics)
  step: Any  # train_step jitted
  batch_rows: int  # rows of one global batch
  seq_len: int

  def fresh_state(self, seed):
    """A freshly initialised train state, created with its shardings."""
    return make_train_state(self.spec, self.tx, self.state_shardings, seed)

  def abstract_state(self, seed):
    """ShapeDtypeStructs (with shardings) of the train state: a restore or compile target."""
    return abstract_train_state(self.spec, self.tx, self.state_shardings, seed)


def assemble_train_step(cfg, spec, batch_sharding=None):
  """The train step of `cfg` (train.grad_accum_steps, lm_loss_weight, loss_chunk,
  attention_backward and the optimizer fields) for the model of `spec`. With `batch_sharding`, jitted as the trainer
  runs it: state and batch placed on the mesh, activations placed by the mesh rules, the
  state donated. Without, a plain jax.jit (one device, nothing donated: tests)."""
  t = cfg.train
  tx, schedule = make_optimizer(t, spec.abstract_params)
  shardings = state_shardings(spec, tx)
  train_step = make_train_step(spec.graphdef, tx, schedule, t.grad_accum_steps, t.lm_loss_weight, t.loss_chunk,
                               ATTENTION_BACKWARDS[t.attention_backward])
  if batch_sharding is None:
    step = jax.jit(train_step)
  else:
    step = jit_train_step(train_step, shardings, batch_sharding, spec.mesh, spec.rules)
  return TrainStepParts(spec, tx, schedule, shardings, batch_sharding, train_step, step, t.global_batch_size,
                        cfg.data.seq_len)


def build_train_step(cfg, mesh, platform=None):
  """The trainer's step of `cfg` on `mesh`, sized for `platform` (default: this one), from
  the config alone: UserError if a batch does not split over the mesh."""
  t, rules = cfg.train, tuple(cfg.mesh.rules)
  sharding.check_batch_fits(t.global_batch_size, t.grad_accum_steps, cfg.data.seq_len, mesh, rules)
  dims = resolve_dims(cfg.model, data.make_tokenizer(cfg.data.tokenizer).vocab_size, platform=platform)
  return assemble_train_step(cfg, model_spec(dims, mesh, rules), sharding.batch_sharding(mesh, rules))


def abstract_batch(parts):
  """ShapeDtypeStructs of one global batch, placed as the step takes it."""
  shape = (parts.batch_rows, parts.seq_len)
  return {name: jax.ShapeDtypeStruct(shape, dtype, sharding=parts.batch_sharding)
          for name, dtype in BATCH_DTYPES.items()}


def compile_train_step(parts, seed=0):
  """The compiled step for abstract inputs (nothing allocated)."""
  return parts.step.lower(parts.abstract_state(seed), abstract_batch(parts)).compile()


def synthetic_batch(parts, vocab_size, seed=0):
  """One global batch of random tokens, one document per row, placed on the mesh."""
  rng = np.random.default_rng(seed)
  shape = (parts.batch_rows, parts.seq_len)
  tokens = rng.integers(0, vocab_size, (shape[0], shape[1] + 1)).astype(np.int32)
  batch = {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:],
           'positions': np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape),
           'segment_ids': np.ones(shape, np.int32), 'loss_mask': np.ones(shape, np.float32)}
  return {name: jax.device_put(value, parts.batch_sharding) for name, value in batch.items()}
