"""SeerAttention: a learned gate per layer picks the key blocks of each query block
(Gao et al., arXiv 2410.13276; research/mechanisms.md section 3).

The gate (gate.py) scores block pairs from pooled pre-RoPE queries and keys; the
top-scoring blocks (`gate.selection=topk` at `gate.density` of the causal blocks, the
paper's nz_ratio rule) or those whose softmax score passes `gate.threshold` form a plan
per query head, with the diagonal block and the first block of the document always
kept, and the block-sparse kernels attend over it.

Training (`model.attention.gate`, see sparseformer/config.py):
  forward=dense   the output comes from the layer's dense causal attention, so the model
                  behaves as its base (distillation of gates on a frozen checkpoint);
  forward=sparse  the output comes from the gated plan (joint training with the LM loss);
  distill         computes the teacher (the block max-pooled map of the dense attention,
                  from a dense pass's LSE and a second pass over key blocks) and adds
                  loss_scale x KL(teacher || softmax(scores)) as aux['losses']['gate_kl'].
Evaluation uses `gate.eval_forward` (sparse by default) at `gate.density`.

The gate reads its inputs under stop_gradient: the KL trains the gate only, the LM loss
trains the rest (it cannot reach the gate through a discrete block choice).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from pallas_kernels.block_sparse_attention import block_sparse_attention, masks, plan_from_block_mask, plan_from_mask
from sparseformer.model import rope
from sparseformer.model.attention import context_parallel
from sparseformer.model.attention import gate as gate_lib
from sparseformer.model.attention.base import Mechanism, no_aux, register, softmax_flops
from sparseformer.model.layers import param

FORWARDS = ('sparse', 'dense')
SELECTIONS = ('topk', 'threshold')


def gate_config_problem(g):
  """The message for bad `model.attention.gate` values, or None."""
  for name, pools in (('q_pools', g.q_pools), ('k_pools', g.k_pools)):
    if not pools or any(p not in gate_lib.POOLS for p in pools) or len(set(pools)) != len(pools):
      return f'model.attention.gate.{name}={tuple(pools)!r}: use distinct names from {", ".join(gate_lib.POOLS)}'
  checks = [
      (g.width > 0 and g.width % 2 == 0, f'gate.width={g.width}: use a positive even width (RoPE pairs dims)'),
      (g.selection in SELECTIONS, f'gate.selection={g.selection!r}: use {" or ".join(SELECTIONS)}'),
      (0 < g.density <= 1, f'gate.density={g.density}: use a fraction in (0, 1]'),
      (0 < g.threshold < 1, f'gate.threshold={g.threshold}: use a probability in (0, 1)'),
      (g.forward in FORWARDS, f'gate.forward={g.forward!r}: use {" or ".join(FORWARDS)}'),
      (g.eval_forward in FORWARDS, f'gate.eval_forward={g.eval_forward!r}: use {" or ".join(FORWARDS)}'),
      (0 <= g.loss_slice < 1, f'gate.loss_slice={g.loss_slice}: use a fraction in [0, 1)'),
      (g.loss_scale >= 0, f'gate.loss_scale={g.loss_scale}: use a value >= 0'),
  ]
  for ok, message in checks:
    if not ok:
      return 'model.attention.' + message
  return None


class BlockGate(nnx.Module):
  """The gate's parameters and its prefill and incremental scoring."""

  def __init__(self, dims, rngs):
    g = dims.attention.gate
    d, heads, kv_heads = dims.head_dim, dims.num_heads, dims.num_kv_heads
    self.q_pools, self.k_pools = tuple(g.q_pools), tuple(g.k_pools)
    self.block = dims.attention.block_size
    self.num_heads = heads
    self.rope_cfg = dims.rope
    width = g.width
    # The paper's rule: one query pool at the head width needs no query map; keys are then
    # mapped per query head (GQA keys repeated first).
    maps_queries = len(self.q_pools) != 1 or width != d
    q_in = d * len(self.q_pools)
    self.query = param(rngs, (heads, q_in, width), ('heads', 'gate_in', 'gate_width'), dtype=dims.weight_dtype,
                       std=q_in ** -0.5) if maps_queries else None
    key_heads, key_axis = (kv_heads, 'kv_heads') if maps_queries else (heads, 'heads')
    k_in = d * len(self.k_pools)
    self.key = param(rngs, (key_heads, k_in, width), (key_axis, 'gate_in', 'gate_width'), dtype=dims.weight_dtype,
                     std=k_in ** -0.5)
    self.width = width

  def frequencies(self):
    return rope.inverse_frequencies(self.width, self.rope_cfg)[0]

  def query_weight(self):
    return None if self.query is None else self.query[...]

  def scores(self, q_pre, k_pre, docs):
    """S [B, H, nb, nb] float32 of pre-RoPE q [B, T, H, d], k [B, T, Hkv, d]."""
    q_pre, k_pre = jax.lax.stop_gradient(q_pre), jax.lax.stop_gradient(k_pre)
    inv_freq = self.frequencies()
    queries = gate_lib.gate_queries(q_pre, docs.query_tokens, self.q_pools, self.query_weight(), 0, inv_freq)
    keys = gate_lib.gate_keys(k_pre, docs.key_tokens, self.k_pools, self.key[...], 0, inv_freq, self.num_heads)
    return gate_lib.block_scores(queries, keys, docs.allowed)

  def key_entry(self, k_pre_block, block_index):
    """The cache entry [B, 1, Hg, dg] of key block `block_index` from its tokens
    [B, n <= block, Hkv, d] (a partial last block is pooled over the tokens it has)."""
    tokens = self._block_tokens(k_pre_block)
    return gate_lib.gate_keys(k_pre_block, tokens, self.k_pools, self.key[...], block_index, self.frequencies(),
                              self.num_heads)

  def query_row(self, q_pre_block, block_index, key_cache):
    """Scores [B, H, 1, I + 1] of query block I = `block_index` (tokens [B, n, H, d])
    against the cached key blocks [B, I + 1, Hg, dg]: row I of the prefill scores."""
    tokens = self._block_tokens(q_pre_block)
    queries = gate_lib.gate_queries(q_pre_block, tokens, self.q_pools, self.query_weight(), block_index,
                                    self.frequencies())
    allowed = jnp.ones((q_pre_block.shape[0], 1, key_cache.shape[1]), bool)
    return gate_lib.block_scores(queries, key_cache, allowed)

  def _block_tokens(self, x):
    present = jnp.arange(self.block) < x.shape[1]
    return jnp.broadcast_to(present, (x.shape[0], 1, self.block))


