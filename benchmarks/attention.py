"""Block-sparse attention against cuDNN and FlexAttention, on the GPU machine.

    python3 benchmarks/attention.py --out attention.json                 # ours = mosaic_gpu
    python3 benchmarks/attention.py --implementations none               # baselines only
    python3 benchmarks/attention.py --quick                              # CPU smoke run
    python3 benchmarks/attention.py --implementations mosaic_gpu,mosaic_gpu:deterministic
    python3 benchmarks/attention.py --heads 32 --kv-heads 8              # GQA, 4 query heads per kv head

The kernel-targets run's shapes: GQA query groups 2, 4, 8 are `--heads 32 --kv-heads 16|8|4`,
head dim 64 is `--head-dim 64`.

bf16, B=1, H=16, D=128, S in {8192, 32768}, forward and forward+backward, on three plans:
dense causal, a causal window of 1024 keys (the query included), and a random 10% of the
blocks below the diagonal plus the diagonal, drawn per query head (seeded;
plan_from_block_mask with H plan heads). No GQA unless --kv-heads N (a divisor of H): q and
d_out [1, S, H, D], k and v [1, S, N, D], query head h reading kv head h // (H / N); FLOPs
and tiles stay counted per query head. --masks takes any spec of
render.plan_from_spec, the static patterns too (power_blocks:64, power:64,
neighborhood:1024, fixed:128, radial:256, bigbird:1, neighborhood2d:K/C, neighborhood3d:K/RxC;
docs/static_patterns.md), each with its element rule for FlexAttention; neighborhood:K/D is
dilated, neighborhood2d:K/C the causal K x K window over a grid C tokens wide (C default 32,
the layer's), neighborhood3d:K/RxC the causal K x K x K window over frames of R x C tokens
(default 16 x 16). Where the layer re-tiles a
pattern, ours also runs as the layer does: rows ours:NAME:grouped (a dilated neighborhood,
dilation groups gathered) and ours:NAME:gathered (fixed, summary keys gathered in front).
Each row is one
implementation on one (S, mask, pass):
  ours    `block_sparse_attention(..., implementation=NAME)` for each NAME of --implementations;
          NAME:deterministic (row ours:NAME:deterministic) passes deterministic=True, the
          reproducible two-kernel backward; plain NAME passes False (on Hopper the fused
          backward that adds dQ atomically);
  cudnn   `jax.nn.dot_product_attention(is_causal=True, implementation='cudnn')`, with
          local_window_size=(W - 1, 0) for the window (jax turns it into cuDNN's
          sliding_window_length W: keys in (q - W, q]); it has no random-block mask;
  flex    torch FlexAttention (torch.compile; its side in attention_flex.py) with a BlockMask built by
          `BlockMask.from_kv_blocks` from OUR plan's lists (partial and full blocks
          separated), so it visits exactly the same tiles; enable_gqa=True under GQA.

FLOP convention (effective TFLOP/s): the tiles a plan visits count whole, masked or not.
  forward  = 4 * D * block_q * block_kv * (visited tiles), summed over batch and query heads
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

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pallas_kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from pallas_kernels.block_sparse_attention.api import select_implementation  # noqa: E402
from pallas_kernels.block_sparse_attention.masks import EMPTY, FULL  # noqa: E402
from pallas_kernels.block_sparse_attention import dilation_groups, summary_prefix  # noqa: E402
from pallas_kernels.block_sparse_attention.render import neighborhood_argument, plan_from_spec  # noqa: E402

# flex_block_lists and measure_torch are also read from here (tests, block_selection.py).
from benchmarks.rows import kernel_breakdown, measure_jax  # noqa: E402
from benchmarks.attention_flex import (flex_block_lists, flex_block_mask, load_flex, measure_torch,  # noqa: E402,F401
                                       to_torch, torch_samples)

WRONG_FRACTION = 0.03
BACKWARD_FLOP_FACTOR = 2.5
# Targets from the issue: (mask, baseline) -> the least ratio of our TFLOP/s to the baseline's.
TARGETS = {  # issue 25's (the GQA and head-dim-64 shapes are causal rows: 0.95x cuDNN too)
    ('causal', 'cudnn'): 0.95,
    ('causal', 'flex'): 1.0,  # faster
    ('random', 'cudnn'): 0.75,  # against cuDNN dense causal
    ('random', 'flex'): 1.0,
    ('causal_window', 'cudnn'): 1.0,  # against cuDNN's own sliding window
    ('causal_window', 'flex'): 1.0,
}
BASELINE_NAMES = {'cudnn': 'cuDNN', 'flex': 'Flex'}
STRICT = {('causal', 'flex'), ('random', 'flex'), ('causal_window', 'flex')}  # 'faster than': the ratio must exceed 1


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
  kernels: str = ''  # ours: the longest kernels of one call (CUPTI; '' off a GPU)


# ---------------------------------------------------------------- inputs, plans, FLOPs

@functools.partial(jax.jit, static_argnums=(0, 1, 2, 4))
def make_inputs(length, heads, head_dim, seed, kv_heads=None):
  """q, d_out [1, S, H, D] and k, v [1, S, kv_heads (default H), D] bf16, normal(0, 1), the
  same for a given seed."""
  keys = jax.random.split(jax.random.key(seed), 4)
  q_shape, kv_shape = (1, length, heads, head_dim), (1, length, kv_heads or heads, head_dim)
  return tuple(jax.random.normal(key, shape, jnp.bfloat16)
               for key, shape in zip(keys, (q_shape, kv_shape, kv_shape, q_shape)))


def make_plan(spec, length, block, heads):
  """One plan for all heads from a mask function; random blocks drawn per query head (H plan
  heads, which block_sparse_attention takes under GQA too)."""
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
  heads, group = q.shape[2], q.shape[2] // k.shape[2]
  k32, v32 = (jnp.repeat(x.astype(jnp.float32), group, axis=2) for x in (k, v))  # query head h: kv head h // group
  if allowed.shape[1] not in (1, heads):  # query head h reads plan head h // (H / Hp)
    allowed = jnp.repeat(allowed, heads // allowed.shape[1], axis=1)

  def attend(q_rows):
    s = jnp.einsum('brhd,bkhd->bhrk', q_rows, k32, precision='highest') * scale
    p = jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), axis=-1)
    return jnp.einsum('bhrk,bkhd->brhd', p, v32, precision='highest')

  out, pull = jax.vjp(attend, q[:, rows].astype(jnp.float32))
  (dq,) = pull(d_out[:, rows].astype(jnp.float32))
  return out, dq


def exact_rows(q, k, v, d_out, plan, rows):
  """(out, dq) [1, R, H, D] float32 at the sampled rows (k, v may have fewer heads: GQA).
  Every sampled row sees its own key."""
  out, dq = _exact_rows(q, k, v, d_out, plan_row_mask(plan, rows), tuple(int(r) for r in rows))
  return np.asarray(out), np.asarray(dq)


def max_diff(got, want):
  return float(np.max(np.abs(np.asarray(got, np.float32) - want)))


def is_wrong(got, want):
  return max_diff(got, want) > WRONG_FRACTION * float(np.max(np.abs(want)))


# ---------------------------------------------------------------- forward and backward

def forward_and_backward(attend):
  """(q, k, v, d_out, *rest) -> (dq, dk, dv): one forward and its backward, nothing else."""
  def run(q, k, v, d_out, *rest):
    _, pull = jax.vjp(lambda q, k, v: attend(q, k, v, *rest), q, k, v)
    return pull(d_out)
  return run


def split_implementation(entry):
  """An --implementations entry -> (implementation name, deterministic): 'NAME' or 'NAME:deterministic'."""
  name, _, suffix = entry.partition(':')
  return name, suffix == 'deterministic'


def ours_attend(entry):
  name, deterministic = split_implementation(entry)

  def attend(q, k, v, plan):
    return block_sparse_attention(q, k, v, plan, implementation=name, deterministic=deterministic)
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
        select_implementation(split_implementation(label[5:])[0], q, k, v, None, plan)
      except ValueError as error:
        yield unavailable_rows(length, spec, label, tiles, flops, str(error))
        continue
    yield from time_jax_candidate(args, length, spec, label, attend, extra, inputs, tiles, flops, rows)
  for label, attend, layer_plan in layer_tiling_candidates(args, spec, length):
    yield from time_jax_candidate(args, length, spec, label, attend, (layer_plan,), inputs,
                                  visited_tiles(layer_plan, args.heads), flops, rows)


def layer_tiling_candidates(args, spec, length):
  """Patterns whose layer re-tiles them (sparseformer/model/attention/static_patterns.py) also
  run as the layer does, inside the timed call: a dilated neighborhood (neighborhood:K/D,
  D > 1; rows ours:NAME:grouped) with q, k, v gathered group by group and a window of K over
  that order; fixed:S (rows ours:NAME:gathered) with the summary keys gathered in front of
  the keys. Those rows count the row plan's FLOPs, so their ratios are time ratios; their
  tiles are their own plan's. [(label, attend(q, k, v, plan), plan)]"""
  name, _, argument = spec.partition(':')
  if name == 'neighborhood' and neighborhood_argument(argument)[1] > 1:
    kernel, dilation = neighborhood_argument(argument)
    plan = dilation_groups.grouped_plan(kernel, dilation, length=length, block=args.block)

    def relayout(inner):
      return lambda q, k, v, plan: dilation_groups.grouped_attention(lambda *x: inner(*x, plan), q, k, v, dilation)
    suffix = 'grouped'
  elif name == 'fixed':
    stride = int(argument)
    slots, plan = summary_prefix.gathered_plan(stride, min(8, stride), length=length, block=args.block)

    def relayout(inner):
      return lambda q, k, v, plan: inner(q, *(summary_prefix.with_summary_keys(x, slots) for x in (k, v)), plan)
    suffix = 'gathered'
  else:
    return []
  return [(f'ours:{entry}:{suffix}', relayout(ours_attend(entry)), plan) for entry in args.implementations]


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
    if label.startswith('ours') and jax.default_backend() == 'gpu':
      row.kernels = kernel_breakdown(fn, fn_args, longest=6)
      print(f'  {label} {direction} kernels (ms): {row.kernels}', flush=True)
    yield [(row, jax_samples(result, direction, rows))]
    del result


