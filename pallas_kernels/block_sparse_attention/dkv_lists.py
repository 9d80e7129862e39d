"""The Hopper backward's query-block lists: padded for the pipeline, merged over a GQA
group for the kv-major dK/dV kernel, and the rule that cuts long dK/dV lists into parts
(mosaic_gpu_backward.py)."""

import jax.numpy as jnp

from pallas_kernels.block_sparse_attention.plan import stable_partition


def pad_steps(x, steps):
  """Lists [..., n] padded to at least `steps` slots by repeating the last, so that
  pipeline steps past the list (there are at least `steps`) read valid indices."""
  n = x.shape[-1]
  if n >= steps:
    return x
  return jnp.concatenate([x, jnp.repeat(x[..., -1:], steps - n, axis=-1)], axis=-1)


def group_lists(plan, num_heads, num_kv_heads, steps):
  """Per (batch, kv head, kv block): the q blocks to visit for every query head of the
  group, as entries g * nQ + q_block (g: head within the group), active first, with
  their full flags and count."""
  group = num_heads // num_kv_heads
  expand = lambda x: jnp.repeat(x, num_heads // plan.plan_heads, axis=1)
  b, nk, nq = plan.q_count.shape[0], plan.num_kv_blocks, plan.num_q_blocks
  count = expand(plan.q_count).reshape(b, num_kv_heads, group, nk)
  index = expand(plan.q_index).astype(jnp.int32).reshape(b, num_kv_heads, group, nk, nq)
  full = expand(plan.q_full).astype(jnp.int32).reshape(b, num_kv_heads, group, nk, nq)
  if group == 1:
    return count[:, :, 0], pad_steps(index[:, :, 0], steps), pad_steps(full[:, :, 0], steps)
  entries = (index + (jnp.arange(group) * nq)[:, None, None]).transpose(0, 1, 3, 2, 4).reshape(b, num_kv_heads, nk, -1)
  full = full.transpose(0, 1, 3, 2, 4).reshape(entries.shape)
  active = (jnp.arange(nq) < count.transpose(0, 1, 3, 2)[..., None]).reshape(entries.shape)
  total = active.sum(-1).astype(jnp.int32)
  entries, full = stable_partition(active, entries, full)
  last = jnp.take_along_axis(entries, jnp.maximum(total - 1, 0)[..., None], -1)
  inactive = jnp.arange(entries.shape[-1]) >= total[..., None]
  entries = jnp.where(inactive, last, entries)
  full = jnp.where(inactive, 0, full)
  return total, pad_steps(entries, steps), pad_steps(full, steps)


def dkv_splits(num_programs, list_length, fused=False, spanned=False):
  """Parts to cut each dK/dV list into (list_length: the lists' static capacity). Two
  cases are cut:
  - few programs: enough parts for about PROGRAMS_WANTED programs, each of at least
    MIN_PART_STEPS entries. NSA's compression branch makes these (32k queries against 2k
    compressed keys: 16 kv blocks per kv head, each walked by 16 query heads over up to
    256 q blocks);
  - lists that can hold LONG_LIST_ENTRIES or more under a mask with no key span
    (`spanned` False): LONG_LIST_PARTS parts. Block selection keeps every query block's
    first kv block, so that block's list holds every q block of every head of the group
    (NSA at 64k: 16 heads x 1024) against about 256 entries in the others, and its program
    walks it alone after the rest are done. On an H100, four parts cut NSA's dK/dV kernel at
    64k from 46.3 to 37.7 ms (sixteen: 38.2 ms; docs/benchmarks.md).
  A list shorter than its parts leaves some programs empty; a mask with a key span
  (windows) keeps its lists short, so they are not cut."""
  if fused:
    return 1
  if num_programs < PROGRAMS_WANTED // 2:
    return max(1, min(-(-PROGRAMS_WANTED // num_programs), list_length // MIN_PART_STEPS))
  if not spanned and list_length >= LONG_LIST_ENTRIES:
    return LONG_LIST_PARTS
  return 1


PROGRAMS_WANTED = 4 * 132  # four waves of an H100/H200's 132 SMs
MIN_PART_STEPS = 32
LONG_LIST_ENTRIES = 4096
LONG_LIST_PARTS = 4
