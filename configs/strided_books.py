"""Strided attention (Sparse Transformer, arXiv 1904.10509) on the shipped books at 8192
tokens, trained from scratch: every layer `strided:1024` (each query block of 128 tokens
sees its own and the 7 blocks before it, and every 8th block before them: 15 of the 64
blocks at the end of the row, 34% of the causal tiles over the row); the settings of
configs/books_8192.py otherwise.

    python train.py --config configs/strided_books.py --workdir runs/strided_books
    python eval.py --workdir runs/strided_books

Presets after a colon: `:window` (every layer window:1024, the strided pattern's local
part alone) and `:dense`, for the comparison at equal steps.
Expected: not measured yet (docs/results.md holds the window's and dense's at 400 steps:
validation NLL 1.711 and 1.834 nats/byte-token on one H100).
"""

import os

from sparseformer.config import load_config_file, with_preset

STRIDE = 1024


def get_config(arg=None):
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'books_8192.py'))
  c.model.attention.kind = f'strided:{STRIDE}'
  return with_preset(c, arg, {
      'window': {'model.attention.kind': f'window:{STRIDE}'},
      'dense': {'model.attention.kind': 'dense'},
  })