def jax_samples(result, direction, rows):
  if direction == 'fwd':
    return {'out': np.asarray(result[:, rows], np.float32)}
  return {name: np.asarray(x[:, rows], np.float32) for name, x in zip(('dq', 'dk', 'dv'), result)}


# ---------------------------------------------------------------- FlexAttention

def flex_rows(torch, flex, args, spec, length, plan, inputs, flops, tiles, rows):
  """Time FlexAttention on one (S, mask) with our plan as its BlockMask (attention_flex.py); rows with samples."""
  q, k, v, d_out = (to_torch(torch, x) for x in inputs)  # [B, H, S, D]; k, v [B, Hkv, S, D]
  block_mask = flex_block_mask(torch, plan, spec, q.shape[1])
  grad_inputs = [x.detach().requires_grad_() for x in (q, k, v)]
  gqa = dict(enable_gqa=True) if k.shape[1] != q.shape[1] else {}  # MHA compiles the call it always did

  def forward():
    with torch.no_grad():
      return flex(q, k, v, block_mask=block_mask, **gqa)

  def forward_backward():
    out = flex(*grad_inputs, block_mask=block_mask, **gqa)
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
    'Effective TFLOP/s: forward FLOPs = 4 * D * block_q * block_kv * visited tiles (summed over batch and query',
    'heads), fwd+bwd = 3.5 x forward. vs cuDNN / vs Flex: our TFLOP/s over the baseline\'s (random rows: over cuDNN',
    'dense causal). err: max |out - exact| (fwd) or |dq - exact| (fwd+bwd) on sampled rows; dkv: max |dk|,|dv| diff',
    'against cuDNN (else Flex). Targets: causal >= 0.85 cuDNN; random >= 0.7 cuDNN causal and > Flex; window >= cuDNN',
    'and > Flex.',
]


