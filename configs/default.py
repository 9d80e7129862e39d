"""The main job: a small byte-level dense LM on tinyshakespeare, trained on one CPU.

    python train.py --config configs/default.py --workdir runs/default
    python eval.py --workdir runs/default

(`bash scripts/main.sh` sets up and runs both.) Expected on a 2-core CPU: about 4 minutes
of training, validation NLL 1.61 nats/byte (2.32 bits/byte) after 600 steps.

Arguments after a colon pick a preset:
    configs/default.py:smoke     a few steps, for a quick check of an installation
"""

from sparseformer.config import base_config


def get_config(arg=None):
  c = base_config()
  c.data.name = 'sparseformer_text/tinyshakespeare'
  c.data.tokenizer = 'byte'
  c.data.seq_len = 128

  c.model.d_model = 128
  c.model.num_layers = 4
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.attention.kind = 'dense'

  c.train.steps = 600
  c.train.global_batch_size = 32
  c.train.lr = 3e-3
  c.train.warmup_steps = 50
  c.train.log_every = 20
  c.checkpoint.every_steps = 200

  if arg == 'smoke':
    c.train.steps = 20
    c.train.warmup_steps = 5
    c.train.eval_batches = 2
    c.checkpoint.every_steps = 10
  elif arg:
    raise ValueError(f'unknown preset {arg!r}; known: smoke')
  return c
