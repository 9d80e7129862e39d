"""Pictures of a plan: one plan head's [nQ, nK] blocks as a PNG heat map.

    render_plan(plan, 'plan.png')                 # full / partial / skipped in three colours

    python -m pallas_kernels.block_sparse_attention.render --mask causal_window:1024 \\
        --length 8192 --block 128 --out plan.png

Mask specs for the command line (and `plan_from_spec`): full, causal, causal_window:W
(the last W keys, the query included), chunked:C (causal inside chunks of C tokens),
random:DENSITY (each block below the diagonal kept with that probability, the diagonal
always, seeded), topk:K (the K best of random block scores per q block row, plus the
diagonal and the first block), and the static patterns power:W (per token),
power_blocks:W (between the plan's blocks, the last ceil(W / block) blocks: the power
layer's default), neighborhood:K or neighborhood:K/D (dilation D), neighborhood2d:K[/C]
(a grid C tokens wide), neighborhood3d:K[/RxC] (frames of R x C tokens), fixed:S, radial:F
(causal, the layer specs' default options).
"""

import argparse
import math

import numpy as np

from pallas_kernels.block_sparse_attention import masks, patterns
from pallas_kernels.block_sparse_attention.masks import EMPTY, FULL, PARTIAL
from pallas_kernels.block_sparse_attention.plan import (density, num_blocks, plan_from_block_mask,
                                                        plan_from_block_scores, plan_from_mask)

KIND_NAMES = {EMPTY: 'skipped', PARTIAL: 'partial (element mask)', FULL: 'full (no mask)'}
KIND_COLOURS = {EMPTY: '#f2f2f2', PARTIAL: '#f28e2b', FULL: '#2f5f98'}  # light grey, orange, dark blue

# Axes placement in figure fractions (left, bottom, width, height), fixed so that a cell's
# pixel is known: no tight bounding box, which would move it.
AXES_BOX = (0.1, 0.1, 0.62, 0.8)
FIGURE_INCHES = (6.4, 4.8)
DPI = 100


def kind_grid(plan, batch=0, plan_head=0):
  """[nQ, nK] int array of EMPTY / PARTIAL / FULL: the colour index of each cell."""
  return np.asarray(plan.block_kinds()[batch, plan_head])


def cell_pixel(row, col, grid_shape, image_shape):
  """(y, x) pixel at the centre of cell (q block `row`, kv block `col`) in the saved PNG."""
  left, bottom, width, height = AXES_BOX
  rows, cols = grid_shape
  image_height, image_width = image_shape[:2]
  x = (left + (col + 0.5) / cols * width) * image_width
  y = (1 - bottom - height + (row + 0.5) / rows * height) * image_height
  return int(y), int(x)


def render_plan(plan, path, *, batch=0, plan_head=0, title=None):
  """Write a PNG heat map of plan head `plan_head` of batch row `batch`."""
  import matplotlib
  matplotlib.use('Agg')
  from matplotlib import colors, patches
  from matplotlib import pyplot as plt

  grid = kind_grid(plan, batch, plan_head)
  fraction = float(density(plan)[batch, plan_head])
  if title is None:
    title = f'{plan.q_len} x {plan.kv_len} tokens, blocks {plan.block_q} x {plan.block_kv}'
  figure = plt.figure(figsize=FIGURE_INCHES, dpi=DPI)
  try:
    axes = figure.add_axes(AXES_BOX)
    palette = colors.ListedColormap([KIND_COLOURS[k] for k in (EMPTY, PARTIAL, FULL)])
    axes.imshow(grid, cmap=palette, vmin=-0.5, vmax=2.5, interpolation='nearest', aspect='auto')
    axes.set_xlabel('kv block')
    axes.set_ylabel('q block')
    axes.set_title(f'{title}\ndensity {fraction:.1%} of tiles visited', fontsize=10)
    legend = [patches.Patch(facecolor=KIND_COLOURS[k], edgecolor='black', label=KIND_NAMES[k])
              for k in (FULL, PARTIAL, EMPTY)]
    figure.legend(handles=legend, loc='center right', fontsize=8, frameon=False)
    figure.savefig(path, dpi=DPI)
  finally:
    plt.close(figure)


def random_causal_block_mask(num_q_blocks, num_kv_blocks, fraction, seed=0, heads=1):
  """[1, heads, nQ, nK] bool: each block below the diagonal kept with probability
  `fraction`, independently per head, the diagonal always (so every query sees itself)."""
  rows = np.arange(num_q_blocks)[:, None]
  cols = np.arange(num_kv_blocks)[None, :]
  kept = np.random.default_rng(seed).random((1, heads, num_q_blocks, num_kv_blocks)) < fraction
  return (kept & (cols < rows)) | (cols == rows)


def random_topk_plan(keep, length, block, seed=0, heads=1):
  num = num_blocks(length, block)
  scores = np.random.default_rng(seed).random((1, heads, num, num)).astype(np.float32)
  return plan_from_block_scores(scores, keep, q_len=length, block_q=block, block_kv=block)


