"""Block-sparse attention against cuDNN and FlexAttention, on the GPU machine.

    python3 benchmarks/attention.py --out attention.json                 # ours = mosaic_gpu
    python3 benchmarks/attention.py --implementations none               # baselines only
    python3 benchmarks/attention.py --quick                              # CPU smoke run

bf16, B=1, H=16, D=128 (no GQA), S in {8192, 32768}, forward and forward+backward, on
three plans: dense causal, a causal window of 1024 keys (the query included), and a
random 10% of the blocks below the diagonal plus the diagonal, drawn per head (seeded;
plan_from_block_mask with 16 plan heads). --masks takes any spec of
render.plan_from_spec, the static patterns too (power_blocks:64, power:64,
neighborhood:1024, fixed:128, radial:256; docs/static_patterns.md), each with its element rule for FlexAttention. Each row is one
implementation on one (S, mask, pass):
  ours    `block_sparse_attention(..., implementation=NAME)` for each NAME of --implementations;
  cudnn   `jax.nn.dot_product_attention(is_causal=True, implementation='cudnn')`, with
          local_window_size=(W - 1, 0) for the window (jax turns it into cuDNN's
          sliding_window_length W: keys in (q - W, q]); it has no random-block mask;
  flex    torch FlexAttention (torch.compile) with a BlockMask built by
          `BlockMask.from_kv_blocks` from OUR plan's lists (partial and full blocks
          separated), so it visits exactly the same tiles.

FLOP convention (effective TFLOP/s): the tiles a plan visits count whole, masked or not.
  forward  = 4 * D * block_q * block_kv * (visited tiles), summed over batch and heads
  backward = 2.5 x forward, so forward+backward = 3.5 x forward
cuDNN rows use the tile count of the same plan (dense causal, or the window).

Timing is device time: JAX through CUPTI (`mosaic.gpu.profiler.measure`, the sum of the
kernels of one call, median over the iterations), torch with CUDA events around
back-to-back calls after warm-up (mean). Where CUPTI is missing (CPU), wall time of
back-to-back calls with one wait at the end.

Checks, once per configuration, on the rows of three q blocks (first, middle, last):
  err      max |out - exact| on fwd rows, max |dq - exact| on fwd+bwd rows, against
           float32 attention with the plan's element mask;
  dkv      max |dk - dk'|, |dv - dv'| on the same rows against the cuDNN row of the same
           configuration (else Flex): those need every query, so no exact value is made.
A row whose error passes 3% of the largest reference magnitude is marked WRONG.
"""

import os

os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')  # JAX and torch share the GPU

import argparse
import dataclasses
import functools
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from pallas_kernels.block_sparse_attention.api import select_implementation  # noqa: E402
from pallas_kernels.block_sparse_attention.masks import EMPTY, FULL  # noqa: E402
from pallas_kernels.block_sparse_attention.render import plan_from_spec  # noqa: E402

WRONG_FRACTION = 0.03
BACKWARD_FLOP_FACTOR = 2.5
# Targets from the issue: (mask, baseline) -> the least ratio of our TFLOP/s to the baseline's.
TARGETS = {
    ('causal', 'cudnn'): 0.85,
    ('random', 'cudnn'): 0.7,  # against cuDNN dense causal
    ('random', 'flex'): 1.0,  # faster
    ('causal_window', 'cudnn'): 1.0,
    ('causal_window', 'flex'): 1.0,
}
BASELINE_NAMES = {'cudnn': 'cuDNN', 'flex': 'Flex'}
STRICT = {('random', 'flex'), ('causal_window', 'flex')}  # 'faster than': the ratio must exceed 1


@dataclasses.dataclass
class Row:
  length: int
  mask: str
  direction: str  # 'fwd' or 'fwd+bwd'
  implementation: str  # 'ours:NAME', 'cudnn', 'xla' or 'flex'
  tiles: int
  flops: float
  ms: float = float('nan')
  tflops: float = float('nan')
  err: float = float('nan')
  dkv: float = float('nan')
  vs_cudnn: float = float('nan')
  vs_flex: float = float('nan')
  target: str = ''
  note: str = ''


# ---------------------------------------------------------------- inputs, plans, FLOPs

@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def make_inputs(length, heads, head_dim, seed):
  """q, k, v, d_out [1, S, H, D] bf16, normal(0, 1), the same for a given seed."""
  keys = jax.random.split(jax.random.key(seed), 4)
  shape = (1, length, heads, head_dim)
  return tuple(jax.random.normal(key, shape, jnp.bfloat16) for key in keys)


