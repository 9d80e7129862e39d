"""End to end: training, eval perplexity, divergence, fine-tuning starts, and the one-line
errors for bad input. Resuming after SIGKILL or SIGTERM: test_resume.py."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from sparseformer import data
from sparseformer.cli.eval import eval_command, load_run_config
from sparseformer.cli.main import run_command
from sparseformer.cli.train import train_command
from sparseformer.distributed import host_device_flags
from sparseformer.training.checkpoint import Checkpointer
from sparseformer.training.setup import prepare_run
from sparseformer.training.state import abstract_model_arrays
from train_helpers import ROOT, logged_losses, run_in_process, run_script, tiny_argv


def test_training_reduces_loss_and_writes_the_workdir(tmp_path, data_dir):
  workdir = tmp_path / 'run'
  assert run_command(train_command, tiny_argv(workdir, data_dir, train__steps=30, train__lr=1e-2)) == 0
  losses = logged_losses(workdir)
  assert sorted(losses) == list(range(1, 31))
  assert np.mean([losses[s] for s in range(26, 31)]) < losses[1] - 1.0
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['24', '28', '30']  # every 4 steps + the end, keep 3
  assert {'config.json', 'checkpoints', 'tb', 'metrics.jsonl'} <= set(os.listdir(workdir))
  saved = json.loads((workdir / 'config.json').read_text())
  assert saved['config']['train']['steps'] == 30
  record = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert {'train/loss', 'train/perplexity', 'train/learning_rate', 'train/grad_norm', 'train/tokens_per_second',
          'train/step_time'} <= set(record[0])
  assert any('eval/validation/perplexity' in r for r in record)


def test_eval_perplexity_is_exp_of_mean_token_nll(tmp_path, data_dir, capsys):
  workdir = tmp_path / 'run'
  assert run_command(train_command, tiny_argv(workdir, data_dir, train__steps=4)) == 0
  assert run_command(eval_command, ['--workdir', str(workdir), '--config.eval.max_batches=3']) == 0
  report = json.loads((workdir / 'eval' / 'sparseformer_text-tinyshakespeare_validation_step4_len32.json').read_text())
  assert (workdir / 'eval' / 'sparseformer_text-tinyshakespeare_validation_step4_len32.png').stat().st_size > 1000

  # Independent computation: plain logits from the restored parameters, NLL in float64.
  cfg = load_run_config(str(workdir))
  setup = prepare_run(cfg)
  model_arrays = Checkpointer(str(workdir / 'checkpoints'), keep=1, async_save=False, read_only=True).restore_model(
      4, abstract_model_arrays(setup.spec))
  model = nnx.merge(setup.spec.graphdef, model_arrays['params'], model_arrays['mechanism_state'])
  nll_sum, tokens = 0.0, 0
  for batch in data.eval_batches(cfg.data, split='validation', seq_len=32, batch_size=4, max_batches=3):
    logits, _ = model(batch['tokens'], batch['positions'], batch['segment_ids'])
    logits = np.asarray(logits, np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    target_log_probs = np.take_along_axis(log_probs, batch['targets'][..., None], -1)[..., 0]
    nll_sum += float(-(target_log_probs * batch['loss_mask']).sum())
    tokens += int(batch['loss_mask'].sum())
  assert report['tokens'] == tokens
  np.testing.assert_allclose(report['nll'], nll_sum / tokens, rtol=1e-5)
  np.testing.assert_allclose(report['perplexity'], math.exp(nll_sum / tokens), rtol=1e-5)
  buckets = report['position_buckets']
  assert sum(b['tokens'] for b in buckets) == tokens and buckets[0]['start'] == 0 and buckets[-1]['end'] == 32


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, capsys):
  workdir = tmp_path / 'run'
  result = run_in_process(train_command, tiny_argv(workdir, data_dir, train__lr=1e30, train__warmup_steps=0,
                                            train__grad_clip=0.0, checkpoint__every_steps=1), capsys)
  assert result.returncode == 1, result.stderr
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith('error: non-finite loss') and 'at step' in message
  bad_step = int(message.split('at step ')[1].split(';')[0])
  saved = sorted(int(s) for s in os.listdir(workdir / 'checkpoints') if s.isdigit())
  assert saved and max(saved) == bad_step - 1
  evaluated = run_in_process(eval_command, ['--workdir', str(workdir), '--config.eval.max_batches=1'], capsys)
  assert evaluated.returncode == 0, evaluated.stderr


def test_tensorflow_is_never_imported(tmp_path, data_dir):
  code = ('import sys; from sparseformer.cli.train import train_command; from sparseformer.cli.main import run_command;'
          f'code = run_command(train_command, {tiny_argv(tmp_path / "run", data_dir, train__steps=2)!r});'
          'assert code == 0; print("tensorflow" in sys.modules, any(m.startswith("tensorflow.") or m == "tensorflow" for m in sys.modules))')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, 'PYTHONPATH': ROOT})
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip().splitlines()[-1] == 'False False'


def assert_one_line_error(result, fragment, workdir=None):
  assert result.returncode == 2, (result.returncode, result.stderr)
  lines = result.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: ') and fragment in lines[0], result.stderr
  if workdir is not None:
    assert not os.path.exists(workdir)


@pytest.mark.parametrize('overrides,fragment,child', [
    ({'train__lrr': '1'}, "did you mean 'train.lr'", False),
    ({'train__steps': 'ten'}, 'expected int', False),
    # One case through train.py in a fresh Python: the command line itself prints only the one line.
    ({'data__name': 'sparseformer_text/tinyshakespear'}, 'tinyshakespeare', True),
    ({'data__name': 'pg19'}, 'pg19', False),
    ({'train__grad_accum_steps': 3}, 'grad_accum_steps', False),
])
def test_bad_input_is_one_line_exit_2_and_no_workdir(tmp_path, data_dir, capsys, overrides, fragment, child):
  workdir = tmp_path / 'never'
  argv = tiny_argv(workdir, data_dir, **overrides)
  result = run_script('train.py', argv) if child else run_in_process(train_command, argv, capsys)
  assert_one_line_error(result, fragment, workdir)


def test_batch_inconsistent_with_the_mesh(tmp_path, data_dir):
  workdir = tmp_path / 'never'
  result = run_script('train.py', tiny_argv(workdir, data_dir, train__global_batch_size=3),
                      env={'XLA_FLAGS': host_device_flags(2, os.environ.get('XLA_FLAGS', ''))})
  assert_one_line_error(result, 'not divisible by the 2 batch shards', workdir)


def test_checkpoint_that_does_not_match_the_model(tmp_path, data_dir, capsys):
  workdir = tmp_path / 'run'
  assert run_in_process(train_command, tiny_argv(workdir, data_dir, train__steps=4), capsys).returncode == 0
  resumed = run_in_process(train_command, tiny_argv(workdir, data_dir, train__steps=8, model__d_model=48), capsys)
  assert_one_line_error(resumed, 'does not match the model')
  finetune = tmp_path / 'finetune'
  started = run_in_process(train_command, tiny_argv(finetune, data_dir, model__d_model=48, init_from=str(workdir)),
                           capsys)
  assert_one_line_error(started, 'do not fit the model', finetune)


def test_init_from_loads_parameters_only(tmp_path, data_dir, capsys):
  source, target = tmp_path / 'source', tmp_path / 'target'
  assert run_in_process(train_command, tiny_argv(source, data_dir, train__steps=4), capsys).returncode == 0
  result = run_in_process(train_command, tiny_argv(target, data_dir, train__steps=1, train__lr=1e-9,
                                                   train__warmup_steps=0, init_from=str(source)), capsys)
  assert result.returncode == 0, result.stderr
  assert 'loaded' in result.stdout and 'resumed' not in result.stdout
  # One step at a negligible learning rate: the parameters are the source's.
  setup_cfg = load_run_config(str(target))
  setup = prepare_run(setup_cfg)
  restore = lambda d, s: Checkpointer(str(d / 'checkpoints'), keep=1, async_save=False, read_only=True).restore_model(
      s, abstract_model_arrays(setup.spec))
  before, after = restore(source, 4), restore(target, 1)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6), before['params'], after['params'])
