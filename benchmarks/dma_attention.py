"""Attention time of dynamic mask attention (DMA, top-w keys per query with a learned key
bias) against cuDNN dense causal and cuDNN sliding-window attention, in one run on one GPU.

    python benchmarks/dma_attention.py --out dma_attention.json    # GPU: S=32768, w=1024, blocks 64, 128
    python benchmarks/dma_attention.py --quick                     # CPU smoke run (S=512, w=64, reference kernel)
    python benchmarks/dma_attention.py --block-smooth majority,budget --out dma_attention.json   # plus smoothed rows

bf16, B=1, H=16 query heads and --kv-heads kv heads (default 16), D=128, random inputs.
The DMA layer is the `dynamic_mask:W` mechanism at its fresh init with A and W_dt scaled
by --score-scale (the key scores are then those of random values: the selection is
scattered, the realised tile fraction is in the table). Rows:
  select       key scores from the values, ranks, thresholds, the plan (forward only)
  attention    `block_sparse_attention` with the key bias over a precomputed DMA plan
  dma          the whole layer: select + attention (fwd+bwd: d q, k, v and the bias path)
  cudnn        `jax.nn.dot_product_attention(is_causal=True, implementation='cudnn')`
  cudnn_window the same with local_window_size=(W - 1, 0): the last W keys, the same keep budget
each forward and forward+backward. With --block-smooth MODES the select, attention and dma
rows are repeated for each block-smoothing mode (model.attention.dynamic_mask.block_smooth,
docs/dynamic_mask.md; column `smooth`): whole key blocks per query block, no rank rule.
`vs dense`, `vs window` = baseline ms / row ms of the same
pass (> 1: faster than the baseline). Time is device time through CUPTI
(`mosaic.gpu.profiler.measure`, the kernels of one call, median over --iterations; see
benchmarks/rows.py measure_jax), wall time where CUPTI is missing (CPU).
err: max |out - exact| of the dma forward on three sampled q blocks against float32
attention with the bias under the explicit rule (causal and rank >= threshold, or causal
inside the kept blocks when smoothed), marked
WRONG past 3% of the largest value. tiles: visited tiles over causal tiles.
"""

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import attention as attention_bench  # noqa: E402
from benchmarks.rows import device_name, number, report, text_table, time_row  # noqa: E402
from pallas_kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from pallas_kernels.block_sparse_attention.api import select_implementation  # noqa: E402
from sparseformer.config import base_config  # noqa: E402
from sparseformer.model import resolve_dims  # noqa: E402
from sparseformer.model.attention import AttentionContext, get_mechanism  # noqa: E402
from sparseformer.model.attention import dynamic_mask, dynamic_mask_plan  # noqa: E402


@dataclasses.dataclass
class Row:
  length: int
  block: int
  what: str  # select | attention | dma | cudnn | cudnn_window (xla... on CPU)
  direction: str  # fwd | fwd+bwd
  smooth: str = ''  # DMA rows: none | majority | budget
  ms: float = float('nan')
  vs_dense: float = float('nan')
  vs_window: float = float('nan')
  tiles: float = float('nan')  # visited tiles over causal tiles (DMA rows)
  err: float = float('nan')
  kernel: str = ''
  note: str = ''


def build_layer(args, block, smoothing):
  """(graphdef, state) of one dynamic_mask layer of the benchmark's sizes."""
  m = base_config().model
  m.attention.dynamic_mask.block_smooth = smoothing
  spec = f'dynamic_mask:{args.window}'
  m.num_layers, m.layer_attention = 1, (spec,)
  m.num_heads, m.num_kv_heads = args.heads, args.kv_heads
  m.head_dim, m.d_model = args.head_dim, args.heads * args.head_dim
  m.attention.block_size = block
  layer = get_mechanism(spec)(resolve_dims(m, 256), 0, nnx.Rngs(args.seed))
  layer.dt_weight[...] = layer.dt_weight[...] * args.score_scale
  layer.dt_scale[...] = layer.dt_scale[...] * args.score_scale
  return nnx.split(layer)


