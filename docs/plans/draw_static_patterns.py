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
from sparseformer.model.attention.static_patterns import group_segment_ids, mean_visible_keys

HERE = os.path.dirname(os.path.abspath(__file__))
T, BLOCK = 8192, 128
PATTERNS = {  # the settings of docs/static_patterns.md's table
    'power': ('power:64 per token, sink 0', patterns.Power(local=64)),
    'power_blocks': ('power:64 (between 128-blocks), sink 0', patterns.Power(local=1, block=BLOCK)),
    'neighborhood': ('neighborhood:1024, dilation 4', patterns.Neighborhood(1 << 30, 1024, 4, causal=True)),
    'neighborhood2d': ('neighborhood2d:7 over 128 columns',
                       patterns.Neighborhood2D(((1 << 30) // 128, 128), (7, 7), (1, 1))),
    'fixed': ('fixed:128, summary 8', patterns.Fixed(128, 8)),
    'radial': ('radial:256', patterns.Radial(256)),
    'strided': ('Strided(128, 128), element level', patterns.Strided(128, 128)),
    'bigbird': ('BigBird: 128-blocks, window 1, 2 global blocks, 3 random',
                patterns.BigBird(T, BLOCK, window=1, global_tokens=256, random_blocks=3, seed=0)),
}
# The neighborhood layer's own tiling of a dilated window (tiling=grouped): each dilation
# group gathered contiguous, a sliding window over it (static_patterns.py).
GROUPED = {'neighborhood_grouped': ('neighborhood:1024, dilation 4, grouped', 1024, 4)}


def grouped_plan(kernel, dilation, length):
  segments = group_segment_ids(None, 1, length, dilation)
  return plan_from_mask(masks.causal_window(kernel), q_len=length, block_q=BLOCK, block_kv=BLOCK,
                        segment_ids=segments)


def causal_density(mask, length):
  """Kept pairs over causal pairs: mean visible keys over mean causal keys."""
  return mean_visible_keys(mask & masks.Causal(), length) / mean_visible_keys(masks.Causal(), length)


def tile_density(mask, length):
  """Visited tiles over causal tiles."""
  visited = lambda m: float(density(plan_from_mask(m, q_len=length, block_q=BLOCK, block_kv=BLOCK)).mean())  # noqa: E731
  return visited(mask & masks.Causal()) / visited(masks.Causal())


def draw_grouped(name):
  title, kernel, dilation = GROUPED[name]
  render_plan(grouped_plan(kernel, dilation, T), os.path.join(HERE, f'{name}.png'),
              title=f'{title}: {T} x {T}, blocks {BLOCK}')
  causal = lambda n: float(density(plan_from_mask(masks.Causal(), q_len=n, block_q=BLOCK, block_kv=BLOCK)).mean())  # noqa: E731
  print(name, ' '.join(f'{n}: tiles {float(density(grouped_plan(kernel, dilation, n)).mean()) / causal(n):.4f};'
                       for n in (8192, 32768, 131072)))


if __name__ == '__main__':
  names = sys.argv[1:] or [*PATTERNS, *GROUPED]  # e.g. neighborhood2d: draw only that one
  unknown = [name for name in names if name not in PATTERNS and name not in GROUPED]
  if unknown:
    sys.exit(f'unknown patterns {unknown}; known: {", ".join([*PATTERNS, *GROUPED])}')
  for name in names:
    if name in GROUPED:
      draw_grouped(name)
      continue
    title, pattern = PATTERNS[name]
    plan = plan_from_mask(pattern & masks.Causal(), q_len=T, block_q=BLOCK, block_kv=BLOCK)
    render_plan(plan, os.path.join(HERE, f'{name}.png'), title=f'{title}: {T} x {T}, blocks {BLOCK}')
    lengths = (8192, 32768, 131072) if name != 'bigbird' else (8192,)  # BigBird's mask is built for T
    print(name, ' '.join(f'{n}: elements {causal_density(pattern, n):.4f}, tiles {tile_density(pattern, n):.4f};'
                         for n in lengths))
