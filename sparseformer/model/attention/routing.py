"""Routing attention (Routing Transformer, Roy et al., arXiv 2003.05997; research/mechanisms.md
section 2): online k-means clusters decide who attends to whom.

    routing:K   K clusters per routing head (e.g. routing:16)

Heads split into local heads (the first `routing.local_heads`: a causal window of
`routing.local_window` tokens, the window mechanism's plan) and routing heads (the rest).
A routing head normalises each token's pre-RoPE query (and key, unless `shared_qk`) with
LN0, assigns it to the most similar of K centroids, and attends within its cluster and
document with the usual rotated q.k logits (routing_plan.py):

  selection=causal         (default) a query sees the keys of its own cluster at or
                           before it. Assignment depends on the token's own vector and
                           on centroids that only change between steps: nothing leaks
                           from the future, and decoding routes exactly as training.
  selection=balanced_topw  the paper's routing: each cluster takes the `topw_window`
                           tokens most similar to its centroid over the whole row (0:
                           T // K). Leaks selection information from future tokens.

With `shared_qk` the keys of routing heads are their queries (the paper's decoder
default; the layer still projects keys for the local heads) and the self pair is masked
unless it is a query's only key.

Centroids, EMA counts and sums are MechanismState (routing_kmeans.py), updated in the
train step only (ctx.training) from the statistics of the whole batch, with the
centroids the step started from used for routing and the commitment loss
`routing.commitment` x mean ||x - stopgrad(centroid)||^2 (aux['losses']['routing_commitment']).
The update is a function output, not a side effect, so a rematerialised block recomputes
it without applying it twice; with gradient accumulation each micro-batch is one EMA step.
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import block_sparse_attention, masks, plan_from_mask
from sparseformer.model.attention import context_parallel
from sparseformer.model.attention import routing_kmeans as kmeans
from sparseformer.model.attention import routing_plan
from sparseformer.model.attention.base import (Mechanism, MechanismState, mean_causal_keys, no_aux, register,
                                               softmax_flops)


def local_head_count(r, num_heads, num_kv_heads):
  """The number of local heads: routing.local_heads, or for -1 half the kv-head groups."""
  if r.local_heads >= 0:
    return r.local_heads
  return (num_kv_heads // 2) * (num_heads // num_kv_heads)


def routing_config_problem(r, num_heads, num_kv_heads):
  """The message for bad `model.attention.routing` values with these heads, or None."""
  local = local_head_count(r, num_heads, num_kv_heads)
  group = num_heads // num_kv_heads
  checks = [
      (r.local_heads >= -1, f'routing.local_heads={r.local_heads}: use a count >= 0, or -1 (half the kv groups)'),
      (local < num_heads, f'routing.local_heads={local} leaves no routing head of {num_heads}'),
      (local % group == 0, f'routing.local_heads={local} must be a multiple of the GQA group size {group}'),
      (r.local_window > 0, f'routing.local_window={r.local_window}: use a positive window'),
      (r.selection in routing_plan.SELECTIONS,
       f'routing.selection={r.selection!r}: use {" or ".join(routing_plan.SELECTIONS)}'),
      (r.topw_window >= 0, f'routing.topw_window={r.topw_window}: use a size >= 0 (0: length // clusters)'),
      (0 <= r.decay < 1, f'routing.decay={r.decay}: use a value in [0, 1)'),
      (r.commitment >= 0, f'routing.commitment={r.commitment}: use a weight >= 0'),
  ]
  for ok, message in checks:
    if not ok:
      return 'model.attention.' + message
  return None


def token_weights(segment_ids, batch, length):
  """[B, T] float32: 1 for tokens, 0 for padding (segment id 0)."""
  if segment_ids is None:
    return jnp.ones((batch, length), jnp.float32)
  return (segment_ids != 0).astype(jnp.float32)


@register('routing')
class RoutingAttention(Mechanism):
  needs_pre_rope = True  # routing reads the un-rotated q, k (content, not position)

  def __init__(self, dims, layer_index, rngs):
    super().__init__(dims, layer_index, rngs)
    self.group = dims.group_size
    self.local_heads = local_head_count(self.options.routing, dims.num_heads, dims.num_kv_heads)
    self.routing_heads = dims.num_heads - self.local_heads
    state = kmeans.initial_state(rngs.params(), self.routing_heads, self.clusters, dims.head_dim)
    self.centroids = MechanismState(state['centroids'])
    self.counts = MechanismState(state['counts'])
    self.sums = MechanismState(state['sums'])

  @classmethod
  def check_argument(cls, argument):
    if argument is None or not argument.isdigit() or int(argument) < 1:
      return f'{cls.name} needs a positive number of clusters, e.g. {cls.name}:16'
    return None

  @property
  def clusters(self):
    return int(self.argument)

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    """Local heads: their window. Routing heads: 1/K of the causal keys (balanced
    clusters) plus scoring K centroids."""
    clusters, r = int(argument), options.routing
    local = local_head_count(r, dims.num_heads, dims.num_kv_heads)
    routed = dims.num_heads - local
    return (softmax_flops(local, dims.head_dim, mean_causal_keys(seq_len, r.local_window))
            + softmax_flops(routed, dims.head_dim, mean_causal_keys(seq_len) / clusters)
            + routed * 2 * dims.head_dim * clusters)

  def __call__(self, q, k, v, ctx, pre_rope=None):
    if pre_rope is None:
      raise ValueError('the routing mechanism needs the pre-RoPE projections: call it with pre_rope=(q, k)')
    scale = ctx.logit_scale / q.shape[-1] ** 0.5
    local = self.local_heads
    y_routed, aux = self.routing_attention(q[:, :, local:], k, v, pre_rope, ctx, scale)
    if not local:
      return y_routed, aux
    kv_local = local // self.group
    y_local = self.local_attention(q[:, :, :local], k[:, :, :kv_local], v[:, :, :kv_local], ctx, scale)
    return jnp.concatenate([y_local, y_routed.astype(y_local.dtype)], axis=2), aux

  def local_attention(self, q, k, v, ctx, scale):
    window = self.options.routing.local_window

    def attend(q, k, v, segment_ids):
      plan = plan_from_mask(masks.causal_window(window), q_len=q.shape[1], block_q=self.options.block_size,
                            block_kv=self.options.block_size, segment_ids=segment_ids)
      return block_sparse_attention(q, k, v, plan, scale=scale)

    names = context_parallel.QKV_NAMES + (context_parallel.row_names(ctx.segment_ids),)
    return context_parallel.per_row_and_head('routing', attend, (q, k, v, ctx.segment_ids), names,
                                             context_parallel.Q_NAMES)

  def routing_kv_heads(self):
    """The kv head of each routing head (static)."""
    return (self.local_heads + np.arange(self.routing_heads)) // self.group

  def routed_vectors(self, q_pre, k_pre):
    """LN0 of the routing heads' pre-RoPE queries and keys [B, T, Hr, d] (keys None with shared QK)."""
    xq = kmeans.unit_normalise(q_pre[:, :, self.local_heads:])
    if self.options.routing.shared_qk:
      return xq, None
    return xq, kmeans.unit_normalise(k_pre[:, :, self.routing_kv_heads()])

  def routing_attention(self, q, k, v, pre_rope, ctx, scale):
    """Outputs [B, T, Hr, D] of the routing heads (queries q [B, T, Hr, D]) and aux."""
    r = self.options.routing
    xq, xk = self.routed_vectors(*pre_rope)
    centroids = self.centroids[...]
    kv_heads = self.routing_kv_heads()
    keys, values = k[:, :, kv_heads], v[:, :, kv_heads]
    q_scores = kmeans.similarities(jax.lax.stop_gradient(xq), centroids)
    k_scores = q_scores if xk is None else kmeans.similarities(jax.lax.stop_gradient(xk), centroids)
    q_clusters = jnp.argmax(q_scores, -1).astype(jnp.int32)
    k_clusters = jnp.argmax(k_scores, -1).astype(jnp.int32)
    y = self.clustered_attention(q, keys, values, (q_clusters, k_clusters, q_scores, k_scores), ctx.segment_ids,
                                 scale)
    weights = token_weights(ctx.segment_ids, q.shape[0], q.shape[1])
    aux = self.routing_aux(xq, xk, q_clusters, k_clusters, centroids, weights)
    if ctx.training:
      self.update_state(xq, xk, q_clusters, k_clusters, weights)
    return y, aux

  def clustered_attention(self, q, keys, values, routes, segment_ids, scale):
    """Outputs [B, T, Hr, D] of the routing heads, per device over rows and heads on a mesh
    (each (row, head) sorts its own tokens by cluster); routes = (q_clusters, k_clusters
    [B, T, Hr], q_scores, k_scores [B, T, Hr, K])."""
    r = self.options.routing
    options = dict(block=self.options.block_size, scale=scale, shared_qk=r.shared_qk)
    window = r.topw_window or max(q.shape[1] // self.clusters, 1)

    def attend(q, keys, values, routes, segment_ids):
      q_clusters, k_clusters, q_scores, k_scores = routes
      if r.selection == 'causal':
        return routing_plan.cluster_attention(q, keys, values, q_clusters, k_clusters, segment_ids, **options)
      return routing_plan.topw_attention(q, keys, values, q_scores, k_scores, segment_ids, window=window, **options)

    heads = context_parallel.Q_NAMES
    names = (heads, heads, heads, ('batch . heads',) * 2 + (heads,) * 2, context_parallel.row_names(segment_ids))
    return context_parallel.per_row_and_head('routing', attend, (q, keys, values, routes, segment_ids), names, heads)

  def routed_pairs(self, xq, xk, q_clusters, k_clusters):
    """(vectors, clusters) the clustering sees: queries, and keys unless shared."""
    if xk is None:
      return [(xq, q_clusters)]
    return [(xq, q_clusters), (xk, k_clusters)]

  def routing_aux(self, xq, xk, q_clusters, k_clusters, centroids, weights):
    pairs = self.routed_pairs(xq, xk, q_clusters, k_clusters)
    loss = sum(kmeans.commitment_loss(x, centroids, c, weights) for x, c in pairs) / len(pairs)
    counts = kmeans.batch_statistics(xq, q_clusters, weights, self.clusters)[0]
    aux = no_aux()
    aux['losses']['routing_commitment'] = self.options.routing.commitment * loss
    aux['stats']['routing_largest_cluster'] = jnp.mean(counts.max(-1) / jnp.maximum(counts.sum(-1), 1.0))
    return aux

  def update_state(self, xq, xk, q_clusters, k_clusters, weights):
    """One EMA step with the batch's statistics (global sums over the batch)."""
    counts, sums = 0.0, 0.0
    for x, c in self.routed_pairs(xq, xk, q_clusters, k_clusters):
      batch_counts, batch_sums = kmeans.batch_statistics(jax.lax.stop_gradient(x), c, weights, self.clusters)
      counts, sums = counts + batch_counts, sums + batch_sums
    state = {'centroids': self.centroids[...], 'counts': self.counts[...], 'sums': self.sums[...]}
    new = kmeans.ema_update(state, counts, sums, self.options.routing.decay)
    self.centroids[...] = new['centroids']
    self.counts[...] = new['counts']
    self.sums[...] = new['sums']


def decode_clusters(x_pre, centroids):
  """int32 [B, Hr]: the clusters of one new token's pre-RoPE vectors x_pre [B, Hr, d]."""
  return kmeans.assign(kmeans.unit_normalise(x_pre)[:, None], centroids)[:, 0]


decode_visible = routing_plan.decode_visible
