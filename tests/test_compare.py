"""The comparison command: suites, equal budgets, and the :quick preset end to end."""

import json
import os
import subprocess
import sys

import pytest

from sparseformer.cli import compare
from sparseformer.cli.compare_report import describe_layers, frontier, task_mix
from sparseformer.errors import UserError
from tests.train_helpers import ROOT, child_env

MQAR_SUITE = os.path.join(ROOT, 'configs', 'compare', 'mqar.py')
RETRIEVAL_SUITE = os.path.join(ROOT, 'configs', 'compare', 'retrieval.py')
CONVERT_SUITE = os.path.join(ROOT, 'configs', 'compare', 'convert.py')


def quick_suite():
  return compare.load_suite(MQAR_SUITE + ':quick', {})


def test_arms_may_change_only_the_model():
  suite = quick_suite()
  with pytest.raises(UserError, match='only model'):
    compare.arm_config(suite.run, 'faster', {'train.steps': 1})
  with pytest.raises(UserError, match='did you mean'):
    compare.arm_config(suite.run, 'typo', {'model.attention.kindd': 'dense'})
  with pytest.raises(UserError, match='expected str'):
    compare.arm_config(suite.run, 'typed', {'model.attention.kind': 3})
  with pytest.raises(UserError, match='arm bad: model.attention.kind'):
    compare.arm_config(suite.run, 'bad', {'model.attention.kind': 'window'})


def test_parameter_budgets_are_enforced_and_matched():
  suite = quick_suite()
  run = suite.run
  dense = compare.arm_config(run, 'dense', {})
  wide = compare.arm_config(run, 'wide', {'model.mlp_dim': 512})
  budgets = {'dense': compare.arm_budget(dense), 'wide': compare.arm_budget(wide)}
  with pytest.raises(UserError, match=r'arm wide has .* parameters, \+\d'):
    compare.check_param_budget(budgets, 0.03)
  matched = compare.matched_mlp_config(wide, 'wide', budgets['dense']['params'])
  assert abs(compare.arm_budget(matched)['params'] / budgets['dense']['params'] - 1) <= compare.MATCH_WITHIN
  gated = compare.arm_config(run, 'gated', {'model.attention.kind': 'gated', 'model.attention.gate.width': 128})
  assert compare.arm_budget(gated)['params'] > budgets['dense']['params'] * 1.03  # the gate costs parameters
  matched = compare.matched_mlp_config(gated, 'gated', budgets['dense']['params'])
  assert matched.model.mlp_dim < compare.arm_budget(gated)['mlp_dim']


def test_suite_overrides_and_errors(tmp_path):
  suite = compare.load_suite(MQAR_SUITE + ':quick', {'run.train.steps': '7', 'param_tolerance': '0.2'})
  assert suite.run.train.steps == 7 and suite.param_tolerance == 0.2
  with pytest.raises(UserError, match='run fields are --config.run.FIELD'):
    compare.load_suite(MQAR_SUITE + ':quick', {'train.steps': '7'})
  with pytest.raises(UserError, match='no arm'):
    compare.selected_arms(suite, 'dense,windw')
  broken = tmp_path / 'broken.py'
  broken.write_text('import ml_collections\ndef get_config(arg=None):\n  c = ml_collections.ConfigDict()\n'
                    '  c.arms = ()\n  return c\n')
  with pytest.raises(UserError, match='missing'):
    compare.load_suite(str(broken), {})


@pytest.mark.parametrize('suite', [MQAR_SUITE, RETRIEVAL_SUITE])
def test_shipped_suites_hold_equal_budgets(suite):
  """Every arm of the full suites validates and stays within the parameter tolerance
  once matched (no training: abstract shapes only)."""
  loaded = compare.load_suite(suite, {})
  configs = {name: compare.arm_config(loaded.run, name, changes) for name, changes in loaded.arms}
  assert set(configs) == {'dense', 'window', 'masformer', 'gated', 'dma', 'routing', 'sse_h', 'gla_h',
                          'nsa', 'moba', 'infllm_v2', 'power', 'neighborhood', 'fixed', 'radial', 'bigbird'}
  target = compare.arm_budget(configs['dense'])['params']
  budgets = {n: compare.arm_budget(compare.matched_mlp_config(c, n, target)) for n, c in configs.items()}
  compare.check_param_budget(budgets, loaded.param_tolerance)
  flops = {n: b['attention_flops_per_token'] for n, b in budgets.items()}
  assert min(flops, key=flops.get) != 'dense' and max(flops, key=flops.get) == 'dense'


