"""The train state as plain pytrees, created directly with its shardings.

state = {'params', 'mechanism_state' (pure dicts of arrays), 'opt_state', 'step', 'rng'}
The model's structure (nnx graphdef) stays outside the state and is merged back inside
the jitted step.
"""

import contextlib
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparseformer import sharding
from sparseformer.model import LanguageModel
from sparseformer.model.attention import MechanismState


@dataclasses.dataclass
class ModelSpec:
  """Everything about the model that is not an array: what jitted functions close over."""
  dims: Any
  graphdef: Any
  abstract_params: Any  # nnx.State of Variables holding ShapeDtypeStructs (with metadata)
  abstract_mechanism_state: Any
  mesh: Any
  rules: tuple

  def shardings(self, abstract_state):
    return sharding.state_shardings(abstract_state, self.mesh, self.rules).to_pure_dict()

  @property
  def param_count(self):
    return sum(v.size for v in jax.tree.leaves(self.abstract_params))


def split_model(model):
  graphdef, params, mechanism_state, rest = nnx.split(model, nnx.Param, MechanismState, ...)
  if jax.tree.leaves(rest):
    raise TypeError(f'model holds state that is neither a Param nor a MechanismState: {rest}')
  return graphdef, params, mechanism_state


def model_spec(dims, mesh, rules):
  abstract_model = nnx.eval_shape(lambda: LanguageModel(dims, nnx.Rngs(0)))
  graphdef, params, mechanism_state = split_model(abstract_model)
  return ModelSpec(dims, graphdef, params, mechanism_state, mesh, tuple(rules))


def model_shardings(spec):
  return {'params': spec.shardings(spec.abstract_params),
          'mechanism_state': spec.shardings(spec.abstract_mechanism_state)}


def model_arrays(dims, key):
  """{'params', 'mechanism_state'} of a freshly initialised model, as pure dicts."""
  _, params, mechanism_state = split_model(LanguageModel(dims, nnx.Rngs(params=key)))
  return {'params': params.to_pure_dict(), 'mechanism_state': mechanism_state.to_pure_dict()}


def with_shardings(shapes, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def abstract_model_arrays(spec):
  """The restore target of a checkpoint's model item."""
  shapes = jax.eval_shape(lambda: model_arrays(spec.dims, jax.random.key(0)))
  return with_shardings(shapes, model_shardings(spec))


def state_shardings(spec, tx):
  """Shardings of the whole train state; optimizer moments follow their parameters."""
  replicated = sharding.replicated(spec.mesh)
  model = model_shardings(spec)
  abstract_opt = jax.eval_shape(tx.init, spec.abstract_params.to_pure_dict())
  opt = optax.tree_utils.tree_map_params(tx, lambda _, param_sharding: param_sharding, abstract_opt,
                                         model['params'], transform_non_params=lambda _: replicated)
  return {**model, 'opt_state': opt, 'step': replicated, 'rng': replicated}


def train_state_factory(spec, tx, seed):
  def create():
    model = model_arrays(spec.dims, jax.random.key(seed))
    return {**model, 'opt_state': tx.init(model['params']), 'step': jnp.zeros((), jnp.int32),
            'rng': jax.random.PRNGKey(seed)}
  return create


def make_train_state(spec, tx, shardings, seed):
  """A fresh train state, created sharded inside jit (no unsharded copy on one device)."""
  create = jax.jit(train_state_factory(spec, tx, seed), out_shardings=shardings)
  with fast_random_compile(shardings['params']):
    return create()


@contextlib.contextmanager
def fast_random_compile(param_shardings):
  """Inside, a GPU lowers jax.random's threefry to jaxlib's CUDA kernel instead of inlining
  it into XLA fusions: the same bits, but the 85M model's init compiled in 81 s with the
  inlined form on an H200 (benchmarks/launch_time.py), most of a fresh launch. The kernel
  works on whole arrays (the SPMD partitioner cannot split it), so it is used only when
  every parameter sharding is replicated: sharded ones keep the partitionable form. No
  effect off a GPU."""
  name = 'jax_threefry_gpu_kernel_lowering'
  previous = getattr(jax.config, name)
  replicated = all(s.is_fully_replicated for s in jax.tree.leaves(param_shardings))
  jax.config.update(name, replicated or previous)
  try:
    yield
  finally:
    jax.config.update(name, previous)


def abstract_train_state(spec, tx, shardings, seed):
  """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
  return with_shardings(jax.eval_shape(train_state_factory(spec, tx, seed)), shardings)
