"""Shared by the end-to-end tests: a tiny run of the default config, in or out of process."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CONFIG = os.path.join(ROOT, 'configs', 'default.py')

TINY = {
    'model.d_model': 32, 'model.num_layers': 2, 'model.num_heads': 2, 'model.num_kv_heads': 1,
    'data.seq_len': 32, 'train.global_batch_size': 4, 'train.steps': 8, 'train.warmup_steps': 2,
    'train.log_every': 1, 'train.eval_batches': 2, 'checkpoint.every_steps': 4,
}


def tiny_argv(workdir, data_dir, **overrides):
  fields = {**TINY, 'data.data_dir': str(data_dir), **{k.replace('__', '.'): v for k, v in overrides.items()}}
  return ['--config', DEFAULT_CONFIG, '--workdir', str(workdir)] + [f'--config.{k}={v}' for k, v in fields.items()]


def run_script(script, argv, env=None, **kwargs):
  """Runs train.py / eval.py in a fresh Python; returns the CompletedProcess."""
  full_env = {**os.environ, 'PYTHONUNBUFFERED': '1', 'SPARSEFORMER_COMPILATION_CACHE': 'off', **(env or {})}
  return subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], env=full_env, cwd=ROOT,
                        capture_output=True, text=True, **kwargs)


def logged_losses(workdir):
  """{step: training loss} from metrics.jsonl."""
  losses = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'train/loss' in record:
        losses[record['step']] = record['train/loss']
  return losses
