"""Online k-means of the routing mechanism (Routing Transformer, arXiv 2003.05997): pure
functions over arrays, one centroid set per routing head.

Vectors are normalised as in the reference code (LN0: zero mean and unit variance over
the head dimension, no scale or bias), so ||x|| ~ sqrt(d). The centroids used for
routing are the EMA means normalised the same way (spherical k-means, as lucidrains'
version): with equal norms the largest dot product is also the nearest centroid.

EMA state per head: counts N [K] and sums S [K, d], updated with the statistics of one
batch (a global sum over the batch: under jit with a sharded batch XLA all-reduces it):
    N <- decay N + (1 - decay) n,   S <- decay S + (1 - decay) s
    N' = (N + eps) / (sum N + K eps) * sum N          (Laplace smoothing, eps = 1e-5)
    centroid = LN0(S / N')
The state starts as one pseudo-observation per cluster at its initial centroid (N = 1,
S = centroid), so an empty cluster keeps its centroid instead of collapsing to zero.
"""

import jax
import jax.numpy as jnp

LAPLACE_EPS = 1e-5
NORM_EPS = 1e-6


def unit_normalise(x):
  """LN0 of the last axis in float32: zero mean, unit variance, no scale or bias."""
  x = x.astype(jnp.float32)
  x = x - x.mean(-1, keepdims=True)
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + NORM_EPS)


def initial_state(key, heads, clusters, dim):
  """{'centroids' [H, K, d], 'counts' [H, K], 'sums' [H, K, d]} float32: LN0 of noise."""
  centroids = unit_normalise(jax.random.normal(key, (heads, clusters, dim), jnp.float32))
  return {'centroids': centroids, 'counts': jnp.ones((heads, clusters), jnp.float32), 'sums': centroids}


def similarities(x, centroids):
  """[B, T, H, K] float32 dot products of normalised x [B, T, H, d] with centroids [H, K, d]."""
  return jnp.einsum('bthd,hkd->bthk', x, centroids, preferred_element_type=jnp.float32)


def assign(x, centroids):
  """int32 [B, T, H]: the cluster of largest similarity (the lower index among ties)."""
  return jnp.argmax(similarities(x, centroids), axis=-1).astype(jnp.int32)


def batch_statistics(x, clusters, weights, num_clusters):
  """(counts [H, K], sums [H, K, d]) of normalised x [B, T, H, d] assigned to clusters
  [B, T, H], each token weighted by weights [B, T] (0 leaves padding out)."""
  one_hot = jax.nn.one_hot(clusters, num_clusters, dtype=jnp.float32) * weights[:, :, None, None]
  counts = one_hot.sum((0, 1))
  sums = jnp.einsum('bthk,bthd->hkd', one_hot, x.astype(jnp.float32))
  return counts, sums


def smoothed_means(counts, sums):
  """S / N' with Laplace-smoothed counts N' (see the module docstring)."""
  total = counts.sum(-1, keepdims=True)
  smoothed = (counts + LAPLACE_EPS) / (total + counts.shape[-1] * LAPLACE_EPS) * total
  return sums / smoothed[..., None]


def ema_update(state, batch_counts, batch_sums, decay):
  """The state after one EMA step with a batch's (counts, sums)."""
  counts = decay * state['counts'] + (1 - decay) * batch_counts
  sums = decay * state['sums'] + (1 - decay) * batch_sums
  return {'centroids': unit_normalise(smoothed_means(counts, sums)), 'counts': counts, 'sums': sums}


def commitment_loss(x, centroids, clusters, weights):
  """Mean over weighted tokens and heads of ||x - stopgrad(centroid of x)||^2."""
  chosen = centroids[jnp.arange(centroids.shape[0]), clusters]  # [B, T, H, d]
  distance = jnp.sum((x - jax.lax.stop_gradient(chosen)) ** 2, axis=-1)  # [B, T, H]
  weights = jnp.broadcast_to(weights[:, :, None], distance.shape)
  return jnp.sum(distance * weights) / jnp.maximum(weights.sum(), 1.0)
