"""Sparse long-context fine-tuning of a model imported from Hugging Face
(`python -m sparseformer.cli.import_hf`): its architecture and tokenizer, its weights
through init_from, then sparse layers and a longer context.

    python -m sparseformer.cli.import_hf --model_dir ~/models/Qwen2.5-0.5B --workdir runs/qwen
    python train.py --config configs/hf_finetune.py:runs/qwen --workdir runs/qwen_masformer
    python train.py --config configs/hf_finetune.py:runs/qwen,gated --workdir runs/qwen_gates
    python eval.py --workdir runs/qwen_masformer
    python -m sparseformer.cli.export_hf --workdir runs/qwen_masformer --out exported/

The argument is the imported workdir, optionally followed by a comma and a preset, and
another comma and the fine-tuning length (default 8192): `runs/qwen,masformer,16384`.
Presets:
    (none) or masformer   MASFormer: every 4th layer keeps dense attention, the others a
                          window of seq_len / 8 keys (Zhang et al., 2023: a few full
                          layers and short spans elsewhere); every parameter trains
    gated                 SeerAttention (Gao et al., 2024): gates distilled on the frozen
                          model (only the gates train, LM loss off), 64-token blocks,
                          density 0.2, the dense output during training
    window                every layer a window of seq_len / 8
    dense                 the source's attention, only the context extended
The context: data.seq_len (the length above) on the shipped books, RoPE scaled linearly
(position interpolation) by that length over the source's context (config.json
max_position_embeddings); nothing is scaled when the source already covers it, or when
the source has its own scaling (llama3). Linear scaling is one transformers computes the
same way, so the fine-tuned model exports with export_hf; `yarn`
(--config.model.rope.scaling=yarn) trains but does not export. Give the length in the
argument, not as --config.data.seq_len, so that the window and the RoPE factor follow it.

Expected: not measured on a released model (none can be downloaded here); the CI runs
it on a tiny fixture (tests/test_hf_finetune.py).
"""

import json
import os

from sparseformer.config import from_json, with_preset

SEQ_LEN = 8192
PRESETS = ('masformer', 'gated', 'window', 'dense')


def source_context(workdir):
  """The context length the imported model was trained for (max_position_embeddings)."""
  with open(os.path.join(workdir, 'hf', 'config.json')) as f:
    return int(json.load(f).get('max_position_embeddings') or SEQ_LEN)


def get_config(arg=None):
  if not arg:
    raise ValueError('give the imported workdir: configs/hf_finetune.py:WORKDIR[,PRESET] (see the file)')
  workdir, _, rest = arg.partition(',')
  preset, _, length = rest.partition(',')
  preset = preset or 'masformer'
  if length and not (length.isdigit() and int(length) > 0):
    raise ValueError(f'fine-tuning length {length!r}: give a number of tokens, e.g. {workdir},{preset},16384')
  seq_len = int(length) if length else SEQ_LEN
  if preset not in PRESETS:
    raise ValueError(f'unknown preset {preset!r}; known: {", ".join(PRESETS)}')
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise ValueError(f'{workdir} holds no config.json: import a model with python -m sparseformer.cli.import_hf')
  with open(path) as f:
    c = from_json(f.read(), path)
  c.init_from = workdir
  c.data.name = 'sparseformer_text/books'
  c.data.seq_len = seq_len
  c.model.dtype = 'auto'
  c.model.remat = 'full'
  original = source_context(workdir)
  if c.model.rope.scaling == 'none' and seq_len > original:
    c.model.rope.scaling, c.model.rope.factor = 'linear', seq_len / original
  c.train.steps = 500
  c.train.global_batch_size = 8
  c.train.lr = 2e-5
  c.train.warmup_steps = 50
  c.train.weight_decay = 0.0
  c.train.log_every = 10
  c.train.eval_batches = 4
  c.checkpoint.every_steps = 250
  window = f'window:{max(seq_len // 8, 64)}'
  return with_preset(c, preset, {
      'masformer': {'model.attention.kind': window, 'model.attention.alternate_layers': 'every:4',
                    'model.attention.alternate_kind': 'dense'},
      'window': {'model.attention.kind': window, 'model.attention.alternate_layers': ''},
      'dense': {'model.attention.kind': 'dense', 'model.attention.alternate_layers': ''},
      'gated': {'model.attention.kind': 'gated', 'model.attention.alternate_layers': '',
                'model.attention.block_size': '64', 'model.attention.gate.forward': 'dense',
                'model.attention.gate.distill': 'True', 'model.attention.gate.density': '0.2',
                'train.trainable': '/block_gate/', 'train.lm_loss_weight': '0.0', 'train.lr': '1e-3',
                'train.steps': '200'},
  })