@register('gated')
class GatedAttention(Mechanism):
  needs_pre_rope = True  # the layer passes pre_rope=(q, k) before rotation

  def __init__(self, dims, layer_index, rngs):
    super().__init__(dims, layer_index, rngs)
    self.block_gate = BlockGate(dims, rngs)

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    """The kept blocks (topk: `density` of the causal blocks; threshold: taken as the same
    density, the measured one is logged as gate_density) plus the block gate's scores."""
    g, block = options.gate, options.block_size
    blocks = -(-seq_len // block)
    keys = min(seq_len, g.density * blocks * (blocks + 1) / 2 * block * block / seq_len)
    gate = 2 * g.width * blocks / block * blocks / 2  # one dg-wide score per causal block pair, per q token
    return softmax_flops(dims.num_heads, dims.head_dim, keys) + dims.num_heads * gate

  def __call__(self, q, k, v, ctx, pre_rope=None):
    if pre_rope is None:
      raise ValueError('the gated mechanism needs the pre-RoPE projections: call it with pre_rope=(q, k)')
    g = self.options.gate
    scale = ctx.logit_scale / q.shape[-1] ** 0.5
    forward = g.forward if ctx.training else g.eval_forward
    distill = ctx.training and g.distill
    docs = gate_lib.block_documents(ctx.segment_ids, q.shape[1], self.options.block_size, q.shape[0])
    scores = self.block_gate.scores(*pre_rope, docs)
    chosen = self.select(scores, docs)
    aux = no_aux()
    aux['stats']['gate_density'] = chosen.sum() / (docs.allowed.sum() * q.shape[2])
    if forward == 'dense' or distill:
      # With a sparse output the dense pass only gives the teacher its LSE: no gradient.
      inputs = (q, k, v) if forward == 'dense' else jax.lax.stop_gradient((q, k, v))
      dense_y, lse = self.dense_attention(*inputs, ctx, scale)
    y = dense_y if forward == 'dense' else self.sparse_attention(q, k, v, chosen, ctx, scale)
    if distill:
      teacher = gate_lib.teacher_block_map(*jax.lax.stop_gradient((q, k, lse)), scale, self.options.block_size,
                                           ctx.segment_ids)
      aux['losses']['gate_kl'] = g.loss_scale * gate_lib.gate_kl(teacher, scores, g.loss_slice)
      aux['stats']['gate_recall'] = gate_lib.teacher_recall(teacher, chosen)
    return y, aux

  def select(self, scores, docs):
    g = self.options.gate
    if g.selection == 'threshold':
      return gate_lib.select_threshold(scores, docs, g.threshold)
    return gate_lib.select_topk(scores, docs, gate_lib.topk_blocks_per_row(g.density, scores.shape[-2]))

  def sparse_attention(self, q, k, v, chosen, ctx, scale):
    """Attention over the chosen blocks [B, H, nb, nb] (a plan per query head)."""
    block = self.options.block_size

    def attend(q, k, v, chosen, segment_ids):
      plan = plan_from_block_mask(chosen, q_len=q.shape[1], block_q=block, block_kv=block, segment_ids=segment_ids)
      return block_sparse_attention(q, k, v, plan, scale=scale)

    names = context_parallel.QKV_NAMES + ('batch heads . .', context_parallel.row_names(ctx.segment_ids))
    return context_parallel.per_row_and_head('gated', attend, (q, k, v, chosen, ctx.segment_ids), names,
                                             context_parallel.Q_NAMES)

  def dense_attention(self, q, k, v, ctx, scale):
    """(output, LSE [B, H, T]) of causal attention within documents."""
    block = self.options.block_size

    def attend(q, k, v, segment_ids):
      plan = plan_from_mask(masks.Causal(), q_len=q.shape[1], block_q=block, block_kv=block, segment_ids=segment_ids)
      return block_sparse_attention(q, k, v, plan, scale=scale, return_lse=True)

    names = context_parallel.QKV_NAMES + (context_parallel.row_names(ctx.segment_ids),)
    return context_parallel.per_row_and_head('gated', attend, (q, k, v, ctx.segment_ids), names,
                                             (context_parallel.Q_NAMES, 'batch heads .'))
