"""Block-sparse flash attention backward on Hopper in one kernel, with atomic dQ.

The kv-major walk of mosaic_gpu_backward's dK/dV kernel (per batch, kv head and kv block,
one merged list of the q blocks that every query head of the GQA group visits; the same
kernel body, with `fused=True`), which also produces dQ: each step's dS, already in
registers for dK, goes to SMEM, one more wgmma gives that step's dQ contribution dS^T K,
and a TMA store with reduce-add adds it to a float32 dQ accumulator in GMEM. P and dS are computed once instead of twice (five
matmuls per tile instead of seven), at the price of a dQ whose float32 sums are added in
whatever order the blocks finish: not bitwise reproducible, as cuDNN's and
FlashAttention-3's backward. mosaic_gpu_backward.backward, the deterministic path, keeps
the two kernels.

Queries stream in 64-row chunks (one wgmma M) whatever the plan's block_q: a 128-row q
block is two pipeline steps. That keeps the SMEM of head_dim 128 within Hopper's 227 KiB:
two stages of q and dO chunks (64 KiB), K and V of the kv block (64 KiB), the dS tiles
(16 KiB) and the float32 dQ staging tiles (64 KiB).
"""

import jax
import jax.numpy as jnp

from pallas_kernels.block_sparse_attention import mosaic_gpu_backward as two_kernel
from pallas_kernels.mosaic_gpu_interpret import allow_tma_reduce_add


def backward(q, k, v, key_bias, plan, scale, out, lse, d_out, d_lse, *, interpret=False, stages=2):
  """(dq, dk, dv, d_key_bias or None), as reference.backward; dq's float32 sums are added
  atomically, in no fixed order."""
  reason = two_kernel.unavailable(q, k, v, key_bias, plan)
  if reason:
    raise ValueError(reason)
  if interpret:
    allow_tma_reduce_add()
  b, _, h, d = q.shape
  operands = two_kernel._prepare(q, k, v, key_bias, plan, out, lse, d_out, d_lse)
  dq_acc = jax.new_ref(jnp.zeros(operands['q'].shape, jnp.float32))
  dk, dv, *d_bias = two_kernel._dkv(operands, plan, scale, (b, h, k.shape[2], d, q.dtype), stages, interpret,
                                    dq_acc=dq_acc)
  dq = (dq_acc[...] * scale).astype(q.dtype)
  return two_kernel.unpad_gradients(q, k, v, key_bias, dq, dk, dv, d_bias)
