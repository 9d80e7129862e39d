"""Multi-query associative recall (MQAR) alone, as Zoology trains it (HazyResearch/zoology:
2-layer models of d_model 64-256 trained on MQAR only, sequences of 64-512 tokens, up to
64 key-value pairs at 256/512, lr 1e-3 .. 1e-2, loss on the answers only).

Every training row is one MQAR example of data.seq_len tokens (data.task_fraction 1.0,
task_min_len 0) from `sparseformer/evaluation/tasks/mqar.py` (64 pairs, Zoology's vocab
8192 and power-law query placement alpha 0.1); the loss is on the answer tokens only
(data.task_loss 'answers'). Keys and values are 3-letter codes in byte tokens, so a pair
is 8 tokens in the context ('kfa:mqz ') and 8 in its query (' kfa:mqz'): 64 pairs take
1024 tokens with no room between the queries. At 2048 the query region (1536 tokens) is
3 times the queries' tokens, Zoology's layout at 64 pairs and 512 tokens (128 key/value
tokens, then 64 queries in 192 two-token slots). The model: 2 layers, d_model 128, 2
heads, dense attention, a 4-tap short convolution before each attention.

    python train.py --config configs/mqar.py --workdir runs/mqar
    python -m sparseformer.cli.eval_tasks --workdir runs/mqar

The end-of-training evaluation still reads data.eval_split of data.name (tinyshakespeare,
shipped): its NLL says little here; the MQAR accuracy is eval_tasks's (eval.tasks).
Expected: not yet measured (no full run of this config has been made).

Arguments after a colon pick a preset:
    configs/mqar.py:quick     a tiny CPU run of 20 steps (8 pairs at 256 tokens)
"""

from sparseformer.config import base_config, with_preset

PRESETS = {
    'quick': {
        'data.tasks': "('mqar:pairs=8',)", 'eval.tasks': "('mqar:pairs=8',)", 'data.seq_len': '256',
        'model.d_model': '64', 'train.steps': '20', 'train.global_batch_size': '8', 'train.warmup_steps': '5',
        'train.log_every': '5', 'train.eval_batches': '2', 'checkpoint.every_steps': '10',
        'eval.task_lengths': '(256,)', 'eval.task_samples': '2', 'data.workers': '0',
    },
}


def get_config(arg=None):
  c = base_config()
  c.data.name = 'sparseformer_text/tinyshakespeare'  # read only by the end-of-training evaluation
  c.data.tokenizer = 'byte'
  c.data.seq_len = 2048
  c.data.tasks = ('mqar:pairs=64',)
  c.data.task_fraction = 1.0
  c.data.task_min_len = 0
  c.data.task_loss = 'answers'
  c.data.workers = 4  # MQAR rows are made in Python: in threads they, not the GPU, set the pace

  c.model.d_model = 128
  c.model.num_layers = 2
  c.model.num_heads = 2
  c.model.attention.kind = 'dense'
  c.model.short_conv = 4  # previous-token features for free, as Zoology's models have (docs/architecture.md)

  c.train.steps = 20000
  c.train.global_batch_size = 64
  c.train.lr = 3e-3
  c.train.warmup_steps = 500
  c.train.weight_decay = 0.1
  c.train.log_every = 100
  c.train.eval_every = 0
  c.train.eval_batches = 8
  c.checkpoint.every_steps = 2000

  c.eval.tasks = ('mqar:pairs=64',)
  c.eval.task_lengths = (2048,)
  c.eval.task_samples = 64
  return with_preset(c, arg, PRESETS)
