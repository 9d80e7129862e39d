"""InfLLM-V2 (dense-sparse switchable attention, arXiv 2509.24663) on the shipped books at
8192 tokens, continued from a dense checkpoint as the paper trains it (a dense base, then
sparse long-context training with the same parameters: InfLLM-V2 adds none). Every layer
`infllm_v2`: 64-token selection blocks (the paper's) on 64-token kernel blocks, 16 of them
per query block (1024 keys: the document's first block, 2 local blocks and 13 chosen by
each query's softmax over mean-pooled 32-token key spans, stride 16), sparse from 8192
tokens, dense below; the settings of configs/books_8192.py otherwise.

    python train.py --config configs/books_8192.py --workdir runs/dense_8k
    python train.py --config configs/infllm_v2_books.py --workdir runs/infllm_v2_books \\
        --config.init_from=runs/dense_8k
    python eval.py --workdir runs/infllm_v2_books

Without init_from it trains from scratch. Presets after a colon: `:dense` (the same run
dense, the baseline of continued training) and `:window` (every layer window:1024, the
same number of keys).
Expected: not measured yet.
"""

import os

from sparseformer.config import load_config_file, with_preset


def get_config(arg=None):
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'books_8192.py'))
  c.model.attention.kind = 'infllm_v2'
  c.model.attention.block_size = 64
  o = c.model.attention.infllm_v2
  o.select_block, o.select_count, o.local_blocks, o.sparse_from = 64, 16, 2, 8192
  return with_preset(c, arg, {
      'dense': {'model.attention.kind': 'dense'},
      'window': {'model.attention.kind': 'window:1024'},
  })
