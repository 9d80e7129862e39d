"""Per-token NLL of the final hidden states, unembedded a sequence chunk at a time, so that
the float32 [B, T, vocab] logits and their gradient are never all live at once.

Chunk k of n holds the positions k, k + n, k + 2n, ...: with the length sharded over
devices (context parallelism) every device then holds an equal contiguous share of every
chunk when the shard count divides the chunk size, and the scan over chunks slices no
sharded axis. Which positions share a chunk does not change any token's NLL.
"""

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec

from sparseformer import sharding

# Sequences up to this length keep the one-shot loss; longer ones hold one chunk's logits,
# B x 2048 x vocab: what a 2048-token run holds anyway, and still a matmul of thousands of
# rows per device (no loss of throughput), while at 32k it is 1/16 of the full logits.
DEFAULT_LOSS_CHUNK = 2048


def token_nll(model, hidden, targets, chunk):
  """float32 NLL [B, T] of `targets` [B, T] under `model.logits(hidden)`, hidden [B, T, d].
  chunk 0 or >= T: one unembedding of the whole sequence. Otherwise ceil(T / chunk) chunks
  of `chunk` positions (the last one padded) in a `lax.scan` whose body is rematerialised:
  the backward recomputes one chunk's logits at a time instead of keeping them all."""
  length = hidden.shape[1]
  if chunk <= 0 or chunk >= length:
    return _nll(model, hidden, targets)
  count = -(-length // chunk)
  hidden_chunks = _to_chunks(hidden, count, chunk)
  target_chunks = _to_chunks(targets, count, chunk)

  @jax.checkpoint
  def chunk_nll(hidden_chunk, target_chunk):
    return _nll(model, hidden_chunk, target_chunk)

  _, nll_chunks = jax.lax.scan(lambda carry, xs: (carry, chunk_nll(*xs)), None, (hidden_chunks, target_chunks))
  return _from_chunks(nll_chunks, length)


def _nll(model, hidden, targets):
  return optax.softmax_cross_entropy_with_integer_labels(model.logits(hidden), targets)


def _to_chunks(x, count, chunk):
  """[B, T, ...] -> [count, B, chunk, ...], chunk k holding positions k, k + count, ..."""
  padding = count * chunk - x.shape[1]
  if padding:
    x = jnp.pad(x, [(0, 0), (0, padding)] + [(0, 0)] * (x.ndim - 2))
  x = x.reshape(x.shape[0], chunk, count, *x.shape[2:])
  return _place_chunks(jnp.moveaxis(x, 2, 0))


def _from_chunks(x, length):
  """[count, B, chunk] -> [B, length], the inverse of `_to_chunks` (padding dropped)."""
  x = jnp.moveaxis(x, 0, 2)
  return x.reshape(x.shape[0], -1)[:, :length]


def _place_chunks(x):
  """Under an activation placement, the chunked rows keep the batch and length sharding of
  the hidden states (length on the within-chunk axis), where the shards divide them."""
  placement = sharding.current_placement()
  if placement is None:
    return x
  batch_axes, length_axes = placement.spec('batch', 'length')
  if x.shape[1] % placement.axis_size(batch_axes) or x.shape[2] % placement.axis_size(length_axes):
    return x
  spec = PartitionSpec(None, batch_axes, length_axes, *[None] * (x.ndim - 3))
  return jax.lax.with_sharding_constraint(x, NamedSharding(placement.mesh, spec))