def test_frontier_plot_of_runs_without_step_times(tmp_path):
  """A smoke run of one step has no step time after the compiling step: the plot leaves
  those arms off the time panel instead of failing on an empty log axis."""
  from sparseformer.cli.compare_report import plot_frontier
  arm = {'attention_flops_per_token': 4e6, 'train': {'compute_time_s': None, 'step_time_s': None},
         'nll': {'nll': 5.1}, 'tasks': None}
  plot_frontier({'suite': 'smoke', 'arms': {'a': arm, 'b': dict(arm, attention_flops_per_token=8e6)}},
                str(tmp_path / 'frontier.png'))
  assert (tmp_path / 'frontier.png').stat().st_size > 1000


def test_depth_table_shows_where_each_arm_finds_the_needle():
  """One row per (task, arm), the accuracy at each depth per length, averaged over seeds;
  tasks scored at one depth (MQAR) are left out."""
  from sparseformer.cli.compare_report import depth_table

  def run(passkey_8k):
    return {'tasks': {'tasks': {
        'passkey': {'depths': [0.0, 0.5, 1.0], 'lengths': {'4096': {'accuracy_by_depth': [1.0, 0.5, 0.0]},
                                                           '8192': {'accuracy_by_depth': passkey_8k}}},
        'mqar:pairs=8': {'depths': [0.0], 'lengths': {'4096': {'accuracy_by_depth': [0.3]}}}}}}
  arms = {'dense': {'seed_runs': [run([1.0, 1.0, 0.0]), run([0.0, 1.0, 1.0])]}, 'window': run([0.0, 0.0, 1.0])}
  lines = depth_table({'arms': arms}).splitlines()
  assert lines[0] == '| task (depths) | arm | @ 4096 | @ 8192 |'
  assert lines[2:] == ['| passkey (0%, 50%, 100%) | dense | 1.00 0.50 0.00 | 0.50 1.00 0.50 |',
                       '| passkey (0%, 50%, 100%) | window | 1.00 0.50 0.00 | 0.00 0.00 1.00 |']
  assert depth_table({'arms': {'a': {'tasks': None}}}) == ''


def test_frontier_keeps_only_undominated_points():
  points = [(1.0, 0.5, 'a'), (2.0, 0.4, 'b'), (3.0, 0.9, 'c'), (4.0, 0.9, 'd')]
  assert [p[2] for p in frontier(points, higher_is_better=True)] == ['a', 'c']
  assert [p[2] for p in frontier(points, higher_is_better=False)] == ['a', 'b']
  tied = [(1.0, 0.2, 'worse'), (1.0, 0.5, 'better'), (2.0, 0.6, 'c')]
  assert [p[2] for p in frontier(tied, higher_is_better=True)] == ['better', 'c']
  assert describe_layers(['window:64', 'window:64', 'dense']) == 'window:64 x2, dense'


def test_an_arm_stopped_before_its_last_step_is_not_evaluated(tmp_path, monkeypatch):
  """A SIGTERM stops train() with a checkpoint before the last step: the arm must not be
  evaluated or saved as done, so that the relaunch trains on."""
  from sparseformer.training import trainer
  suite = quick_suite()
  cfg = compare.arm_config(suite.run, 'dense', {})
  monkeypatch.setattr(trainer, 'train', lambda cfg, workdir, log: os.makedirs(os.path.join(workdir, 'checkpoints', '2')))
  monkeypatch.setattr(compare, 'evaluate_nll', lambda *a: pytest.fail('evaluated a stopped arm'))
  with pytest.raises(compare.ArmStopped, match='stopped at step 2 of 3'):
    compare.run_arm('dense', cfg, str(tmp_path), log=lambda *a: None)
  assert not (tmp_path / 'dense' / 'compare.json').exists()


