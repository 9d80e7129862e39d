"""Sparse state expansion (SSE; Pan et al., arXiv 2507.16577; research/mechanisms.md section 5):
gated linear attention whose state is expanded into N partitions, a router sending each
token to top_k of them.

    sse:N   N state partitions per head (options in model.attention.sse)

Per query head h (keys and values of its GQA group), with x the layer input and q, k, v
the layer's projections before RoPE (SSE layers use no RoPE):
  shared branch     q1 = silu(q), k1 = softmax(k) over the head dim, g1 = logsigmoid(Wg1 x) / 16
  partition branch  q2 = silu(q + Uq Pq x), k2 = softmax(k + Uk Pk x), g2 = logsigmoid(Wg2 x) / 16
  values            v = silu(v), shared by both branches
  router            p = softmax(We x) over the N partitions, shared by the heads; the top_k
                    largest (ties to the lower index) are the token's partitions
  states            S0 <- diag(exp(g1)) S0 + k1 v^T
                    S_i <- diag(exp(g2)) S_i + (p_i k2) v^T   for the chosen partitions
                    S_i unchanged (no decay, no write)          for the others
  read              o = scale * (S0^T q1 + sum over chosen i of S_i^T (p_i q2))
  output            RMSNorm of o over the head dim, times silu(Wo x) (a gated RMSNorm)
Wg1, Wg2 are rank-16 projections with a bias; Pq, Pk, Wo rank `delta_rank` (0: head_dim).
Segment ids reset every state at each document start.

Training runs the chunked kernel of pallas_kernels/linear_attention in one of two exact
modes (`sse.mode`):
  mask    every partition is a virtual head over the whole row: a token not routed there
          gets key 0 and log decay 0 (an identity transition), so the kernel runs on
          (1 + N) x H heads; cost ~ (1 + N) x GLA.
  varlen  each partition's tokens are packed in order (a stable sort of the row by
          partition) behind the shared branch's row, a segment id per (partition,
          document) resets the state between runs, and outputs are gathered back; the
          row is (1 + top_k) T long whatever N is.
The balance loss `balance_weight` x (N / top_k) sum_i P_i f_i (P_i the mean router
probability of partition i, f_i the fraction of tokens writing to it) is
aux['losses']['sse_balance']; aux['stats']['sse_load{i}'] = f_i / top_k, each
partition's share of the writes (1 / N when balanced).

Decoding carries a state of 1 + N matrices per head, whatever the length (the cache of
init_cache, prefill and decode; `prefill_state` and `decode_step` on the layer's inputs).
"""

import typing

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.linear_attention import gated_linear_attention
from pallas_kernels.linear_attention.reference import CHUNK as LINEAR_CHUNK  # (for the FLOP estimate)
from sparseformer.model.attention import context_parallel, context_parallel_linear
from sparseformer.model.attention import sse_router as router_lib
from sparseformer.model.attention.base import (CUSTOM, Mechanism, Option, mean_causal_keys, no_aux, register,
                                               softmax_flops, token_weights)
from sparseformer.model.layers import Einsum, param

MODES = ('mask', 'varlen')
DECAY_RANK = 16
DECAY_NORMALISER = 16.0  # logsigmoid(.) / 16: per-token decays close to 1 (GLA's normaliser)


class LowRank(nnx.Module):
  """x [B, T, D] -> [B, T, H, head_dim] through `rank` dimensions, optionally with a bias."""

  def __init__(self, dims, rank, rngs, *, bias=False):
    d, h, hd = dims.d_model, dims.num_heads, dims.head_dim
    self.down = Einsum('btd,dr->btr', (d, rank), ('embed', 'sse_rank'), dims, rngs)
    self.up = Einsum('btr,rhk->bthk', (rank, h, hd), ('sse_rank', 'heads', 'head_dim'), dims, rngs)
    self.bias = param(rngs, (h, hd), ('heads', 'head_dim'), dtype=dims.weight_dtype,
                      value=jnp.zeros((h, hd))) if bias else None

  def __call__(self, x):
    y = self.up(self.down(x))
    return y if self.bias is None else y + self.bias[...].astype(y.dtype)


