"""benchmarks/long_context_quality.py: the --quick run end to end on the CPU (pretrain, three
fine-tunes from one checkpoint, their evaluation, one table), and the table's arithmetic."""

import json
import math
import os
import subprocess
import sys

import pytest

from train_helpers import child_env

from benchmarks import long_context_quality as experiment

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_config(workdir):
  with open(os.path.join(workdir, 'config.json')) as f:
    return json.load(f)['config']


@pytest.mark.slow  # three fine-tunes on the CPU (45 s): bash scripts/test.sh -m slow
def test_quick_run_fine_tunes_three_variants_from_one_checkpoint_and_tabulates_them(tmp_path):
  out = tmp_path / 'experiment'
  env = child_env()
  result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'long_context_quality.py'), '--quick',
                           '--out', str(out), '--data_dir', str(tmp_path / 'tfds')],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.count(f'init_from {out}/pretrain/checkpoints/8: loaded') == 3
  assert result.stdout.count('initialised 0 fresh') == 3

  results = json.loads((out / 'results.json').read_text())
  assert set(results['variants']) == {'dense', 'masformer', 'window'}
  for name, variant in results['variants'].items():
    evaluation = variant['eval']
    assert evaluation['seq_len'] == 512 and evaluation['step'] == 3, name
    assert math.isfinite(evaluation['nll']) and 0 < evaluation['nll'] < 10, name
    last = evaluation['position_buckets'][-1]
    assert (last['start'], last['end']) == (256, 512), name
    assert all(math.isfinite(b['nll']) for b in evaluation['position_buckets']), name
  assert all(0.5 < value < 2 for value in results['ratios'].values())

  attention = {name: run_config(out / name)['model']['attention'] for name in results['variants']}
  assert (attention['dense']['kind'], attention['dense']['full_layers']) == ('dense', '')
  assert (attention['masformer']['kind'], attention['masformer']['full_layers']) == ('window:64', 'every:2')
  assert (attention['window']['kind'], attention['window']['full_layers']) == ('window:64', '')
  rope = run_config(out / 'window')['model']['rope']
  assert (rope['scaling'], rope['original_seq_len'], rope['factor']) == ('yarn', 128, 4.0)

  table = (out / 'results.md').read_text()
  assert table.count('| overall |') == 1 and '| [256, 512) |' in table
  assert result.stdout.count('| positions | dense | MASFormer | window | MASFormer/dense | window/dense |') == 1


def fake_results(dense, masformer, window):
  """Results with one bucket [0, 1) whose NLL equals the overall NLL."""
  def variant(nll):
    return {'eval': {'nll': nll, 'position_buckets': [{'start': 0, 'end': 1, 'tokens': 1, 'nll': nll}]}}
  return {'variants': {'dense': variant(dense), 'masformer': variant(masformer), 'window': variant(window)}}


def test_table_rows_divide_each_variant_by_dense():
  rows = experiment.comparison_rows(fake_results(2.0, 2.06, 2.5))
  assert [label for label, *_ in rows] == ['overall', '[0, 1)']
  label, nll, masformer_ratio, window_ratio = rows[0]
  assert nll == {'dense': 2.0, 'masformer': 2.06, 'window': 2.5}
  assert math.isclose(masformer_ratio, 1.03) and math.isclose(window_ratio, 1.25)
  assert '| overall | 2.0000 | 2.0600 | 2.5000 | 1.0300 | 1.2500 |' in experiment.markdown_table(fake_results(2.0, 2.06, 2.5))


def test_empty_bucket_shows_as_not_available():
  results = fake_results(2.0, 2.0, 2.0)
  results['variants']['window']['eval']['position_buckets'][0]['nll'] = None
  assert '| [0, 1) | 2.0000 | 2.0000 | n/a | 1.0000 | n/a |' in experiment.markdown_table(results)


def test_fine_tunes_differ_only_in_attention():
  args = experiment.parse_args(['--out', 'unused'])
  overrides = {name: experiment.finetune_overrides(args, name, 'pretrain') for name, _, _ in experiment.VARIANTS}
  assert 'model.attention.kind' not in overrides['dense']
  assert overrides['masformer'] == overrides['window'] == {**overrides['dense'], 'model.attention.kind': 'window:1024'}
  assert overrides['dense']['model.rope.factor'] == 8.0 and overrides['dense']['model.rope.original_seq_len'] == 1024