def dma_functions(args, length, block, smoothing):
  graphdef, state = build_layer(args, block, smoothing)
  ctx = AttentionContext(jnp.zeros((1, length), jnp.int32), None, None, None)

  def scores(state, v):
    layer = nnx.merge(graphdef, state)
    return dynamic_mask.key_scores(v, layer.dt_weight[...], layer.dt_scale[...])

  def select(state, v):
    """(plan, thresholds [1, Hkv, S]) or, smoothed, (plan, kept blocks [1, Hkv, nQ, nK])."""
    if smoothing == 'none':
      return dynamic_mask_plan.dynamic_mask_plan(scores(state, v), args.window, block_q=block, block_kv=block)
    return dynamic_mask_plan.smoothed_plan(scores(state, v), args.window, smoothing, block_q=block, block_kv=block)

  def attention(q, k, v, bias, plan):
    return block_sparse_attention(q, k, v, plan, key_bias=bias)

  def attention_fwd_bwd(q, k, v, bias, plan, d_out):
    _, pull = jax.vjp(lambda q, k, v, bias: attention(q, k, v, bias, plan), q, k, v, bias)
    return pull(d_out)

  def dma(state, q, k, v):
    y, aux = nnx.merge(graphdef, state)(q, k, v, ctx)
    return y, aux['stats']['dma_tile_fraction']

  def dma_fwd_bwd(state, q, k, v, d_out):
    _, pull = jax.vjp(lambda state, q, k, v: dma(state, q, k, v)[0], state, q, k, v)
    return pull(d_out)

  functions = dict(scores=jax.jit(scores), select=jax.jit(select), attention=jax.jit(attention),
                   attention_fwd_bwd=jax.jit(attention_fwd_bwd), dma=jax.jit(dma), dma_fwd_bwd=jax.jit(dma_fwd_bwd))
  return state, functions


@jax.jit
def _exact_rows(q, k, v, bias, selected, rows):
  """float32 outputs [1, R, H, D] of the sampled rows under causal & selected [1, Hkv, R, S]."""
  group = q.shape[2] // k.shape[2]
  k32, v32 = (jnp.repeat(x.astype(jnp.float32), group, axis=2) for x in (k, v))
  s = jnp.einsum('brhd,bkhd->bhrk', q[:, rows].astype(jnp.float32), k32, precision='highest') * q.shape[-1] ** -0.5
  s = s + jnp.repeat(bias, group, axis=1)[:, :, None, :]
  keys = jnp.arange(k.shape[1])
  allowed = (keys[None, :] <= rows[:, None])[None, None] & jnp.repeat(selected, group, axis=1)
  p = jax.nn.softmax(jnp.where(allowed, s, -jnp.inf), axis=-1)
  return jnp.einsum('bhrk,bkhd->brhd', p, v32, precision='highest')


