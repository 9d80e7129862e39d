"""Routing attention (arXiv 2003.05997) on the shipped books at 8192 tokens, trained from
scratch: `routing:16` at every second layer (4 heads local with a 1024-token window, 4
heads routed over 16 online k-means clusters: shared QK, the causal selection), a
1024-token window at the other layers; the settings of configs/books_8192.py otherwise.

    python train.py --config configs/routing_books.py --workdir runs/routing_books
    python eval.py --workdir runs/routing_books

Presets after a colon: `:local` (every layer window:1024) and `:dense` (every layer
dense), for the comparison at equal steps. Expected on one H100 (bf16): 400 steps of 8 x
8192 tokens in about 2 minutes after compiling, validation NLL 1.749 nats/byte-token
(all-local 1.711, dense 1.834); see docs/results.md ("Books at 8192 from scratch").
`python benchmarks/books_quality.py` runs the same comparison in one command.
"""

import os

from sparseformer.config import load_config_file, with_preset

WINDOW = 1024


def get_config(arg=None):
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'books_8192.py'))
  c.model.attention.kind = f'window:{WINDOW}'
  if arg is None:
    c.model.attention.alternate_kind = 'routing:16'
    c.model.attention.alternate_layers = 'every:2'
    c.model.attention.routing.local_heads = 4
    c.model.attention.routing.local_window = WINDOW
  return with_preset(c, arg, {'local': {}, 'dense': {'model.attention.kind': 'dense'}})
