"""Dynamic mask attention (DMA, arXiv 2508.02124) on the shipped books at 8192 tokens,
trained from scratch: every layer `dynamic_mask:1024` (each query keeps the 1024 keys of
its past with the largest learned score, plus the learned key bias); the settings of
configs/books_8192.py otherwise.

    python train.py --config configs/dma_books.py --workdir runs/dma_books
    python eval.py --workdir runs/dma_books

Presets after a colon: `:window` (every layer window:1024, the same keep budget), `:dense`,
and `:budget` (DMA with block_smooth=budget: whole key blocks, see docs/dynamic_mask.md;
not measured yet), for the comparison at equal steps. Expected on one H100 (bf16): 400 steps of 8 x
8192 tokens in about 1 minute after compiling, validation NLL 2.251 nats/byte-token, worse
than the window (1.711) and dense (1.834): see docs/results.md ("Books at 8192 from
scratch") for why. `python benchmarks/books_quality.py` runs the comparison in one command.
"""

import os

from sparseformer.config import load_config_file, with_preset

WINDOW = 1024


def get_config(arg=None):
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'books_8192.py'))
  c.model.attention.kind = f'dynamic_mask:{WINDOW}'
  return with_preset(c, arg, {
      'window': {'model.attention.kind': f'window:{WINDOW}'},
      'dense': {'model.attention.kind': 'dense'},
      'budget': {'model.attention.dynamic_mask.block_smooth': 'budget'},
  })