def selected_keys(plan, selection, smoothing, rows):
  """bool [1, Hkv, R, S]: the keys the selection lets the sampled rows see (before causality)."""
  if smoothing == 'none':
    return plan.key_rank[:, :, None, :] >= plan.q_threshold[:, :, rows, None]
  keys = np.arange(plan.kv_len)
  return np.asarray(selection)[:, :, rows // plan.block_q][..., keys // plan.block_kv]


def check_dma(row, y, plan, selection, inputs, bias, smoothing):
  q, k, v = inputs
  sampled = attention_bench.sample_rows(plan.q_len, plan.block_q)
  selected = jnp.asarray(selected_keys(plan, selection, smoothing, sampled))
  exact = np.asarray(_exact_rows(q, k, v, bias, selected, jnp.asarray(sampled)))
  got = np.asarray(y, np.float32)[:, sampled]
  row.err = attention_bench.max_diff(got, exact)
  if attention_bench.is_wrong(got, exact):
    row.note = 'WRONG ' + row.note


def kv_inputs(args, length):
  q, k, v, d_out = attention_bench.make_inputs(length, args.heads, args.head_dim, args.seed)
  keep = args.kv_heads
  return q, k[:, :, :keep], v[:, :, :keep], d_out


def baseline_rows(args, length, q, k, v, d_out):
  rows = []
  for what, spec in ((args.baseline, 'causal'), (args.baseline + '_window', f'causal_window:{args.window}')):
    attend = attention_bench.dense_attend(args.baseline, spec)
    fwd_bwd = jax.jit(attention_bench.forward_and_backward(attend))
    for direction, fn, fn_args in (('fwd', jax.jit(attend), (q, k, v)), ('fwd+bwd', fwd_bwd, (q, k, v, d_out))):
      row = Row(length, 0, what, direction)
      time_row(row, fn, fn_args, args.iterations)
      rows.append(row)
      print(f'  {what:14s} {direction:8s} {row.ms:9.3f} ms  {row.note}', flush=True)
  return rows


def dma_rows(args, length, block, smoothing, q, k, v, d_out):
  state, functions = dma_functions(args, length, block, smoothing)
  bias = functions['scores'](state, v)
  plan, selection = functions['select'](state, v)
  kernel = select_implementation(None, q, k, v, bias, plan).name
  tiles = float(dynamic_mask_plan.active_tile_fraction(plan, None))
  timed = [('select', 'fwd', functions['select'], (state, v)),
           ('attention', 'fwd', functions['attention'], (q, k, v, bias, plan)),
           ('attention', 'fwd+bwd', functions['attention_fwd_bwd'], (q, k, v, bias, plan, d_out)),
           ('dma', 'fwd', functions['dma'], (state, q, k, v)),
           ('dma', 'fwd+bwd', functions['dma_fwd_bwd'], (state, q, k, v, d_out))]
  rows = []
  for what, direction, fn, fn_args in timed:
    row = Row(length, block, what, direction, smoothing, tiles=tiles, kernel=kernel if what != 'select' else '')
    result = time_row(row, fn, fn_args, args.iterations)
    if (what, direction) == ('dma', 'fwd') and result is not None:
      check_dma(row, result[0], plan, selection, (q, k, v), bias, smoothing)
    rows.append(row)
    print(f'  {what:14s} {smoothing:9s} {direction:8s} {row.ms:9.3f} ms  tiles {tiles:.3f}  {row.note}', flush=True)
  return rows


def run_length(args, length):
  q, k, v, d_out = kv_inputs(args, length)
  print(f'S={length}', flush=True)
  rows = baseline_rows(args, length, q, k, v, d_out)
  for block in args.blocks:
    for smoothing in ('none',) + args.block_smooth:
      print(f'S={length} block {block} block_smooth {smoothing}', flush=True)
      rows += dma_rows(args, length, block, smoothing, q, k, v, d_out)
  dense = {r.direction: r.ms for r in rows if r.what == args.baseline}
  window = {r.direction: r.ms for r in rows if r.what == args.baseline + '_window'}
  for row in rows:
    row.vs_dense = dense.get(row.direction, float('nan')) / row.ms
    row.vs_window = window.get(row.direction, float('nan')) / row.ms
  return rows


def format_table(rows):
  columns = ('S', 'block', 'what', 'pass', 'smooth', 'ms', 'vs dense', 'vs window', 'tiles', 'err', 'kernel', 'note')
  lines = [[str(r.length), str(r.block or '-'), r.what, r.direction, r.smooth or '-', number(r.ms, '.3f'),
            number(r.vs_dense, '.2f'),
            number(r.vs_window, '.2f'), number(r.tiles, '.3f'), number(r.err, '.2e'), r.kernel, r.note[:60]]
           for r in rows]
  return text_table(columns, lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default=None, help='comma-separated sequence lengths (default 32768)')
  parser.add_argument('--window', type=int, default=None, help='keys kept per query, w (default 1024)')
  parser.add_argument('--blocks', default=None, help='comma-separated block sizes (default 64,128)')
  parser.add_argument('--heads', type=int, default=None, help='query heads (default 16)')
  parser.add_argument('--kv-heads', type=int, default=None, help='kv heads (default: the query heads)')
  parser.add_argument('--head-dim', type=int, default=None, help='default 128')
  parser.add_argument('--score-scale', type=float, default=50.0,
                      help='A and W_dt are the init times this (default 50: scores of order 1)')
  parser.add_argument('--iterations', type=int, default=None)
  parser.add_argument('--baseline', default=None, choices=('cudnn', 'xla'), help='default cudnn')
  parser.add_argument('--block-smooth', default='',
                      help='comma-separated block_smooth modes (majority, budget) timed beside the exact top-w rows')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=None, help='write the rows as JSON here')
  parser.add_argument('--quick', action='store_true', help='CPU smoke run: S=512, w=64, 2 heads of 64, XLA')
  args = parser.parse_args(argv)
  pick = lambda value, normal, smoke: value if value is not None else (smoke if args.quick else normal)  # noqa: E731
  args.sizes = [int(s) for s in pick(args.sizes, '32768', '512').split(',')]
  args.window = pick(args.window, 1024, 64)
  args.blocks = [int(b) for b in pick(args.blocks, '64,128', '64').split(',')]
  args.heads = pick(args.heads, 16, 2)
  args.kv_heads = args.kv_heads or args.heads
  args.head_dim = pick(args.head_dim, 128, 64)
  args.iterations = pick(args.iterations, 20, 2)
  args.baseline = pick(args.baseline, 'cudnn', 'xla')
  args.block_smooth = tuple(mode for mode in args.block_smooth.split(',') if mode)
  unknown = [mode for mode in args.block_smooth if mode not in dynamic_mask_plan.SMOOTHINGS[1:]]
  if unknown:
    parser.error(f'--block-smooth {",".join(unknown)}: use majority and/or budget')
  return args


def main(argv=None):
  args = parse_args(argv)
  print(f'device: {device_name()}, jax {jax.__version__}; B=1, H={args.heads}, Hkv={args.kv_heads}, '
        f'D={args.head_dim}, w={args.window}', flush=True)
  rows = [row for length in args.sizes for row in run_length(args, length)]
  report(rows, format_table(rows), args.out,
         dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, window=args.window,
              score_scale=args.score_scale, iterations=args.iterations, baseline=args.baseline,
              block_smooth=args.block_smooth))
  return rows


if __name__ == '__main__':
  main()
