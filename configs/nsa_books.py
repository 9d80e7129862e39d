"""Native Sparse Attention (NSA, arXiv 2502.11089) on the shipped books at 8192 tokens,
trained from scratch: every layer `nsa` at the paper's settings (compressed keys of 32
tokens every 16, the top 16 of the 64-token selection blocks with the first and 2 local
ones among them, a window of 512 tokens, the three branches gated per head): up to
511 + 1024 + 512 keys per query, 1683 averaged over the row (dense: 4096); blocks of 64
tokens (the selection blocks are whole kernel blocks); the settings of
configs/books_8192.py otherwise.

    python train.py --config configs/nsa_books.py --workdir runs/nsa_books
    python eval.py --workdir runs/nsa_books

Presets after a colon: `:window` (every layer window:512, the window branch alone) and
`:dense`, for the comparison at equal steps (both with the same 64-token blocks).
Expected: not yet measured (docs/results.md holds the window's and dense's at 400 steps
with window:1024 and 128-token blocks: validation NLL 1.711 and 1.834 nats/byte-token on
one H100).
"""

import os

from sparseformer.config import load_config_file, with_preset


def get_config(arg=None):
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'books_8192.py'))
  c.model.attention.kind = 'nsa'
  c.model.attention.block_size = 64
  return with_preset(c, arg, {
      'window': {'model.attention.kind': 'window:512'},
      'dense': {'model.attention.kind': 'dense'},
  })