# ---------------------------------------------------------------- driver

def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--implementations', default=None,
                      help='comma-separated block_sparse_attention implementations, or none (default mosaic_gpu); '
                      'NAME:deterministic times NAME with deterministic=True (the reproducible backward)')
  parser.add_argument('--sizes', default=None, help='comma-separated sequence lengths (default 8192,32768)')
  parser.add_argument('--masks', default=None, help='comma-separated mask specs (default causal,causal_window:1024,'
                      'random:0.1)')
  parser.add_argument('--heads', type=int, default=None, help='query heads (default 16)')
  parser.add_argument('--kv-heads', type=int, default=None, help='k and v heads (GQA), a divisor of --heads '
                      '(default --heads)')
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
  args.kv_heads = args.heads if args.kv_heads is None else args.kv_heads
  if args.kv_heads < 1 or args.heads % args.kv_heads:
    parser.error(f'--kv-heads {args.kv_heads} must divide --heads {args.heads}')
  for entry in args.implementations:
    if entry.partition(':')[2] not in ('', 'deterministic'):
      parser.error(f'--implementations entry {entry!r}: the only suffix is :deterministic')
  args.iterations = pick(args.iterations, 20, 2)
  args.jax_baseline = pick(args.jax_baseline, 'cudnn', 'xla')
  args.flex = args.flex and not quick
  return args


