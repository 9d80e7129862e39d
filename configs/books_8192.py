"""Dense attention trained from scratch on the shipped books at 8192 tokens: the baseline
and the shared settings of the books comparison (configs/routing_books.py,
configs/dma_books.py and `benchmarks/books_quality.py` start from this file): the model of
configs/long_pretrain.py (8 layers, d_model 512, 8 heads, 2 kv heads, byte tokens), 400
steps of 8 x 8192 tokens, lr 1e-3 with 40 warm-up steps.

    python train.py --config configs/books_8192.py --workdir runs/books_dense
    python eval.py --workdir runs/books_dense

Expected on one H100 (bf16): about 1 minute of training after compiling (0.155 s a step),
validation NLL 1.834 nats/byte-token; see docs/results.md ("Books at 8192 from scratch").
"""

import os

from sparseformer.config import load_config_file


def get_config(arg=None):
  if arg:
    raise ValueError(f'unknown preset {arg!r}; this config has none')
  c = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'long_pretrain.py'))
  c.data.seq_len = 8192
  c.train.steps = 400
  c.train.global_batch_size = 8
  c.train.warmup_steps = 40
  c.train.eval_batches = 1
  c.checkpoint.every_steps = 400
  return c