def plan_from_spec(spec, length, block=128, seed=0, heads=1):
  """A causal-length plan (q_len = kv_len = length) from a spec such as 'causal_window:1024'.
  Mask functions give one plan for all heads; random and topk draw one per head (`heads`)."""
  name, _, argument = spec.partition(':')
  from_mask = lambda mask: plan_from_mask(mask, q_len=length, block_q=block, block_kv=block)
  if name == 'full':
    return from_mask(masks.Full())
  if name == 'causal':
    return from_mask(masks.Causal())
  if name == 'causal_window':
    return from_mask(masks.causal_window(int(argument)))
  if name == 'chunked':
    return from_mask(masks.Chunked(int(argument)) & masks.Causal())
  if name == 'random':
    num = num_blocks(length, block)
    chosen = random_causal_block_mask(num, num, float(argument), seed, heads)
    return plan_from_block_mask(chosen, q_len=length, block_q=block, block_kv=block)
  if name == 'topk':
    return random_topk_plan(int(argument), length, block, seed, heads)
  if name == 'power_blocks':
    return from_mask(patterns.Power(local=-(-int(argument) // block), block=block) & masks.Causal())
  if name == 'bigbird':  # window in blocks; the bigbird layer's default options (static_patterns.py)
    return from_mask(patterns.BigBird(length, block, window=int(argument), global_tokens=2 * block, random_blocks=3,
                                      causal_draws=True) & masks.Causal())
  if name in PATTERN_SPECS:
    return from_mask(PATTERN_SPECS[name](argument) & masks.Causal())
  raise ValueError(f'unknown mask spec {spec!r}: use full, causal, causal_window:W, chunked:C, '
                   'random:DENSITY, topk:K, power_blocks:W, bigbird:BLOCKS, neighborhood:K[/DILATION], '
                   'neighborhood2d:K[/COLUMNS], neighborhood3d:K[/ROWSxCOLUMNS], '
                   + ', '.join(f'{n}:N' for n in PATTERN_SPECS if not n.startswith('neighborhood')))


def neighborhood_argument(argument):
  """'K' or 'K/D' -> (kernel, dilation)."""
  kernel, _, dilation = argument.partition('/')
  return int(kernel), int(dilation or 1)


# The layers' default inner grid sizes (model.attention.neighborhood2d.columns,
# model.attention.neighborhood3d.rows and .columns), by the grid's rank.
NEIGHBORHOOD_INNER = {2: (32,), 3: (16, 16)}


def grid_neighborhood_argument(argument, rank):
  """'K' or 'K/C' (rank 2: a grid C tokens wide) or 'K/RxC' (rank 3: frames of R x C
  tokens) -> (kernel, the inner axes' sizes)."""
  kernel, _, inner = argument.partition('/')
  sizes = tuple(int(size) for size in inner.split('x')) if inner else NEIGHBORHOOD_INNER[rank]
  if len(sizes) != rank - 1:
    raise ValueError(f'neighborhood{rank}d:{argument}: give {rank - 1} inner grid size(s), '
                     f'{"C" if rank == 2 else "RxC"}')
  return int(kernel), sizes


def grid_neighborhood(rank):
  """The `neighborhood{rank}d:K` layer's pattern (before causality): the outer axis without end."""
  def pattern(argument):
    kernel, inner = grid_neighborhood_argument(argument, rank)
    return patterns.NeighborhoodGrid(((1 << 30) // math.prod(inner),) + inner, (kernel,) * rank)
  return pattern


# Static patterns (patterns.py) by the layer specs' argument and default options
# (docs/static_patterns.md), causal.
PATTERN_SPECS = {
    'power': lambda local: patterns.Power(local=int(local)),
    'neighborhood': lambda argument: patterns.Neighborhood(1 << 30, *neighborhood_argument(argument), causal=True),
    'fixed': lambda stride: patterns.Fixed(int(stride), min(8, int(stride))),
    'radial': lambda frame: patterns.Radial(int(frame)),
    'neighborhood2d': grid_neighborhood(2),
    'neighborhood3d': grid_neighborhood(3),
}


def main(argv=None):
  parser = argparse.ArgumentParser(description='Render a block-sparse plan as a PNG heat map.')
  parser.add_argument('--mask', default='causal', help='full, causal, causal_window:W, chunked:C, '
                      'random:DENSITY, topk:K')
  parser.add_argument('--length', type=int, default=8192)
  parser.add_argument('--block', type=int, default=128)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--title', default=None)
  parser.add_argument('--out', default='plan.png')
  args = parser.parse_args(argv)
  plan = plan_from_spec(args.mask, args.length, args.block, args.seed)
  title = args.title or f'{args.mask}, {args.length} tokens, block {args.block}'
  render_plan(plan, args.out, title=title)
  print(f'wrote {args.out}: {plan.num_q_blocks} x {plan.num_kv_blocks} blocks, '
        f'density {float(density(plan)[0, 0]):.2%}')


if __name__ == '__main__':
  main()