def run_configuration(args, length, spec, torch, flex):
  plan = make_plan(spec, length, args.block, args.heads)
  inputs = make_inputs(length, args.heads, args.head_dim, args.seed, args.kv_heads)
  flops, tiles = forward_flops(plan, args.heads, args.head_dim), visited_tiles(plan, args.heads)
  rows = sample_rows(length, args.block)
  pairs = [pair for group in jax_rows(args, spec, length, plan, inputs, flops, tiles, rows) for pair in group]
  if torch is not None:
    pairs += flex_rows(torch, flex, args, spec, length, plan, inputs, flops, tiles, rows)
    torch.cuda.empty_cache()
  check_rows(pairs, exact_rows(*inputs, plan, rows))
  for row, _ in pairs:
    print(f'  {row.implementation:29s} {row.direction:8s} {row.ms:9.3f} ms  err {row.err:.2e}  {row.note}', flush=True)
  return [row for row, _ in pairs]


def write_json(path, rows, args, notes):
  meta = dict(device=str(jax.devices()[0].device_kind), jax=jax.__version__, heads=args.heads, kv_heads=args.kv_heads,
              head_dim=args.head_dim, block=args.block, iterations=args.iterations, notes=notes,
              flops='forward = 4*D*block_q*block_kv*visited tiles (all query heads); fwd+bwd = 3.5x forward')
  with open(path, 'w') as handle:
    json.dump(dict(meta=meta, rows=[dataclasses.asdict(r) for r in rows]), handle, indent=1, default=float)


def shape_line(args):
  group = f' (GQA, {args.heads // args.kv_heads} query heads per kv head)' if args.kv_heads != args.heads else ''
  return (f'bf16, B=1, H={args.heads} query heads, {args.kv_heads} kv heads{group}, D={args.head_dim}, '
          f'block {args.block}.')


def load_cudnn_first(args):
  """Run the JAX baseline once on a tiny input, so JAX loads its cuDNN before torch can."""
  tiny = make_inputs(2 * args.block, 1, args.head_dim, args.seed, 1)[:3]
  try:
    jax.block_until_ready(jax.jit(dense_attend(args.jax_baseline, 'causal'))(*tiny))
  except Exception as error:
    print(f'{args.jax_baseline} does not run here: {type(error).__name__}: {str(error).splitlines()[0][:200]}')


def main(argv=None):
  args = parse_args(argv)
  print(f'device: {jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}', flush=True)
  print(shape_line(args), flush=True)
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
  print(format_table(rows, [shape_line(args)] + TABLE_HEADER + notes))
  return rows


if __name__ == '__main__':
  main()
