"""Helpers shared by the Mosaic GPU (Hopper) forward and backward kernels.

Kernels work on whole blocks: the wrappers pad q/k/v, key_bias and segment ids to
multiples of the plan's blocks (the plan already marks ragged blocks partial and its
element mask cuts k >= kv_len and q >= q_len), then slice the outputs back.
"""

import jax
import jax.numpy as jnp
from jax import lax

WARPGROUP_ROWS = 64  # rows of one wgmma M tile: one compute warpgroup's share of a q block
SMEM_BUDGET_BYTES = 200 * 1024  # of H100's 227 KiB, leaving room for barriers and reductions
Q_SEGMENT_PAD = -1  # pad values that never match each other (element_mask also cuts padding)
KV_SEGMENT_PAD = -2
H100_SMS = 132


def pad_axis(x, axis, multiple, value=0):
  """Pads `axis` of x at the end up to a multiple of `multiple`."""
  length = x.shape[axis]
  extra = -length % multiple
  if not extra:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=value)


def padded_inputs(q, k, v, key_bias, plan):
  """(q, k, v, key_bias, q_segment_ids, kv_segment_ids) padded to whole plan blocks."""
  q = pad_axis(q, 1, plan.block_q)
  k = pad_axis(k, 1, plan.block_kv)
  v = pad_axis(v, 1, plan.block_kv)
  if key_bias is not None:
    key_bias = pad_axis(key_bias.astype(jnp.float32), 2, plan.block_kv)
  q_seg = kv_seg = None
  if plan.q_segment_ids is not None:
    q_seg = pad_axis(plan.q_segment_ids.astype(jnp.int32), 1, plan.block_q, Q_SEGMENT_PAD)
    kv_seg = pad_axis(plan.kv_segment_ids.astype(jnp.int32), 1, plan.block_kv, KV_SEGMENT_PAD)
  return q, k, v, key_bias, q_seg, kv_seg


def packed_steps(index, full):
  """One int32 scalar per list slot, index * 2 + full: a kernel reads one word per step."""
  return index.astype(jnp.int32) * 2 + full.astype(jnp.int32)


def unpack_step(packed):
  """(kv block index, is full) of a packed_steps scalar."""
  return lax.shift_right_logical(packed, 1), lax.bitwise_and(packed, 1) == 1


def group_of(head, num_heads, num_groups):
  """The kv head or plan head a query head reads: head // (num_heads // num_groups)."""
  return lax.div(head, jnp.int32(num_heads // num_groups))


def is_hopper_gpu():
  """True when the default device is an sm90 GPU."""
  try:
    device = jax.devices()[0]
  except RuntimeError:
    return False
  return device.platform == 'gpu' and getattr(device, 'compute_capability', '') == '9.0'


def sm_count():
  """Streaming multiprocessors of the default GPU (H100 SXM's 132 elsewhere, e.g. when
  lowering for CUDA on a CPU host)."""
  device = jax.devices()[0]
  return getattr(device, 'core_count', None) if device.platform == 'gpu' else H100_SMS


def common_unavailable(q, k, v, key_bias, plan, interpret):
  """Reasons shared by forward and backward, or None."""
  if q.dtype not in (jnp.bfloat16, jnp.float16) or k.dtype != q.dtype or v.dtype != q.dtype:
    return f'q, k, v must all be bfloat16 or float16, got {q.dtype}, {k.dtype}, {v.dtype}'
  head_dim = q.shape[-1]
  if head_dim % 64 or head_dim > 256:
    return f'head_dim must be 64, 128, 192 or 256, got {head_dim}'
  if not interpret and not is_hopper_gpu():
    return 'needs an sm90 (Hopper) GPU'
  return None


def rank_rule_unavailable(q, k, plan):
  """Why the kernels cannot apply this plan's rank rule, or None. The dK/dV kernel holds
  one rank row per kv block, so every query head of a GQA group must share its plan head."""
  if plan.has_rank_rule and plan.plan_heads not in (1, k.shape[2]):
    return (f'the rank rule needs 1 or Hkv = {k.shape[2]} plan heads, got {plan.plan_heads} '
            '(one rank row per kv head)')
  return None


def padded_ranks(plan):
  """{'q_threshold': [B, Hp, Tq'], 'key_rank': [B, Hp, Tk']} int32, padded to whole blocks
  (padded keys rank -1; the element mask cuts padding anyway)."""
  return dict(q_threshold=pad_axis(plan.q_threshold.astype(jnp.int32), 2, plan.block_q),
              key_rank=pad_axis(plan.key_rank.astype(jnp.int32), 2, plan.block_kv, -1))