def run_compare(argv, timeout=400):
  return subprocess.run([sys.executable, '-m', 'sparseformer.cli.compare', *argv], env=child_env(), cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # 25 s: two arms trained; the table and report tests above run by default
@pytest.mark.time_limit(600)
def test_quick_comparison_trains_two_arms_and_writes_the_table_and_plot(tmp_path, data_dir):
  workdir = tmp_path / 'compare'
  argv = ['--config', MQAR_SUITE + ':quick', '--workdir', str(workdir), f'--config.run.data.data_dir={data_dir}']
  done = run_compare(argv)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  results = json.loads((workdir / 'results.json').read_text())
  assert list(results['arms']) == ['dense', 'window']
  for name, arm in results['arms'].items():
    assert (workdir / name / 'checkpoints' / '3').is_dir()
    assert arm['train']['step_time_s'] > 0 and arm['nll'] is None  # the MQAR suite scores no NLL
    assert 0 <= arm['train']['data_time_s'] < arm['train']['step_time_s'] and arm['train']['compute_time_s'] > 0
    assert arm['tasks'] is not None and arm['attention_flops_per_token'] > 0
  assert results['arms']['window']['attention_flops_per_token'] < results['arms']['dense']['attention_flops_per_token']
  table = (workdir / 'results.md').read_text()
  assert '| dense |' in table and '| window |' in table and 'mqar' in table
  assert (workdir / 'frontier.png').stat().st_size > 1000
  # A rerun trains and evaluates nothing again.
  again = run_compare(argv)
  assert again.returncode == 0, again.stderr[-3000:]
  assert again.stdout.count('are saved, not re-evaluated') == 2
  # A second seed of one arm: its own workdir, and the table averages the arm's seeds.
  seeded = run_compare(argv + ['--arms', 'dense', '--seeds', '1'])
  assert seeded.returncode == 0, seeded.stdout[-3000:] + seeded.stderr[-3000:]
  assert (workdir / 'dense.seed1' / 'checkpoints' / '3').is_dir()
  results = json.loads((workdir / 'results.json').read_text())
  assert [run['seed'] for run in results['arms']['dense']['seed_runs']] == [0, 1]
  assert [run['seed'] for run in results['arms']['window']['seed_runs']] == [0]
  assert ' ± ' in (workdir / 'results.md').read_text()
  # Progressive length: a second comparison whose arms start from these arms.
  longer = tmp_path / 'longer'
  continued = run_compare(['--config', MQAR_SUITE + ':quick', '--workdir', str(longer), '--arms', 'dense',
                           '--from-arms', str(workdir), f'--config.run.data.data_dir={data_dir}'])
  assert continued.returncode == 0, continued.stdout[-3000:] + continued.stderr[-3000:]
  assert f'init_from {workdir}/dense/checkpoints/3: loaded' in continued.stdout
  assert json.loads((longer / 'dense' / 'config.json').read_text())['config']['init_from'] == str(workdir / 'dense')
  assert f'its namesake in `{workdir}`' in (longer / 'results.md').read_text()


@pytest.mark.parametrize('suite', [MQAR_SUITE + p for p in ('', ':2k', ':8k', ':512', ':quick')]
                         + [RETRIEVAL_SUITE + p for p in ('', ':quick')] + [CONVERT_SUITE + p for p in ('', ':quick')])
def test_every_suite_preset_makes_its_training_rows_and_evaluation_examples(suite):
  """Each arm validates, and every task the suite trains or scores fits its length (a task
  too long for its row would otherwise fail only when that arm starts)."""
  from sparseformer.data import make_tokenizer
  from sparseformer.data.task_rows import TaskDocuments
  from sparseformer.evaluation.tasks import encode, make_example
  loaded = compare.load_suite(suite, {})
  for name, changes in loaded.arms:
    compare.arm_config(loaded.run, name, changes)
  run, tokenizer = loaded.run, make_tokenizer(loaded.run.data.tokenizer)
  if run.data.tasks:
    TaskDocuments(run.data.tasks, tokenizer, seq_len=run.data.seq_len, min_len=run.data.task_min_len,
                  task_loss=run.data.task_loss, seed=0).check()
  wanted = [(spec, length) for spec in run.eval.tasks for length in run.eval.task_lengths or (run.data.seq_len,)]
  for spec, length in wanted:
    assert len(encode(make_example(spec, tokenizer, length, split='validation'), tokenizer).tokens) <= length


def test_the_report_writes_a_repeated_training_spec_once_with_its_count():
  specs = ('mqar:pairs=32,vocab=676@512',) * 16 + ('mqar:pairs=64,vocab=676', 'mqar:pairs=128,vocab=676')
  assert task_mix(specs) == 'mqar:pairs=32,vocab=676@512 x16, mqar:pairs=64,vocab=676, mqar:pairs=128,vocab=676'


def test_seeds_parse_and_name_their_workdirs():
  assert compare.parse_seeds('', 7) == (7,)
  assert compare.parse_seeds('0,2,1,2', 7) == (0, 2, 1)
  for bad in ('a', '1,-2', ','):
    with pytest.raises(UserError, match='--seeds .*non-negative integers'):
      compare.parse_seeds(bad, 0)
  assert compare.seed_dir_name('dense', 0, 0) == 'dense' and compare.seed_dir_name('dense', 3, 0) == 'dense.seed3'
  assert compare.seeded(quick_suite().run, 5).seed == 5


def saved_arm(workdir, entry, score, step_ms):
  os.makedirs(workdir / entry)
  tasks = {'tasks': {'mqar:pairs=8,vocab=676': {'lengths': {'256': {'score': score}}}}}
  train = {'step_time_s': step_ms / 1e3, 'data_time_s': 0.0, 'compute_time_s': step_ms / 1e3, 'tokens_per_s': 1.0,
           'final_train_loss': 1.0}
  (workdir / entry / 'compare.json').write_text(json.dumps({'step': 3, 'train': train, 'nll': None, 'tasks': tasks}))


def test_the_table_gives_the_mean_and_deviation_over_each_arms_seeds(tmp_path):
  from sparseformer.cli.compare_report import report_markdown
  suite = quick_suite()
  names = [name for name, _ in suite.arms]
  configs = {name: compare.arm_config(suite.run, name, changes) for name, changes in suite.arms}
  budgets = {name: {**compare.arm_budget(configs[name]), 'params_vs_first': 0.0} for name in names}
  saved_arm(tmp_path, 'dense', 0.2, 10)
  saved_arm(tmp_path, 'dense.seed1', 0.4, 20)
  saved_arm(tmp_path, 'dense.seed2', 0.6, 30)
  saved_arm(tmp_path, 'window', 0.1, 5)
  saved_arm(tmp_path, 'window.seedx', 0.9, 5)  # not a seed directory: ignored
  results = compare.collect(suite, configs, budgets, str(tmp_path), 'quick')
  dense = results['arms']['dense']
  assert [run['seed'] for run in dense['seed_runs']] == [0, 1, 2]
  assert dense['train']['compute_time_s'] == pytest.approx(0.020)
  assert results['settings']['seeds'] == [0, 1, 2]
  table = report_markdown(results)
  assert '| dense | 0.400 ± 0.200 |' in table and '| window | 0.100 |' in table
  assert 'seeds 0, 1, 2 (each figure the mean' in table


def test_a_base_run_needs_unresized_arms_and_its_own_name(tmp_path):
  full = compare.load_suite(CONVERT_SUITE, {})
  budgets = {compare.BASE: compare.arm_budget(full.base),
             **{n: compare.arm_budget(compare.arm_config(full.run, n, c)) for n, c in full.arms}}
  compare.check_param_budget(budgets, full.param_tolerance)  # the full suite's arms fit its tolerance
  suite = compare.load_suite(CONVERT_SUITE + ':quick', {'base.train.steps': '5', 'run.train.steps': '4'})
  assert suite.base.train.steps == 5 and suite.run.train.steps == 4
  assert compare.selected_arms(suite, '') == ['dense', 'moba', 'base']
  with pytest.raises(UserError, match="the base's --config.base.FIELD"):
    compare.load_suite(CONVERT_SUITE + ':quick', {'bse.train.steps': '5'})
  source = open(CONVERT_SUITE).read().replace("os.path.dirname(os.path.abspath(__file__))",
                                             repr(os.path.dirname(CONVERT_SUITE)))
  for index, (change, replacement, message) in enumerate((
      ('suite.match_params = False', 'suite.match_params = True', 'needs match_params False'),
      ('names=names)', "names=names) + (('base', {}),)", "'base' is the base run's name"))):
    broken = tmp_path / f'broken_{index}.py'
    broken.write_text(source.replace(change, replacement))
    with pytest.raises(UserError, match=message):
      compare.load_suite(str(broken) + ':quick', {})


@pytest.mark.slow  # 30 s: a base and two arms trained
@pytest.mark.time_limit(600)
def test_arms_continue_from_the_base_run(tmp_path, data_dir):
  workdir = tmp_path / 'convert'
  argv = ['--config', CONVERT_SUITE + ':quick', '--workdir', str(workdir), f'--config.run.data.data_dir={data_dir}',
          f'--config.base.data.data_dir={data_dir}']
  done = run_compare(argv)
  assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
  assert done.stdout.count(f'init_from {workdir}/base/checkpoints/3: loaded') == 2
  assert 'initialised 0 fresh' in done.stdout
  results = json.loads((workdir / 'results.json').read_text())
  assert list(results['arms']) == ['base', 'dense', 'moba'] and results['base_config']['train']['steps'] == 3
  for name in ('dense', 'moba'):
    assert json.loads((workdir / name / 'config.json').read_text())['config']['init_from'] == str(workdir / 'base')
    assert (workdir / name / 'checkpoints' / '2').is_dir()
  assert 'Every arm starts from the parameters of the base run' in (workdir / 'results.md').read_text()


def test_arms_continue_only_from_arms_trained_in_the_earlier_workdir(tmp_path):
  (tmp_path / 'dense' / 'checkpoints').mkdir(parents=True)
  dirs = compare.earlier_arm_dirs(str(tmp_path), ['dense'], (0,), 0)
  assert dirs == {('dense', 0): str(tmp_path / 'dense')}
  with pytest.raises(UserError, match=r'no trained arm window, window.seed1, dense.seed1 there'):
    compare.earlier_arm_dirs(str(tmp_path), ['window', 'dense'], (0, 1), 0)
  with pytest.raises(UserError, match='has a base run'):
    compare.compare_command(['--config', CONVERT_SUITE + ':quick', '--workdir', str(tmp_path / 'x'),
                             '--from-arms', str(tmp_path)])


@pytest.mark.slow  # 25 s: every arm's model built abstractly at two lengths
def test_mqar_arms_have_the_same_parameters_at_2k_and_8k():
  """--from-arms continues the 2k arms at 8k: each arm's parameter shapes must not follow the length."""
  def shapes(preset):
    suite = compare.load_suite(MQAR_SUITE + preset, {})
    configs = {name: compare.arm_config(suite.run, name, changes) for name, changes in suite.arms}
    target = compare.arm_budget(configs['dense'])['params']
    return {name: compare.parameter_shapes(compare.matched_mlp_config(cfg, name, target))
            for name, cfg in configs.items()}
  at_2k = shapes(':2k')
  assert len(at_2k['dense']) > 10 and at_2k['nsa'] != at_2k['dense']
  assert at_2k == shapes(':8k')
