"""AdamW with linear warmup and cosine decay, gradient clipping and a weight-decay mask."""

import jax
import optax
from flax import nnx


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


def make_optimizer(train_cfg, abstract_params):
  t = train_cfg
  schedule = learning_rate_schedule(t)
  adamw = optax.adamw(schedule, b1=t.b1, b2=t.b2, eps=t.eps, weight_decay=t.weight_decay,
                      mask=weight_decay_mask(abstract_params, t.decay_embeddings))
  chain = [optax.clip_by_global_norm(t.grad_clip)] if t.grad_clip > 0 else []
  return optax.chain(*chain, adamw), schedule