def make_plan(spec, length, block, heads):
  """One plan for all heads from a mask function; random blocks drawn per head."""
  return plan_from_spec(spec, length, block, seed=0, heads=heads)


def visited_tiles(plan, heads):
  return int(np.asarray(plan.kv_count).sum()) * (heads // plan.plan_heads)


def forward_flops(plan, heads, head_dim):
  return 4.0 * head_dim * plan.block_q * plan.block_kv * visited_tiles(plan, heads)


def sample_rows(length, block):
  starts = sorted({0, (length // 2) // block * block, (length - 1) // block * block})
  return np.concatenate([np.arange(s, min(s + block, length)) for s in starts])


# ---------------------------------------------------------------- the exact oracle

def plan_row_mask(plan, rows):
  """[1, Hp, R, S] bool: what the plan lets the sampled query rows see (B = 1)."""
  kinds = plan.block_kinds()[0]
  q_index = jnp.asarray(rows)[:, None]
  k_index = jnp.arange(plan.kv_len)[None, :]
  kind = kinds[:, q_index // plan.block_q, k_index // plan.block_kv]
  return ((kind != EMPTY) & ((kind == FULL) | plan.element_mask(q_index, k_index)))[None]


@functools.partial(jax.jit, static_argnums=(5,))
def _exact_rows(q, k, v, d_out, allowed, rows_tuple):
  rows = jnp.asarray(rows_tuple)
  scale = q.shape[-1] ** -0.5
  k32, v32 = k.astype(jnp.float32), v.astype(jnp.float32)

  def attend(q_rows):
    s = jnp.einsum('brhd,bkhd->bhrk', q_rows, k32, precision='highest') * scale
    p = jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), axis=-1)
    return jnp.einsum('bhrk,bkhd->brhd', p, v32, precision='highest')

  out, pull = jax.vjp(attend, q[:, rows].astype(jnp.float32))
  (dq,) = pull(d_out[:, rows].astype(jnp.float32))
  return out, dq


def exact_rows(q, k, v, d_out, plan, rows):
  """(out, dq) [1, R, H, D] float32 at the sampled rows. Every sampled row sees its own key."""
  out, dq = _exact_rows(q, k, v, d_out, plan_row_mask(plan, rows), tuple(int(r) for r in rows))
  return np.asarray(out), np.asarray(dq)


def max_diff(got, want):
  return float(np.max(np.abs(np.asarray(got, np.float32) - want)))


def is_wrong(got, want):
  return max_diff(got, want) > WRONG_FRACTION * float(np.max(np.abs(want)))


# ---------------------------------------------------------------- JAX timing

def measure_jax(fn, args, iterations):
  """(ms per call, first result). CUPTI kernel time if available, else back-to-back wall time."""
  result = jax.block_until_ready(fn(*args))  # compiles; a failure here is the function's, not the timer's
  try:
    from jax.experimental.mosaic.gpu import profiler
    result, timings = profiler.measure(fn, iterations=iterations)(*args)
    if timings:
      per_call = timings if isinstance(timings, list) else [timings]
      return float(np.median(per_call)), result
  except (ImportError, RuntimeError) as error:
    if jax.default_backend() == 'gpu':
      print(f'  CUPTI timing unavailable ({str(error)[:200]}); wall time instead', flush=True)
  start = time.perf_counter()
  results = [fn(*args) for _ in range(iterations)]
  jax.block_until_ready(results)
  return (time.perf_counter() - start) * 1e3 / iterations, result


def forward_and_backward(attend):
  """(q, k, v, d_out, *rest) -> (dq, dk, dv): one forward and its backward, nothing else."""
  def run(q, k, v, d_out, *rest):
    _, pull = jax.vjp(lambda q, k, v: attend(q, k, v, *rest), q, k, v)
    return pull(d_out)
  return run


def ours_attend(name):
  def attend(q, k, v, plan):
    return block_sparse_attention(q, k, v, plan, implementation=name)
  return attend


def dense_attend(kind, spec):
  """cuDNN (or XLA on CPU) with the mask of `spec`, or None when it has no such mask."""
  name, _, argument = spec.partition(':')
  if name == 'causal':
    window = None
  elif name == 'causal_window':
    window = (int(argument) - 1, 0)  # (left, right); jax gives cuDNN sliding_window_length = left + 1
  else:
    return None

  def attend(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, local_window_size=window, implementation=kind)
  return attend


def jax_rows(args, spec, length, plan, inputs, flops, tiles, rows):
  """Time ours (each name) and the dense JAX baseline on one (S, mask); yield rows with samples."""
  q, k, v, d_out = inputs
  candidates = [(f'ours:{name}', ours_attend(name), (plan,)) for name in args.implementations]
  dense = dense_attend(args.jax_baseline, spec)
  if dense is not None:
    candidates.append((args.jax_baseline, dense, ()))
  for label, attend, extra in candidates:
    if label.startswith('ours:'):
      try:
        select_implementation(label[5:], q, k, v, None, plan)
      except ValueError as error:
        yield unavailable_rows(length, spec, label, tiles, flops, str(error))
        continue
    yield from time_jax_candidate(args, length, spec, label, attend, extra, inputs, tiles, flops, rows)


def unavailable_rows(length, spec, label, tiles, flops, reason):
  print(f'  {label} skipped: {reason}', flush=True)
  return [(Row(length, spec, direction, label, tiles, flops * factor, note=reason), None)
          for direction, factor in (('fwd', 1.0), ('fwd+bwd', 1.0 + BACKWARD_FLOP_FACTOR))]


def time_jax_candidate(args, length, spec, label, attend, extra, inputs, tiles, flops, rows):
  q, k, v, d_out = inputs
  passes = (('fwd', jax.jit(attend), (q, k, v) + extra, 1.0),
            ('fwd+bwd', jax.jit(forward_and_backward(attend)), (q, k, v, d_out) + extra, 1.0 + BACKWARD_FLOP_FACTOR))
  for direction, fn, fn_args, factor in passes:
    row = Row(length, spec, direction, label, tiles, flops * factor)
    try:
      row.ms, result = measure_jax(fn, fn_args, args.iterations)
    except Exception as error:  # a baseline that cannot run is reported, not fatal
      row.note = f'{type(error).__name__}: {str(error).splitlines()[0][:160]}'
      print(f'  {label} {direction} failed: {row.note}', flush=True)
      yield [(row, None)]
      continue
    yield [(row, jax_samples(result, direction, rows))]
    del result


def jax_samples(result, direction, rows):
  if direction == 'fwd':
    return {'out': np.asarray(result[:, rows], np.float32)}
  return {name: np.asarray(x[:, rows], np.float32) for name, x in zip(('dq', 'dk', 'dv'), result)}


# ---------------------------------------------------------------- FlexAttention

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
  if name in ('causal', 'random', 'topk', 'power_blocks'):  # power_blocks: tiles full but the diagonal
    return causal_mask_mod
  if name in PATTERN_MASK_MODS:
    rule = PATTERN_MASK_MODS[name](int(argument))
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
PATTERN_MASK_MODS = {
    'power': lambda local: lambda q, k: ((q - k) < local) | (((q - k) & (q - k - 1)) == 0),
    'neighborhood': lambda kernel: lambda q, k: (q - k) < kernel,
    'fixed': lambda stride: lambda q, k: (q // stride == k // stride) | (k % stride >= stride - min(8, stride)),
    'radial': radial_rule,
}


def causal_mask_mod(b, h, q_idx, kv_idx):
  return q_idx >= kv_idx


def flex_block_mask(torch, plan, spec):
  from torch.nn.attention.flex_attention import BlockMask
  lists = [torch.from_numpy(x).cuda() for x in flex_block_lists(plan)]
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


def flex_rows(torch, flex, args, spec, length, plan, inputs, flops, tiles, rows):
  q, k, v, d_out = (to_torch(torch, x) for x in inputs)
  block_mask = flex_block_mask(torch, plan, spec)
  grad_inputs = [x.detach().requires_grad_() for x in (q, k, v)]

  def forward():
    with torch.no_grad():
      return flex(q, k, v, block_mask=block_mask)

  def forward_backward():
    out = flex(*grad_inputs, block_mask=block_mask)
    return torch.autograd.grad(out, grad_inputs, d_out)

  pairs = []
  for direction, fn, factor in (('fwd', forward, 1.0), ('fwd+bwd', forward_backward, 1.0 + BACKWARD_FLOP_FACTOR)):
    row = Row(length, spec, direction, 'flex', tiles, flops * factor)
    try:
      row.ms, result = measure_torch(torch, fn, args.iterations)
    except Exception as error:
      row.note = f'{type(error).__name__}: {str(error).splitlines()[0][:160]}'
      print(f'  flex {direction} failed: {row.note}', flush=True)
      pairs.append((row, None))
      continue
    pairs.append((row, torch_samples(torch, result, direction, rows)))
  return pairs


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


# ---------------------------------------------------------------- checks, ratios, table

def check_rows(rows, exact):
  """Fill err (against the exact rows) and dkv (against cuDNN, else Flex) of one configuration."""
  out_exact, dq_exact = exact
  backward = [(row, samples) for row, samples in rows if row.direction == 'fwd+bwd' and samples]
  anchors = [pair for pair in backward if not pair[0].implementation.startswith('ours:')]
  anchors.sort(key=lambda pair: pair[0].implementation == 'flex')
  anchor = anchors[0] if anchors else None
  for row, samples in rows:
    if not samples:
      continue
    got, want = (samples['out'], out_exact) if row.direction == 'fwd' else (samples['dq'], dq_exact)
    row.err = max_diff(got, want)
    wrong = is_wrong(got, want)
    if row.direction == 'fwd+bwd' and anchor is not None and anchor[0] is not row:
      reference = anchor[1]
      row.dkv = max(max_diff(samples[n], reference[n]) for n in ('dk', 'dv'))
      wrong |= any(is_wrong(samples[n], reference[n]) for n in ('dk', 'dv'))
    if wrong:
      row.note = (row.note + ' WRONG').strip()


def fill_ratios(rows):
  by_key = {(r.length, r.mask, r.direction, r.implementation): r for r in rows}
  for row in rows:
    row.tflops = row.flops / (row.ms * 1e-3) / 1e12
  for row in rows:
    family = row.mask.partition(':')[0]
    dense_mask = 'causal' if family == 'random' else row.mask
    baselines = {'cudnn': [r for (length, mask, direction, impl), r in by_key.items()
                           if (length, mask, direction) == (row.length, dense_mask, row.direction)
                           and impl in ('cudnn', 'xla')],
                 'flex': [by_key.get((row.length, row.mask, row.direction, 'flex'))]}
    for name, candidates in baselines.items():
      candidates = [r for r in candidates if r is not None and r is not row and np.isfinite(r.tflops)]
      if candidates:
        setattr(row, f'vs_{name}', row.tflops / candidates[0].tflops)
    if row.implementation.startswith('ours:'):
      row.target = target_text(row, family)


def target_text(row, family):
  parts = []
  for (mask, baseline), least in TARGETS.items():
    if mask != family:
      continue
    ratio = getattr(row, f'vs_{baseline}')
    met = ratio > least if (mask, baseline) in STRICT else ratio >= least
    sign = '>' if (mask, baseline) in STRICT else '>='
    verdict = 'n/a' if not np.isfinite(ratio) else ('ok' if met and 'WRONG' not in row.note else 'MISS')
    parts.append(f'{BASELINE_NAMES[baseline]}{sign}{least:g}:{verdict}')
  return ' '.join(parts)


def format_table(rows, header):
  columns = ('S', 'mask', 'pass', 'impl', 'tiles', 'ms', 'TFLOP/s', 'vs cuDNN', 'vs Flex', 'err', 'dkv', 'target',
             'note')
  number = lambda x, spec: '-' if not np.isfinite(x) else format(x, spec)
  lines = [[str(r.length), r.mask, r.direction, r.implementation, str(r.tiles), number(r.ms, '.3f'),
            number(r.tflops, '.4g'), number(r.vs_cudnn, '.2f'), number(r.vs_flex, '.2f'), number(r.err, '.2e'),
            number(r.dkv, '.2e'), r.target, r.note[:60]] for r in rows]
  widths = [max(len(c), *(len(line[i]) for line in lines)) if lines else len(c) for i, c in enumerate(columns)]
  render = lambda cells: '  '.join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
  return '\n'.join(header + [render(columns), render(['-' * w for w in widths])] + [render(line) for line in lines])


TABLE_HEADER = [
    'Effective TFLOP/s: forward FLOPs = 4 * D * block_q * block_kv * visited tiles (summed over batch and heads),',
    'fwd+bwd = 3.5 x forward. vs cuDNN / vs Flex: our TFLOP/s over the baseline\'s (random rows: over cuDNN dense',
    'causal). err: max |out - exact| (fwd) or |dq - exact| (fwd+bwd) on sampled rows; dkv: max |dk|,|dv| diff',
    'against cuDNN (else Flex). Targets: causal >= 0.85 cuDNN; random >= 0.7 cuDNN causal and > Flex; window >= cuDNN',
    'and > Flex.',
]


# ---------------------------------------------------------------- driver

def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--implementations', default=None,
                      help='comma-separated block_sparse_attention implementations, or none (default mosaic_gpu)')
  parser.add_argument('--sizes', default=None, help='comma-separated sequence lengths (default 8192,32768)')
  parser.add_argument('--masks', default=None, help='comma-separated mask specs (default causal,causal_window:1024,'
                      'random:0.1)')
  parser.add_argument('--heads', type=int, default=None)
  parser.add_argument('--head-dim', type=int, default=128)
  parser.add_argument('--block', type=int, default=128)
  parser.add_argument('--iterations', type=int, default=None)
  parser.add_argument('--jax-baseline', default=None, choices=('cudnn', 'xla'))
  parser.add_argument('--no-flex', dest='flex', action='store_false')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=None, help='write the rows as JSON here')
  parser.add_argument('--quick', action='store_true',
                      help='CPU smoke run: S=512, 2 heads, window 256, random 50%%, reference, XLA baseline, no torch')
  args = parser.parse_args(argv)
  quick = args.quick
  pick = lambda value, normal, smoke: value if value is not None else (smoke if quick else normal)
  args.implementations = pick(args.implementations, 'mosaic_gpu', 'reference')
  args.implementations = [] if args.implementations == 'none' else args.implementations.split(',')
  args.sizes = [int(s) for s in pick(args.sizes, '8192,32768', '512').split(',')]
  args.masks = pick(args.masks, 'causal,causal_window:1024,random:0.1', 'causal,causal_window:256,random:0.5').split(',')
  args.heads = pick(args.heads, 16, 2)
  args.iterations = pick(args.iterations, 20, 2)
  args.jax_baseline = pick(args.jax_baseline, 'cudnn', 'xla')
  args.flex = args.flex and not quick
  return args


def run_configuration(args, length, spec, torch, flex):
  plan = make_plan(spec, length, args.block, args.heads)
  inputs = make_inputs(length, args.heads, args.head_dim, args.seed)
  flops, tiles = forward_flops(plan, args.heads, args.head_dim), visited_tiles(plan, args.heads)
  rows = sample_rows(length, args.block)
  pairs = [pair for group in jax_rows(args, spec, length, plan, inputs, flops, tiles, rows) for pair in group]
  if torch is not None:
    pairs += flex_rows(torch, flex, args, spec, length, plan, inputs, flops, tiles, rows)
    torch.cuda.empty_cache()
  check_rows(pairs, exact_rows(*inputs, plan, rows))
  for row, _ in pairs:
    print(f'  {row.implementation:18s} {row.direction:8s} {row.ms:9.3f} ms  err {row.err:.2e}  {row.note}', flush=True)
  return [row for row, _ in pairs]


def write_json(path, rows, args, notes):
  meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, heads=args.heads, head_dim=args.head_dim,
              block=args.block, iterations=args.iterations, notes=notes,
              flops='forward = 4*D*block_q*block_kv*visited tiles (all heads); fwd+bwd = 3.5x forward')
  with open(path, 'w') as handle:
    json.dump(dict(meta=meta, rows=[dataclasses.asdict(r) for r in rows]), handle, indent=1, default=float)


def load_cudnn_first(args):
  """Run the JAX baseline once on a tiny input, so JAX loads its cuDNN before torch can."""
  tiny = make_inputs(2 * args.block, 1, args.head_dim, args.seed)[:3]
  try:
    jax.block_until_ready(jax.jit(dense_attend(args.jax_baseline, 'causal'))(*tiny))
  except Exception as error:
    print(f'{args.jax_baseline} does not run here: {type(error).__name__}: {str(error).splitlines()[0][:200]}')


def main(argv=None):
  args = parse_args(argv)
  print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}', flush=True)
  if args.flex:
    load_cudnn_first(args)
  torch, flex = load_flex(args)
  notes = [] if torch is not None else [flex]
  if torch is None:
    print(flex, flush=True)
  else:
    notes.append(f'torch {torch.__version__}')
  rows = []
  for length in args.sizes:
    for spec in args.masks:
      print(f'S={length} {spec}', flush=True)
      rows += run_configuration(args, length, spec, torch, flex)
      fill_ratios(rows)
      if args.out:
        write_json(args.out, rows, args, notes)
  print()
  print(format_table(rows, TABLE_HEADER + notes))
  return rows


if __name__ == '__main__':
  main()
