"""Draws docs/plans/<pattern>.png (docs/static_patterns.md): each static pattern's causal
plan at 8192 tokens in 128-token blocks, and prints the density of each at 8k, 32k and
128k tokens: elements (the fraction of the causal query-key pairs it keeps, from 512
evenly spaced queries per length) and tiles (the fraction of the causal 128 x 128 tiles
the kernel visits).

    python docs/plans/draw_static_patterns.py [NAME ...]
"""

import os
import sys

import numpy as np

from pallas_kernels.block_sparse_attention import masks, patterns, plan_from_mask
from pallas_kernels.block_sparse_attention.plan import density
from pallas_kernels.block_sparse_attention.render import render_plan
from pallas_kernels.block_sparse_attention.dilation_groups import grouped_plan
from pallas_kernels.block_sparse_attention.summary_prefix import gathered_plan
from sparseformer.model.attention.static_patterns import mean_visible_keys

HERE = os.path.dirname(os.path.abspath(__file__))
T, BLOCK = 8192, 128
PATTERNS = {  # the settings of docs/static_patterns.md's table
    'power': ('power:64 per token, sink 0', patterns.Power(local=64)),
    'power_blocks': ('power:64 (between 128-blocks), sink 0', patterns.Power(local=1, block=BLOCK)),
    'neighborhood': ('neighborhood:1024, dilation 4', patterns.Neighborhood(1 << 30, 1024, 4, causal=True)),
    'neighborhood2d': ('neighborhood2d:7 over 128 columns',
                       patterns.NeighborhoodGrid(((1 << 30) // 128, 128), (7, 7), (1, 1))),
    'neighborhood3d': ('neighborhood3d:5 over frames of 32 x 32',
                       patterns.NeighborhoodGrid(((1 << 30) // 1024, 32, 32), (5, 5, 5), (1, 1, 1))),
    'fixed': ('fixed:128, summary 8', patterns.Fixed(128, 8)),
    'radial': ('radial:256', patterns.Radial(256)),
    'strided': ('Strided(128, 128), element level', patterns.Strided(128, 128)),
    'bigbird': ('BigBird: 128-blocks, window 1, 2 global blocks, 3 random',
                patterns.BigBird(T, BLOCK, window=1, global_tokens=256, random_blocks=3, seed=0)),
}

# The layers' own tilings (static_patterns.py): a dilated neighborhood with each dilation
# group gathered contiguous (tiling=grouped), fixed with its summary keys gathered in front
# of the keys (tiling=gathered, summary_prefix.py): their plans of `length` tokens.
RETILED = {
    'neighborhood_grouped': ('neighborhood:1024, dilation 4, grouped',
                             lambda length: grouped_plan(1024, 4, length=length, block=BLOCK)),
    'fixed_gathered': ('fixed:128, summary 8, gathered', lambda length: gathered_plan(128, 8, length=length,
                                                                                       block=BLOCK)[1]),
}


def causal_density(mask, length):
  """Kept pairs over causal pairs: mean visible keys over mean causal keys."""
  return mean_visible_keys(mask & masks.Causal(), length) / mean_visible_keys(masks.Causal(), length)


def tile_density(mask, length):
  """Visited tiles over causal tiles."""
  visited = lambda m: float(density(plan_from_mask(m, q_len=length, block_q=BLOCK, block_kv=BLOCK)).mean())  # noqa: E731
  return visited(mask & masks.Causal()) / visited(masks.Causal())


def draw_retiled(name):
  """The plan picture, and visited tiles over the row's causal tiles (the same attention)."""
  title, make_plan = RETILED[name]
  render_plan(make_plan(T), os.path.join(HERE, f'{name}.png'), title=f'{title}: {T} queries, blocks {BLOCK}')
  tiles = lambda plan: float(np.asarray(plan.kv_count).sum())  # noqa: E731
  causal = lambda n: tiles(plan_from_mask(masks.Causal(), q_len=n, block_q=BLOCK, block_kv=BLOCK))  # noqa: E731
  print(name, ' '.join(f'{n}: tiles {tiles(make_plan(n)) / causal(n):.4f};' for n in (8192, 32768, 131072)))


if __name__ == '__main__':
  names = sys.argv[1:] or [*PATTERNS, *RETILED]  # e.g. neighborhood2d: draw only that one
  unknown = [name for name in names if name not in PATTERNS and name not in RETILED]
  if unknown:
    sys.exit(f'unknown patterns {unknown}; known: {", ".join([*PATTERNS, *RETILED])}')
  for name in names:
    if name in RETILED:
      draw_retiled(name)
      continue
    title, pattern = PATTERNS[name]
    plan = plan_from_mask(pattern & masks.Causal(), q_len=T, block_q=BLOCK, block_kv=BLOCK)
    render_plan(plan, os.path.join(HERE, f'{name}.png'), title=f'{title}: {T} x {T}, blocks {BLOCK}')
    lengths = (8192, 32768, 131072) if name != 'bigbird' else (8192,)  # BigBird's mask is built for T
    print(name, ' '.join(f'{n}: elements {causal_density(pattern, n):.4f}, tiles {tile_density(pattern, n):.4f};'
                         for n in lengths))
