"""FlexAttention's side of benchmarks/attention.py: our plan as a BlockMask, the element rules
as mask_mods, torch timing and samples. torch is imported only by the callers that run it."""

import functools

import numpy as np

from pallas_kernels.block_sparse_attention.render import grid_neighborhood_argument, neighborhood_argument


def flex_block_lists(plan):
  """Our q-major lists split the way FlexAttention wants them: (partial count, partial
  indices, full count, full indices), int32 numpy, [B, Hp, nQ] and [B, Hp, nQ, nK]."""
  count = np.asarray(plan.kv_count)
  index = np.asarray(plan.kv_index).astype(np.int32)
  full = np.asarray(plan.kv_full).astype(bool)
  active = np.arange(index.shape[-1]) < count[..., None]

  def gather(selected):
    order = np.argsort(~selected, axis=-1, kind='stable')  # the selected slots first, in order
    return selected.sum(-1).astype(np.int32), np.ascontiguousarray(np.take_along_axis(index, order, -1))

  return gather(active & ~full) + gather(active & full)


@functools.cache  # one function per spec: a new one would make torch.compile compile again
def flex_mask_mod(spec):
  name, _, argument = spec.partition(':')
  if name == 'causal_window':
    window = int(argument)
    return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < window)
  if name == 'chunked':
    size = int(argument)
    return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx // size == kv_idx // size)
  if name in ('causal', 'random', 'topk', 'power_blocks', 'bigbird'):  # block patterns: tiles full but the diagonal
    return causal_mask_mod
  if name in PATTERN_MASK_MODS:
    rule = PATTERN_MASK_MODS[name](argument)
    return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & rule(q_idx, kv_idx)
  return lambda b, h, q_idx, kv_idx: q_idx >= 0


def radial_rule(frame):
  """Radial Attention's element rule (patterns.Radial) on torch index tensors."""
  import torch

  def rule(q_idx, kv_idx):
    distance = (q_idx // frame - kv_idx // frame).abs()
    power = torch.bitwise_left_shift(torch.ones_like(distance),
                                     torch.floor(torch.log2(distance.clamp(min=1).float())).to(distance.dtype))
    offset = (q_idx % frame - kv_idx % frame).abs()
    near = (power <= frame) & ((offset + 1) * power <= frame)
    far = (power > frame) & (offset == 0) & (distance % ((power + frame - 1) // frame) == 0)
    return near | far
  return rule


# The static patterns of render.PATTERN_SPECS (their default options), element rules on
# torch index tensors, causality added by flex_mask_mod.
def neighborhood_rule(argument):
  """The causal (dilated) neighborhood: same group (q - k divisible by D), at most K - 1
  places back in it."""
  kernel, dilation = neighborhood_argument(argument)
  return lambda q, k: ((q - k) % dilation == 0) & ((q - k) // dilation < kernel)


def grid_neighborhood_rule(rank):
  """The causal neighborhood on a grid (patterns.NeighborhoodGrid, the outer axis without
  end, raster order): the K x K (x K) window centred on the query's coordinates, shifted
  at the grid's edges (not at the outer axis's far end, which never comes)."""
  def rule(argument):
    kernel, inner = grid_neighborhood_argument(argument, rank)
    half = kernel // 2

    def near(i, j, edge):  # NA's 1-D rule, dilation 1: lo = clamp(i - K // 2, 0, edge - K)
      lo = (i - half).clamp(min=0) if edge is None else (i - half).clamp(min=0, max=edge - kernel)
      return (j >= lo) & (j < lo + kernel)

    def visible(q, k):
      seen = None
      for size in reversed(inner):
        axis = near(q % size, k % size, size)
        seen = axis if seen is None else seen & axis
        q, k = q // size, k // size
      return seen & near(q, k, None)
    return visible
  return rule


PATTERN_MASK_MODS = {
    'power': lambda local: lambda q, k: ((q - k) < int(local)) | (((q - k) & (q - k - 1)) == 0),
    'neighborhood': neighborhood_rule,
    'fixed': lambda s: lambda q, k: (q // int(s) == k // int(s)) | (k % int(s) >= int(s) - min(8, int(s))),
    'radial': lambda frame: radial_rule(int(frame)),
    'neighborhood2d': grid_neighborhood_rule(2),
    'neighborhood3d': grid_neighborhood_rule(3),
}


def causal_mask_mod(b, h, q_idx, kv_idx):
  return q_idx >= kv_idx


def flex_block_mask(torch, plan, spec, heads):
  """The BlockMask of our plan. Its head axis is indexed by query head (mod its size), so it
  must be 1 or H: Hkv plan heads are repeated, query head h reading plan head h // (H / Hp)."""
  from torch.nn.attention.flex_attention import BlockMask
  repeat = 1 if plan.plan_heads == 1 else heads // plan.plan_heads
  lists = [torch.from_numpy(np.repeat(x, repeat, axis=1)).cuda() for x in flex_block_lists(plan)]
  return BlockMask.from_kv_blocks(*lists, BLOCK_SIZE=(plan.block_q, plan.block_kv), mask_mod=flex_mask_mod(spec),
                                  seq_lengths=(plan.q_len, plan.kv_len))


def to_torch(torch, x):
  """[B, S, H, D] JAX bf16 -> [B, H, S, D] torch bf16 on the GPU (through float32 numpy)."""
  return torch.from_numpy(np.asarray(x, np.float32)).cuda().to(torch.bfloat16).transpose(1, 2).contiguous()


def measure_torch(torch, fn, iterations):
  for _ in range(3):
    result = fn()
  torch.cuda.synchronize()
  start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
  start.record()
  for _ in range(iterations):
    fn()
  end.record()
  torch.cuda.synchronize()
  return start.elapsed_time(end) / iterations, result


def torch_samples(torch, result, direction, rows):
  index = torch.as_tensor(rows, device='cuda')
  pick = lambda x: x.transpose(1, 2).index_select(1, index).float().cpu().numpy()  # back to [B, R, H, D]
  if direction == 'fwd':
    return {'out': pick(result)}
  return {name: pick(x) for name, x in zip(('dq', 'dk', 'dv'), result)}


def load_flex(args):
  """(torch, compiled flex_attention), or (None, the reason it cannot run)."""
  if not args.flex:
    return None, 'FlexAttention left out (--no-flex)'
  try:
    import torch
    from torch.nn.attention.flex_attention import flex_attention
  except ImportError as error:
    return None, f'FlexAttention skipped: torch is not importable ({error})'
  if not torch.cuda.is_available():
    return None, 'FlexAttention skipped: torch sees no CUDA device'
  # Each (length, mask function, grad mode) is a compiled entry; past the limit torch would
  # silently run flex_attention eagerly, which materialises S x S scores.
  for limit in ('recompile_limit', 'cache_size_limit'):
    if hasattr(torch._dynamo.config, limit):
      setattr(torch._dynamo.config, limit, 64)
  return torch, torch.compile(flex_attention, dynamic=False)
