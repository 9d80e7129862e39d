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

Decoding (causal selection) keeps two caches per layer: the local heads' last
`local_window` tokens (a ring buffer of their kv heads) and, for the routing heads, every
token's key (the rotated query with shared QK), value and cluster per routing head; a new
query attends over the slots of its own cluster (routing_plan.decode_visible).
"""

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.block_sparse_attention import block_sparse_attention, masks, plan_from_mask
from sparseformer.model.attention import kv_cache
from sparseformer.model.attention import routing_kmeans as kmeans
from sparseformer.model.attention import routing_plan
from sparseformer.model.attention.base import (KEYS, QUERIES, ROWS, Mechanism, MechanismState, Option, first_problem,
                                               kernel, mean_causal_keys, no_aux, register, softmax_flops,
                                               softmax_scale, token_weights)


def local_head_count(r, num_heads, num_kv_heads):
  """The number of local heads: routing.local_heads, or for -1 half the kv-head groups."""
  if r.local_heads >= 0:
    return r.local_heads
  return (num_kv_heads // 2) * (num_heads // num_kv_heads)


@register('routing')
class RoutingAttention(Mechanism):
  argument_meaning = ('number of clusters', 16)
  extra_inputs = ('pre_rope',)  # routing reads the un-rotated q, k (content, not position)
  options_section = 'routing'  # model.attention.routing, docs/routing_attention.md
  OPTIONS = {
      'local_heads': Option(-1, 'the first heads attend locally; -1: half the kv-head groups', lambda n: n >= -1,
                            'use a count >= 0, or -1 (half the kv groups)'),
      'local_window': Option(256, 'causal window of the local heads', lambda w: w > 0, 'use a positive window'),
      'selection': Option('causal', "causal: own cluster, keys at or before | balanced_topw: the paper's top-w "
                          '(leaks)', choices=routing_plan.SELECTIONS),
      'topw_window': Option(0, 'balanced_topw: tokens per cluster; 0: length // clusters', lambda w: w >= 0,
                            'use a size >= 0 (0: length // clusters)'),
      'shared_qk': Option(True, 'routing heads use their queries as keys (self pair masked unless alone)'),
      'decay': Option(0.999, 'EMA decay of the centroid counts and sums', lambda d: 0 <= d < 1,
                      'use a value in [0, 1)'),
      'commitment': Option(1e-4, 'weight of the commitment loss', lambda w: w >= 0, 'use a weight >= 0'),
  }

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
  def validate_options(cls, options, model_cfg, arguments):
    """Own values; with routing layers, the local heads against the model's heads."""
    problem = super().validate_options(options, model_cfg, arguments)
    if problem or not arguments:
      return problem
    num_heads, num_kv_heads = model_cfg.num_heads, model_cfg.num_kv_heads or model_cfg.num_heads
    local, group = local_head_count(options, num_heads, num_kv_heads), num_heads // num_kv_heads
    return first_problem([
        (local < num_heads, f'routing.local_heads={local} leaves no routing head of {num_heads}'),
        (local % group == 0, f'routing.local_heads={local} must be a multiple of the GQA group size {group}'),
    ], 'model.attention.')

  @property
  def clusters(self):
    return self.argument

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    """Local heads: their window. Routing heads: 1/K of the causal keys (balanced
    clusters) plus scoring K centroids."""
    r = options.routing
    local = local_head_count(r, dims.num_heads, dims.num_kv_heads)
    routed = dims.num_heads - local
    return (softmax_flops(local, dims.head_dim, mean_causal_keys(seq_len, r.local_window))
            + softmax_flops(routed, dims.head_dim, mean_causal_keys(seq_len) / argument)
            + routed * 2 * dims.head_dim * argument)

  def forward(self, q, k, v, ctx, pre_rope):
    scale = softmax_scale(q, ctx)
    local = self.local_heads
    y_routed, aux = self.routing_attention(q[:, :, local:], k, v, pre_rope, ctx, scale)
    if not local:
      return y_routed, aux
    kv_local = local // self.group
    y_local = self.local_attention(q[:, :, :local], k[:, :, :kv_local], v[:, :, :kv_local], ctx.segment_ids,
                                   scale=scale)
    return jnp.concatenate([y_local, y_routed.astype(y_local.dtype)], axis=2), aux

  @kernel(QUERIES, KEYS, KEYS, ROWS, out=QUERIES)
  def local_attention(self, q, k, v, segment_ids, *, scale):
    block = self.block_size
    plan = plan_from_mask(masks.causal_window(self.options.routing.local_window), q_len=q.shape[1], block_q=block,
                          block_kv=block, segment_ids=segment_ids)
    return block_sparse_attention(q, k, v, plan, scale=scale)

  def routing_kv_heads(self):
    """The kv head of each routing head (static)."""
    return (self.local_heads + np.arange(self.routing_heads)) // self.group

  def routed_pre_rope(self, q_pre, k_pre):
    """The routing heads' pre-RoPE queries and keys [B, T, Hr, d] (keys None with shared QK)."""
    xq = q_pre[:, :, self.local_heads:]
    if self.options.routing.shared_qk:
      return xq, None
    return xq, k_pre[:, :, self.routing_kv_heads()]

  def routed_vectors(self, q_pre, k_pre):
    """LN0 of the routing heads' pre-RoPE queries and keys [B, T, Hr, d] (keys None with shared QK)."""
    xq, xk = self.routed_pre_rope(q_pre, k_pre)
    return kmeans.unit_normalise(xq), None if xk is None else kmeans.unit_normalise(xk)

  def routing_attention(self, q, k, v, pre_rope, ctx, scale):
    """Outputs [B, T, Hr, D] of the routing heads (queries q [B, T, Hr, D]) and aux."""
    xq, xk = self.routed_vectors(*pre_rope)
    centroids = self.centroids[...]
    kv_heads = self.routing_kv_heads()
    keys, values = k[:, :, kv_heads], v[:, :, kv_heads]
    q_scores = kmeans.similarities(jax.lax.stop_gradient(xq), centroids)
    k_scores = q_scores if xk is None else kmeans.similarities(jax.lax.stop_gradient(xk), centroids)
    q_clusters = jnp.argmax(q_scores, -1).astype(jnp.int32)
    k_clusters = jnp.argmax(k_scores, -1).astype(jnp.int32)
    y = self.clustered_attention(q, keys, values, (q_clusters, k_clusters, q_scores, k_scores), ctx.segment_ids,
                                 scale=scale)
    weights = token_weights(ctx.segment_ids, q.shape[0], q.shape[1])
    aux = self.routing_aux(xq, xk, q_clusters, k_clusters, centroids, weights)
    if ctx.training:
      self.update_state(xq, xk, q_clusters, k_clusters, weights)
    return y, aux

  # routes: (q_clusters, k_clusters [B, T, Hr], q_scores, k_scores [B, T, Hr, K])
  @kernel(QUERIES, QUERIES, QUERIES, ('batch . heads', 'batch . heads', QUERIES, QUERIES), ROWS, out=QUERIES)
  def clustered_attention(self, q, keys, values, routes, segment_ids, *, scale):
    """Outputs [B, T, Hr, D] of the routing heads; each (row, head) sorts its own tokens by
    cluster."""
    r = self.options.routing
    options = dict(block=self.block_size, scale=scale, shared_qk=r.shared_qk)
    q_clusters, k_clusters, q_scores, k_scores = routes
    if r.selection == 'causal':
      return routing_plan.cluster_attention(q, keys, values, q_clusters, k_clusters, segment_ids, **options)
    window = r.topw_window or max(q.shape[1] // self.clusters, 1)
    return routing_plan.topw_attention(q, keys, values, q_scores, k_scores, segment_ids, window=window, **options)

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

  # --------------------------------------------------------------------------------------
  # decoding (causal selection): {'local': ring buffer, 'routed': slots with clusters}

  @property
  def local_kv_heads(self):
    return self.local_heads // self.group

  def decode_problem(self):
    """Balanced top-w cannot decode: its training routing looks at future tokens."""
    if self.options.routing.selection != 'causal':
      return (f'model.attention.routing.selection={self.options.routing.selection!r} cannot decode: its clusters '
              'are chosen over the whole row, future tokens included; use selection=causal')
    return super().decode_problem()


  def init_cache(self, batch, max_len, kv_heads, head_dim, dtype):
    """'routed': max_len slots of the routing heads' keys (their queries with shared QK),
    values (per kv head) and clusters; 'local' (with local heads): the last local_window
    tokens of the local heads' kv heads."""
    self.check_decodable()
    key_heads = self.routing_heads if self.options.routing.shared_qk else kv_heads - self.local_kv_heads
    routed = kv_cache.empty(batch, max_len, kv_heads - self.local_kv_heads, head_dim, dtype)
    routed['k'] = jnp.zeros((batch, max_len, key_heads, head_dim), dtype)
    routed['cluster'] = jnp.zeros((batch, max_len, self.routing_heads), jnp.int32)
    cache = {'routed': routed}
    if self.local_heads:
      slots = min(self.options.routing.local_window, max_len)
      cache['local'] = kv_cache.empty(batch, slots, self.local_kv_heads, head_dim, dtype)
    return cache

  def routed_keys(self, q, k):
    """The keys the routing heads attend: their rotated queries with shared QK, else their kv heads' keys."""
    return q[:, :, self.local_heads:] if self.options.routing.shared_qk else k[:, :, self.local_kv_heads:]

  def key_clusters(self, q_pre, k_pre):
    """int32 [B, T, Hr]: the cluster of each token's key per routing head."""
    xq, xk = self.routed_vectors(q_pre, k_pre)
    return kmeans.assign(xq if xk is None else xk, self.centroids[...])

  def prefill(self, q, k, v, ctx, cache, lengths, pre_rope):
    """The forward (centroids read, not updated) and the caches of the prompt tokens."""
    y, _ = self(q, k, v, ctx, pre_rope=pre_rope)
    kv_local = self.local_kv_heads
    routed = kv_cache.fill(cache['routed'], self.routed_keys(q, k), v[:, :, kv_local:], lengths)
    source = jnp.clip(routed['position'], 0, q.shape[1] - 1)[..., None]
    routed['cluster'] = jnp.take_along_axis(self.key_clusters(*pre_rope), source, axis=1)
    new = {'routed': routed}
    if self.local_heads:
      new['local'] = kv_cache.fill(cache['local'], k[:, :, :kv_local], v[:, :, :kv_local], lengths)
    return y, new

  def decode(self, q, k, v, ctx, cache, pre_rope):
    """The local heads over their window, the routing heads over their cluster."""
    positions, scale = ctx.positions[:, 0], softmax_scale(q, ctx)
    y, routed = self.decode_routed(q, k, v, pre_rope, cache['routed'], positions, scale)
    if not self.local_heads:
      return y, {'routed': routed}
    kv_local = self.local_kv_heads
    local = kv_cache.append(cache['local'], k[:, :, :kv_local], v[:, :, :kv_local], positions)
    # The ring buffer holds exactly the window: every filled slot up to the query is in it.
    y_local = kv_cache.attend(q[:, :, :self.local_heads], local, kv_cache.causal(local, positions), scale)
    return jnp.concatenate([y_local, y], axis=2), {'local': local, 'routed': routed}

  def decode_routed(self, q, k, v, pre_rope, cache, positions, scale):
    """(y [B, 1, Hr, D], routed cache) of the routing heads: the new token's key, value and
    cluster written at its position, then its query over the slots of its cluster."""
    xq, xk = (None if x is None else x[:, 0] for x in self.routed_pre_rope(*pre_rope))
    centroids = self.centroids[...]
    query_cluster = decode_clusters(xq, centroids)
    key_cluster = query_cluster if xk is None else decode_clusters(xk, centroids)
    cluster = cache['cluster']
    cache = kv_cache.append(cache, self.routed_keys(q, k), v[:, :, self.local_kv_heads:], positions)
    written = cache['position'] == positions[:, None]  # [B, S]
    cache['cluster'] = jnp.where(written[..., None], key_cluster[:, None], cluster)
    visible = decode_visible(query_cluster, jnp.moveaxis(cache['cluster'], 1, 2), (positions + 1)[:, None, None],
                             self.options.routing.shared_qk)
    return kv_cache.attend(q[:, :, self.local_heads:], self.per_routing_head(cache), visible, scale), cache

  def per_routing_head(self, cache):
    """The routed cache as kv_cache.attend reads it: with shared QK the keys are per
    routing head, so each head's values are repeated beside them."""
    if not self.options.routing.shared_qk:
      return cache
    return {'k': cache['k'], 'v': jnp.repeat(cache['v'], self.group, axis=2)}


def decode_clusters(x_pre, centroids):
  """int32 [B, Hr]: the clusters of one new token's pre-RoPE vectors x_pre [B, Hr, d]."""
  return kmeans.assign(kmeans.unit_normalise(x_pre)[:, None], centroids)[:, 0]


decode_visible = routing_plan.decode_visible
