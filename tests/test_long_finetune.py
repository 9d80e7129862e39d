"""Fine-tuning a checkpoint at another length with other layer mechanisms and RoPE scaling:
shared parameters restore exactly, and the fine-tuned run trains and evaluates."""

import json
import os

import jax
import numpy as np
from train_helpers import init_from_parameters, run_script, tiny_argv

from sparseformer.cli.eval import load_run_config

MIXED_SPAN = "('window:8', 'dense')"


def test_finetune_with_another_spec_and_length_restores_shared_parameters_exactly(tmp_path, data_dir):
  source = tmp_path / 'source'
  assert run_script('train.py', tiny_argv(source, data_dir, train__steps=4)).returncode == 0
  cfg = load_run_config(str(source))
  cfg.model.layer_attention = ('window:8', 'dense')
  cfg.data.seq_len = 64
  cfg.model.rope.scaling, cfg.model.rope.factor = 'linear', 2.0
  report, loaded, saved = init_from_parameters(cfg, source, 4)
  assert report['loaded'] and not report['initialised'] and not report['skipped']
  jax.tree.map(np.testing.assert_array_equal, saved, loaded)


def test_finetuned_mixed_span_run_trains_and_evaluates_at_its_length(tmp_path, data_dir):
  source, target = tmp_path / 'source', tmp_path / 'target'
  assert run_script('train.py', tiny_argv(source, data_dir, train__steps=4)).returncode == 0
  result = run_script('train.py', tiny_argv(target, data_dir, train__steps=2, data__seq_len=64,
                                            model__layer_attention=MIXED_SPAN, model__rope__scaling='linear',
                                            model__rope__factor=2.0, init_from=str(source)))
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'initialised 0 fresh' in result.stdout
  evaluated = run_script('eval.py', ['--workdir', str(target), '--config.eval.max_batches=2'])
  assert evaluated.returncode == 0, evaluated.stderr[-2000:]
  outputs = [name for name in os.listdir(target / 'eval') if name.endswith('.json')]
  with open(target / 'eval' / outputs[0]) as f:
    report = json.load(f)
  assert outputs == ['sparseformer_text-tinyshakespeare_validation_step2_len64.json'] and np.isfinite(report['nll'])
