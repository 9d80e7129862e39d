"""AdamW with linear warmup and cosine decay, gradient clipping, a weight-decay mask, and
an optional set of trainable parameters (`train.trainable`, a regex over parameter paths)."""

import re

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from sparseformer.errors import UserError
from sparseformer.training.checkpoint import path_name


def learning_rate_schedule(train_cfg):
  t = train_cfg
  warmup = min(t.warmup_steps, t.steps - 1)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=t.lr, warmup_steps=max(warmup, 0),
      decay_steps=t.steps, end_value=t.lr * t.min_lr_ratio)


def weight_decay_mask(abstract_params, decay_embeddings):
  """Pure dict of bools: decay matrices, not norm scales; embeddings only if asked."""
  def decays(variable):
    axes = variable.get_metadata().get('logical_axes') or ()
    is_embedding = 'vocab' in axes
    return variable.ndim >= 2 and (decay_embeddings or not is_embedding)
  mask = jax.tree.map(lambda v: v.replace(decays(v)), abstract_params,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))
  return mask.to_pure_dict()


def trainable_mask(abstract_params, pattern):
  """Pure dict of bools: True for the parameters whose path ('blocks/0/attention/...')
  matches `pattern` (re.search); every parameter for ''. UserError if none matches."""
  params = abstract_params.to_pure_dict() if hasattr(abstract_params, 'to_pure_dict') else abstract_params
  if not pattern:
    return jax.tree.map(lambda _: True, params)
  regex = re.compile(pattern)
  mask = jax.tree_util.tree_map_with_path(lambda path, _: bool(regex.search(path_name(path))), params)
  if not any(jax.tree.leaves(mask)):
    examples = ', '.join(path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(params)[:4])
    raise UserError(f'train.trainable={pattern!r} matches no parameter (paths look like {examples}, ...)')
  return mask


def zero_frozen(mask):
  """Sets the updates of parameters outside `mask` to exact zeros (before clipping, so
  frozen gradients do not count in the norm, and after AdamW, so weight decay leaves them
  bit-identical)."""
  def update(updates, state, params=None):
    return jax.tree.map(lambda u, trains: u if trains else jnp.zeros_like(u), updates, mask), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(train_cfg, abstract_params):
  t = train_cfg
  schedule = learning_rate_schedule(t)
  adamw = optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                      mask=weight_decay_mask(abstract_params, t.decay_embeddings))
  chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  if t.trainable:
    freeze = zero_frozen(trainable_mask(abstract_params, t.trainable))
    return optax.chain(freeze, *chain, adamw, freeze), schedule
  return optax.chain(*chain, adamw), schedule
