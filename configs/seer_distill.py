"""SeerAttention gate distillation on a frozen dense checkpoint (issue 6): every layer
`gated`, only the gate parameters train, on the KL to the block-pooled attention map of
the layer's own dense attention; the attention output stays dense while training, so
the model computes exactly what the checkpoint does. Shipped books at 8192 tokens.

    python train.py --config configs/seer_distill.py --workdir runs/seer_gates \\
        --config.init_from=runs/long_quality/dense
    python eval.py --workdir runs/seer_gates --config.model.attention.gate.density=0.1
    python eval.py --workdir runs/seer_gates --config.model.attention.gate.eval_forward=dense

`init_from` must name a dense run of the same model (defaults: those of
configs/long_finetune.py, 8 layers, d_model 512, 8 heads, 2 kv heads, byte tokens, YaRN
from 1024 to 8192, e.g. its `:dense` preset or the `dense` run of
benchmarks/long_context_quality.py); the gate parameters it lacks are initialised and
listed at start. `train.trainable='/block_gate/'` keeps every other parameter
bit-identical; `train.lm_loss_weight=0` leaves the LM loss out of the gradient.
Evaluation attends through the gated plan at `gate.density` (set it on the eval command
line) or, with `gate.eval_forward=dense`, as the base model.

Presets after a colon:
    (none)        distillation, gates evaluated at density 0.2
    :d05 :d02 :d01  the same with gate.density 0.5, 0.2, 0.1 (training stats and eval)
    :joint        joint training instead: the sparse plan in the forward pass, LM loss
                  plus gate KL, every parameter trains (lr 3e-4)
`python benchmarks/seer_quality.py --out DIR` runs dense pretraining, this distillation
and the evaluation at densities 0.5, 0.2, 0.1 in one command.

Expected: not measured yet (the paper's Llama-3.1-8B gates lose < 2% perplexity at
density 0.2 on PG-19 at 8k; issue 6's target is within 3% of dense at 0.2).
"""

from sparseformer.config import base_config, with_preset


def get_config(arg=None):
  c = base_config()
  c.data.name = 'sparseformer_text/books'
  c.data.seq_len = 8192
  c.model.d_model = 512
  c.model.num_layers = 8
  c.model.num_heads = 8
  c.model.num_kv_heads = 2
  c.model.rope.scaling = 'yarn'
  c.model.rope.original_seq_len = 1024
  c.model.rope.factor = 8.0
  c.model.attention.kind = 'gated'
  c.model.attention.block_size = 64
  g = c.model.attention.gate
  g.forward = 'dense'
  g.eval_forward = 'sparse'
  g.distill = True
  g.density = 0.2
  c.train.trainable = '/block_gate/'
  c.train.lm_loss_weight = 0.0
  c.train.steps = 200
  c.train.global_batch_size = 8
  c.train.lr = 1e-3
  c.train.warmup_steps = 20
  c.train.weight_decay = 0.0
  c.train.min_lr_ratio = 0.01
  c.train.log_every = 10
  c.train.eval_batches = 4
  c.checkpoint.every_steps = 100
  return with_preset(c, arg, {
      'd05': {'model.attention.gate.density': '0.5'},
      'd02': {'model.attention.gate.density': '0.2'},
      'd01': {'model.attention.gate.density': '0.1'},
      'joint': {'model.attention.gate.forward': 'sparse', 'train.trainable': '', 'train.lm_loss_weight': '1.0',
                'train.lr': '3e-4', 'train.weight_decay': '0.1', 'model.remat': 'full'},
  })