class Branches(typing.NamedTuple):
  """Kernel inputs of a token, all [B, T, H, head_dim]: feature-mapped queries and keys of
  the shared (1) and partition (2) branches, values, float32 log decays."""
  q1: jax.Array
  k1: jax.Array
  g1: jax.Array
  q2: jax.Array
  k2: jax.Array
  g2: jax.Array
  v: jax.Array


@register('sse')
class SparseStateExpansion(Mechanism):
  argument_meaning = ('number of state partitions', 4)
  rotary = False  # SSE layers use no RoPE: they read the projections before it
  extra_inputs = ('pre_rope', 'layer_input')  # decays, router, deltas and output gate come from the layer input
  placement = CUSTOM  # linear attention passes its state between sequence shards
  options_section = 'sse'  # model.attention.sse, docs/sse_attention.md
  OPTIONS = {
      'top_k': Option(2, 'partitions each token writes to and reads from (at most N)', lambda k: k >= 1,
                      'use a count >= 1'),
      'shared': Option(True, 'a shared state branch beside the partitions (off with sse:1: plain GLA)'),
      'delta_rank': Option(0, "rank of the partition branch's q/k deltas and of the output gate; 0: head_dim",
                           lambda r: r >= 0, 'use a rank >= 0 (0: head_dim)'),
      'mode': Option('mask', 'mask: each partition over the whole row, cost ~(1+N) GLA | varlen: packed, '
                     '~(1+top_k)', choices=MODES),
      'balance_weight': Option(0.01, 'weight of the router balance loss', lambda w: w >= 0, 'use a weight >= 0'),
  }

  @classmethod
  def validate_options(cls, options, model_cfg, arguments):
    """Own values; top_k against the partitions of every sse:N layer."""
    problem = super().validate_options(options, model_cfg, arguments)
    for partitions in sorted(set(arguments)):
      if problem is None and options.top_k > partitions:
        problem = (f'model.attention.sse.top_k={options.top_k} exceeds the {partitions} partitions of '
                   f'sse:{partitions}')
    return problem

  def __init__(self, dims, layer_index, rngs):
    super().__init__(dims, layer_index, rngs)
    s = self.options.sse
    d, n = dims.d_model, self.partitions
    rank = s.delta_rank or dims.head_dim
    self.group = dims.group_size
    self.top_k = s.top_k
    self.shared = s.shared
    self.mode = s.mode
    self.eps = dims.norm_eps
    self.router = Einsum('btd,dn->btn', (d, n), ('embed', 'sse_partitions'), dims, rngs)
    self.query_delta = LowRank(dims, rank, rngs)
    self.key_delta = LowRank(dims, rank, rngs)
    self.partition_decay = LowRank(dims, DECAY_RANK, rngs, bias=True)
    self.shared_decay = LowRank(dims, DECAY_RANK, rngs, bias=True) if s.shared else None
    self.output_gate = LowRank(dims, rank, rngs)
    self.norm_scale = param(rngs, (dims.head_dim,), ('head_dim',), dtype=dims.weight_dtype,
                            value=jnp.ones((dims.head_dim,)))

  @property
  def partitions(self):
    return self.argument

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    """Chunked gated linear attention per branch and head: a state read and write of
    head_dim x head_dim each, plus causal attention inside a chunk. The branches a token
    costs: the shared one and top_k partitions in varlen mode, all N in mask mode."""
    s, d = options.sse, dims.head_dim
    branches = int(s.shared) + (s.top_k if s.mode == 'varlen' else argument)
    per_branch = 4 * d * d + softmax_flops(1, d, mean_causal_keys(min(LINEAR_CHUNK, seq_len)))
    return dims.num_heads * branches * per_branch

  def forward(self, q, k, v, ctx, pre_rope, layer_input):
    return self.sharded_forward(None, q, k, v, ctx, pre_rope, layer_input)

  def sharded_forward(self, placement, q, k, v, ctx, pre_rope, layer_input):
    del q, k  # None: SSE reads the projections before RoPE
    branches = self.branches(*pre_rope, v, layer_input)
    probs, mask = self.route(layer_input)
    if placement is not None:
      o = self.attention_per_device(branches, probs, mask, ctx.segment_ids, placement)
    elif self.mode == 'varlen':
      o = self.varlen_attention(branches, probs, mask, ctx.segment_ids)
    else:
      o, _ = self.mask_attention(branches, probs, mask, ctx.segment_ids)
    # Router statistics come from the whole batch's probabilities: the same on any mesh.
    return self.output(o, layer_input), self.router_aux(probs, mask, ctx.segment_ids)

  # --------------------------------------------------------------------------------------
  # per-token inputs

  def branches(self, q_pre, k_pre, v, x):
    """Branches of pre-RoPE q [B, T, H, d], k and v [B, T, Hkv, d], layer input x [B, T, D]."""
    k_pre, v = (jnp.repeat(a, self.group, axis=2) for a in (k_pre, v))
    partition_decay = self.log_decay(self.partition_decay, x)
    shared_decay = partition_decay if self.shared_decay is None else self.log_decay(self.shared_decay, x)
    return Branches(
        q1=jax.nn.silu(q_pre), k1=jax.nn.softmax(k_pre, axis=-1), g1=shared_decay,
        q2=jax.nn.silu(q_pre + self.query_delta(x)), k2=jax.nn.softmax(k_pre + self.key_delta(x), axis=-1),
        g2=partition_decay, v=jax.nn.silu(v))

  @staticmethod
  def log_decay(projection, x):
    return jax.nn.log_sigmoid(projection(x).astype(jnp.float32)) / DECAY_NORMALISER

  def route(self, x):
    """(probabilities [B, T, N] float32, chosen mask [B, T, N] bool)."""
    probs = jax.nn.softmax(self.router(x).astype(jnp.float32), axis=-1)
    return probs, router_lib.top_k_mask(jax.lax.stop_gradient(probs), self.top_k)

  def router_aux(self, probs, mask, segment_ids):
    weights = token_weights(segment_ids, *probs.shape[:2])
    aux = no_aux()
    aux['losses']['sse_balance'] = self.options.sse.balance_weight * router_lib.balance_loss(
        probs, mask, weights, self.top_k)
    write_fraction = router_lib.balance_terms(probs, mask, weights)[1]
    for i in range(self.partitions):
      aux['stats'][f'sse_load{i}'] = write_fraction[i] / self.top_k
    return aux

  # --------------------------------------------------------------------------------------
  # the two training modes

  def mask_heads(self, branches, probs, mask):
    """Kernel inputs (q, k, v, g) [B, T, (1 + N) H or N H, d]: the shared heads first, then
    partition i's heads, with key 0 and log decay 0 exactly where i is not chosen."""
    b, t, h, d = branches.q2.shape
    gate = jnp.where(mask, probs, 0.0)[..., None, None]  # [B, T, N, 1, 1] write/read gate
    chosen = mask[..., None, None]
    dtype = branches.q2.dtype

    def expand(x, gated):
      x = x[:, :, None]
      x = (gate * x).astype(dtype) if gated else jnp.broadcast_to(x, (b, t, self.partitions, h, d))
      return x.reshape(b, t, self.partitions * h, d)

    q, k, v = expand(branches.q2, True), expand(branches.k2, True), expand(branches.v, False)
    g = jnp.where(chosen, branches.g2[:, :, None], 0.0).reshape(b, t, self.partitions * h, d)
    if self.shared:
      q, k, v, g = (jnp.concatenate([a, c.astype(a.dtype)], axis=2) for a, c in
                    ((branches.q1, q), (branches.k1, k), (branches.v, v), (branches.g1, g)))
    return q, k, v, g

  def mask_attention(self, branches, probs, mask, segment_ids, initial_state=None):
    """(o [B, T, H, d] float32 summed over the branches, final state [B, (1 + N) H or N H, d, d])."""
    q, k, v, g = self.mask_heads(branches, probs, mask)
    o, final_state = gated_linear_attention(q, k, v, g, scale=self.scale(q), initial_state=initial_state,
                                            segment_ids=segment_ids, return_final_state=True)
    return self.sum_branches(o, branches.q2.shape[2]), final_state

  @staticmethod
  def sum_branches(o, heads):
    """[B, T, (1 + N) H or N H, d] -> [B, T, H, d] float32."""
    b, t, _, d = o.shape
    return o.astype(jnp.float32).reshape(b, t, -1, heads, d).sum(axis=2)

  def attention_per_device(self, branches, probs, mask, segment_ids, placement):
    """o [B, T, H, d] float32, each device on its rows, heads and sequence shard; the mask
    mode's states pass between sequence shards (context_parallel_linear.py). The varlen
    mode packs each partition's tokens across the whole row, so under a split sequence
    it runs as the mask mode (the same function, ~(1 + N) x GLA cost)."""
    length_axes = context_parallel.axis_names(placement.spec('length')[0])
    shards = context_parallel.sequence_shards(placement)
    varlen = self.mode == 'varlen'
    if varlen and shards > 1:
      context_parallel.warn_once('sse varlen', 'context parallelism: sse.mode=varlen runs as sse.mode=mask where '
                                 'the sequence is split (config.mesh.sequence > 1)')

    def body(branches, probs, mask, segment_ids):
      if varlen and shards == 1:
        return self.varlen_attention(branches, probs, mask, segment_ids)
      q, k, v, g = self.mask_heads(branches, probs, mask)
      o = context_parallel_linear.linear_attention_across_shards(q, k, v, g, segment_ids, scale=self.scale(q),
                                                                 axes=length_axes, shards=shards)
      return self.sum_branches(o, branches.q2.shape[2])

    tokens = 'batch length heads .'
    names = (Branches(*[tokens] * len(Branches._fields)), 'batch length .', 'batch length .',
             None if segment_ids is None else 'batch length')
    return context_parallel.per_device(body, (branches, probs, mask, segment_ids), names, tokens,
                                       placement=placement, split_length=True)

  def varlen_attention(self, branches, probs, mask, segment_ids):
    """o [B, T, H, d] float32: the shared row and the partition-packed row, one kernel call."""
    b, t, h, d = branches.q2.shape
    k = self.top_k
    runs = router_lib.document_runs(segment_ids, b, t)
    chosen = router_lib.chosen_partitions(mask, k)  # [B, T, k]
    packing = router_lib.pack_by_partition(chosen, runs)
    pair_probs = jnp.take_along_axis(probs, chosen, axis=-1).reshape(b, t * k)
    weight = jnp.take_along_axis(pair_probs, packing.pair, axis=1)[..., None, None]
    gather = lambda x: router_lib.gather_tokens(x, packing.token)  # noqa: E731
    q = (weight * gather(branches.q2)).astype(branches.q2.dtype)
    keys = (weight * gather(branches.k2)).astype(branches.k2.dtype)
    v, g = gather(branches.v), gather(branches.g2)
    packed_ids = packing.segment_ids
    if self.shared:
      q, keys, v, g = (jnp.concatenate([a, c.astype(a.dtype)], axis=1) for a, c in
                       ((branches.q1, q), (branches.k1, keys), (branches.v, v), (branches.g1, g)))
      packed_ids = jnp.concatenate([runs, packed_ids + runs[:, -1:] + 1], axis=1)
    o = gated_linear_attention(q, keys, v, g, scale=self.scale(q), segment_ids=packed_ids).astype(jnp.float32)
    o_shared, o_packed = (o[:, :t], o[:, t:]) if self.shared else (0.0, o)
    per_pair = router_lib.gather_tokens(o_packed, packing.slot).reshape(b, t, k, h, d)
    return o_shared + per_pair.sum(axis=2)

  @staticmethod
  def scale(q):
    return q.shape[-1] ** -0.5

  def output(self, o, x):
    """Gated RMSNorm per head of o [B, T, H, d] float32 -> compute dtype."""
    normed = o * jax.lax.rsqrt(jnp.mean(o * o, axis=-1, keepdims=True) + self.eps)
    gate = jax.nn.silu(self.output_gate(x).astype(jnp.float32))
    return (normed * self.norm_scale[...].astype(jnp.float32) * gate).astype(x.dtype)

  # --------------------------------------------------------------------------------------
  # decoding: 1 + N states per head

  def init_cache(self, batch, max_len, kv_heads, head_dim, dtype):
    """The zero state (float32, of a size independent of max_len)."""
    del max_len, kv_heads, head_dim, dtype
    return self.initial_state(batch)

  def prefill(self, q, k, v, ctx, cache, lengths, pre_rope, layer_input):
    """Each row's state after its own last prompt token (padding leaves it unchanged)."""
    del q, k, cache, lengths  # None (no RoPE); the state starts at zero; segment ids mark the padding
    return self.prefill_state(*pre_rope, v, layer_input, ctx.segment_ids)

  def decode(self, q, k, v, ctx, cache, pre_rope, layer_input):
    del q, k, ctx  # None (no RoPE); the state holds the position
    return self.decode_step(*pre_rope, v, layer_input, cache)

  def initial_state(self, batch, dtype=jnp.float32):
    """Zero decode state {'shared': [B, H, d, d] (with the shared branch), 'partitions': [B, N, H, d, d]}."""
    _, heads, head_dim = self.query_delta.up.kernel.shape
    state = {'partitions': jnp.zeros((batch, self.partitions, heads, head_dim, head_dim), dtype)}
    if self.shared:
      state['shared'] = jnp.zeros((batch, heads, head_dim, head_dim), dtype)
    return state

  def prefill_state(self, q_pre, k_pre, v, x, segment_ids=None):
    """(y, decode state after the last token that is not padding) of prompts, in mask mode
    (whose kernel call ends with every partition's state; the last document's)."""
    branches = self.branches(q_pre, k_pre, v, x)
    probs, mask = self.route(x)
    if segment_ids is not None:
      branches, segment_ids = without_padding(branches, segment_ids)
    o, final_state = self.mask_attention(branches, probs, mask, segment_ids)
    return self.output(o, x), self.unstacked_state(final_state, branches.q2.shape[2])

  def decode_step(self, q_pre, k_pre, v, x, state):
    """(y [B, 1, H, d], new state) of one token (q_pre [B, 1, H, d], k_pre, v [B, 1, Hkv, d],
    x [B, 1, D]): the recurrence of the kernel with the mask mode's inputs, so a partition
    not chosen keeps its state bit for bit (decay exp(0) = 1, key 0)."""
    q, k, v_all, g = (a[:, 0].astype(jnp.float32) for a in self.mask_heads(self.branches(q_pre, k_pre, v, x),
                                                                            *self.route(x)))
    states = self.stacked_state(state)
    states = jnp.exp(g)[..., None] * states + k[..., :, None] * v_all[..., None, :]
    o = self.scale(q) * jnp.einsum('bhd,bhdv->bhv', q, states, precision=jax.lax.Precision.HIGHEST)
    b, heads, d = o.shape
    h = q_pre.shape[2]
    o = o.reshape(b, heads // h, h, d).sum(axis=1)[:, None]
    return self.output(o, x), self.unstacked_state(states, h)

  def stacked_state(self, state):
    """[B, (1 + N) H or N H, d, d] in the mask mode's head order."""
    partitions = state['partitions']
    b, n, h, d, dv = partitions.shape
    stacked = partitions.astype(jnp.float32).reshape(b, n * h, d, dv)
    return jnp.concatenate([state['shared'].astype(jnp.float32), stacked], axis=1) if self.shared else stacked

  def unstacked_state(self, states, h):
    b, _, d, dv = states.shape
    state = {}
    if self.shared:
      state['shared'], states = states[:, :h], states[:, h:]
    state['partitions'] = states.reshape(b, self.partitions, h, d, dv)
    return state


def without_padding(branches, segment_ids):
  """Kernel inputs where padding (segment id 0) is an identity transition of every state
  (key 0, log decay 0) and does not start a segment (it takes the id of the last token
  before it that is not padding): the kernel's final state is then that of each row's
  last document after its last token, not a state of the padding."""
  padding = (segment_ids == 0)[:, :, None, None]
  kept = lambda a: jnp.where(padding, jnp.zeros((), a.dtype), a)  # noqa: E731
  index = jnp.arange(segment_ids.shape[1])
  last = jax.lax.cummax(jnp.where(segment_ids != 0, index, 0), axis=1)
  continued = jnp.take_along_axis(segment_ids, last, axis=1)
  return branches._replace(k1=kept(branches.k1), g1=kept(branches.g1), k2=kept(branches.k2),
                           g2=kept(branches.g2)), continued
