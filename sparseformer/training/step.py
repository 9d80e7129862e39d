"""The pure train step: one `jax.jit` over (state, batch) -> (state, metrics)."""

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from pallas_kernels.block_sparse_attention import deterministic_backward as kernel_backward
from sparseformer import sharding
from sparseformer.model.attention import MechanismState
from sparseformer.training.loss import DEFAULT_LOSS_CHUNK, token_nll


def forward(graphdef, params, mechanism_state, batch, *, training, loss_chunk=DEFAULT_LOSS_CHUNK):
  """Per-token NLL [B, T], the sum of auxiliary losses, stats, and the new mechanism state.
  The NLL unembeds `loss_chunk` positions at a time (0: all at once), see training/loss.py."""
  model = nnx.merge(graphdef, params, mechanism_state)
  hidden, aux = model.hidden(batch['tokens'], batch['positions'], batch['segment_ids'], training=training)
  nll = token_nll(model, hidden, batch['targets'], loss_chunk)
  aux_loss = sum(aux['losses'].values(), jnp.zeros((), jnp.float32))
  new_mechanism_state = nnx.state(model, MechanismState).to_pure_dict()
  return nll * batch['loss_mask'], aux_loss, aux['stats'], new_mechanism_state


def split_micro_batches(batch, count):
  return jax.tree.map(lambda x: x.reshape(count, x.shape[0] // count, *x.shape[1:]), batch)


def make_train_step(graphdef, tx, schedule, grad_accum_steps, lm_loss_weight=1.0, loss_chunk=DEFAULT_LOSS_CHUNK,
                    deterministic_backward=None):
  """train_step(state, batch) -> (state, metrics). With accumulation, the gradient is that of
  the token-weighted mean NLL over the whole batch, as without it. The loss is
  lm_loss_weight x NLL + the auxiliary losses; with weight 0 the NLL is left out of the
  gradient altogether (gate distillation), and the 'loss' metric still reports it.
  loss_chunk: positions unembedded at a time (train.loss_chunk; 0: all at once).
  deterministic_backward: True/False, the attention kernels' reproducible or fused backward; None
  their default (train.attention_backward)."""

  def train_step(state, batch):
    if deterministic_backward is None:
      return accumulated_step(state, batch)
    with kernel_backward(deterministic_backward):  # read while jax.jit traces the step
      return accumulated_step(state, batch)

  def accumulated_step(state, batch):
    total_tokens = jnp.maximum(batch['loss_mask'].sum(), 1.0)
    micro_batches = split_micro_batches(batch, grad_accum_steps)

    def micro_step(carry, micro):
      grads_sum, mechanism_state = carry

      def objective(params):
        nll, aux_loss, stats, new_mechanism_state = forward(graphdef, params, mechanism_state, micro, training=True,
                                                            loss_chunk=loss_chunk)
        loss = aux_loss / grad_accum_steps
        if lm_loss_weight:
          loss = loss + lm_loss_weight * nll.sum() / total_tokens
        return loss, (nll.sum(), aux_loss, stats, new_mechanism_state)

      (_, (nll_sum, aux_loss, stats, new_mechanism_state)), grads = jax.value_and_grad(
          objective, has_aux=True)(state['params'])
      grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
      return (grads_sum, new_mechanism_state), (nll_sum, aux_loss, stats)

    zeros = jax.tree.map(jnp.zeros_like, state['params'])
    (grads, mechanism_state), (nll_sums, aux_losses, stats) = jax.lax.scan(
        micro_step, (zeros, state['mechanism_state']), micro_batches)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    new_state = {
        'params': optax.apply_updates(state['params'], updates),
        'mechanism_state': mechanism_state,
        'opt_state': opt_state,
        'step': state['step'] + 1,
        'rng': state['rng'],
    }
    metrics = {
        'loss': nll_sums.sum() / total_tokens,
        'aux_loss': aux_losses.mean(),
        'grad_norm': optax.global_norm(grads),
        'learning_rate': schedule(state['step']),
        'tokens': total_tokens,
        **{name: value.mean() for name, value in stats.items()},
    }
    return new_state, metrics

  return train_step


def jit_train_step(train_step, state_shardings, batch_sharding, mesh, rules=None):
  """The jitted step; with `rules`, traced with the activation placement of the mesh
  (attention then runs per shard, see model/attention/context_parallel.py)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  if rules is not None:
    train_step = sharding.with_activation_placement(train_step, mesh, rules)
  return jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                 out_shardings=(state_shardings, replicated), donate_argnums=0)
