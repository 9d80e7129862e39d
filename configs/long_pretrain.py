"""Short-length pretraining for the long-context experiment of issue 5: every layer dense,
1024-token rows of the shipped Project Gutenberg books. Its checkpoint is what
`configs/long_finetune.py` (MASFormer, `:dense`, `:window`) fine-tunes at 8192.

    python train.py --config configs/long_pretrain.py --workdir runs/pretrain_1024
    python train.py --config configs/long_finetune.py --workdir runs/long \\
        --config.init_from=runs/pretrain_1024

The model fields are those of long_finetune.py (8 layers, d_model 512, 8 heads, 2 kv
heads, byte tokens); keep them equal or init_from refuses the checkpoint.
`python benchmarks/long_context_quality.py --out DIR` runs the whole experiment
(this pretraining, the three fine-tunes, their evaluation) in one command.

Expected on one H100 (bf16): about 110 s, 55 s of it compiling the step, then 0.028 s a step
(1.19M tokens/s); at step 600 training loss 1.43, validation NLL 1.47 nats/byte-token on the
first 32768 validation tokens (measured in the experiment; figures in docs/results.md).
"""

from sparseformer.config import base_config


def get_config(arg=None):
  if arg:
    raise ValueError(f'unknown preset {arg!r}; this config has none')
  c = base_config()
  c.data.name = 'sparseformer_text/books'
  c.data.seq_len = 1024
  c.model.d_model = 512
  c.model.num_layers = 8
  c.model.num_heads = 8
  c.model.num_kv_heads = 2
  c.model.attention.kind = 'dense'
  c.train.steps = 600
  c.train.global_batch_size = 32
  c.train.lr = 1e-3
  c.train.warmup_steps = 50
  c.train.log_every = 10
  c.train.eval_batches = 4
  c.checkpoint.every_steps = 600
  return c
