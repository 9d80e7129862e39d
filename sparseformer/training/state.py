"""The train state as plain pytrees, created directly with its shardings.

state = {'params', 'mechanism_state' (pure dicts of arrays), 'opt_state', 'step', 'rng'}
The model's structure (nnx graphdef) stays outside the state and is merged back inside
the jitted step.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparseformer import sharding
from sparseformer.model import LanguageModel
from sparseformer.model.attention import MechanismState
from sparseformer.training.optimizer import make_optimizer


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


def init_model(spec, key):
  """Fresh parameters and mechanism state, created sharded inside jit."""
  def create(key):
    _, params, mechanism_state = split_model(LanguageModel(spec.dims, nnx.Rngs(params=key)))
    return {'params': params.to_pure_dict(), 'mechanism_state': mechanism_state.to_pure_dict()}
  return jax.jit(create, out_shardings=model_shardings(spec))(key)


def state_shardings(spec, tx):
  """Shardings of the whole train state; optimizer moments follow their parameters."""
  replicated = sharding.replicated(spec.mesh)
  model = model_shardings(spec)
  abstract_opt = jax.eval_shape(tx.init, spec.abstract_params.to_pure_dict())
  opt = optax.tree_utils.tree_map_params(tx, lambda _, param_sharding: param_sharding, abstract_opt,
                                         model['params'], transform_non_params=lambda _: replicated)
  return {**model, 'opt_state': opt, 'step': replicated, 'rng': replicated}


def make_train_state(spec, train_cfg, seed):
  tx, schedule = make_optimizer(train_cfg, spec.abstract_params)
  shardings = state_shardings(spec, tx)
  model = init_model(spec, jax.random.key(seed))

  def create(model):
    return {**model, 'opt_state': tx.init(model['params']), 'step': jnp.zeros((), jnp.int32),
            'rng': jax.random.PRNGKey(seed)}
  state = jax.jit(create, out_shardings=shardings)(model)
  return state, tx, schedule, shardings


def abstract_train_state(shardings, state_example_fn):
  """ShapeDtypeStructs with shardings: the restore target of a checkpoint."""
  shapes = jax.eval_shape(state_example_fn)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
