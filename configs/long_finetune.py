"""Long-context fine-tuning of a checkpoint pretrained at a short length, on the shipped
Project Gutenberg books (documents far longer than 32k bytes, kept whole up to seq_len).

    python train.py --config configs/long_finetune.py --workdir runs/long \\
        --config.init_from=runs/pretrain_1024
    python eval.py --workdir runs/long          # NLL by position bucket up to seq_len

Parameters come from `init_from` (nothing else: the optimizer, step and data start
fresh). The layer mechanisms may differ from the checkpoint's; parameters it lacks are
initialised and listed, parameters that do not fit are an error. RoPE is rescaled with
YaRN from `model.rope.original_seq_len` (set it to the checkpoint's training length) to
`data.seq_len`; the scaling is part of the run's config.json, which eval reads back.

Presets after a colon choose the attention of every layer:
    (none)      MASFormer: dense at every 4th layer, a 1024-token window elsewhere
    :dense      every layer dense
    :window     every layer a 1024-token window
The model fields must match the checkpoint (defaults: 8 layers, d_model 512, 8 heads,
2 kv heads, byte tokens), those of configs/long_pretrain.py. Measured on one H100 (bf16,
200 steps, without remat; docs/results.md): 0.054 s a step for MASFormer, 0.075 dense,
0.047 window, plus about 55 s of compilation; validation NLL 1.561 nats/byte-token for all
three (`benchmarks/long_context_quality.py` runs the whole comparison).
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
  c.model.remat = 'full'
  c.model.attention.kind = 'window:1024'
  c.model.attention.alternate_layers = 'every:4'
  c.model.rope.scaling = 'yarn'
  c.model.rope.original_seq_len = 1024
  c.model.rope.factor = 8.0
  c.train.steps = 500
  c.train.global_batch_size = 8
  c.train.lr = 3e-4
  c.train.warmup_steps = 50
  c.train.log_every = 10
  c.checkpoint.every_steps = 250
  return with_preset(c, arg, {
      'dense': {'model.attention.kind': 'dense', 'model.attention.alternate_layers': ''},
      'window': {'model.attention.alternate_layers': ''},
  })
