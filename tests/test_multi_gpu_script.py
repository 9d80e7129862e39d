"""benchmarks/multi_gpu.py (issue 11): the --quick CPU run end to end (slow: ~80 s on a
2-core CPU), and in the default suite the pieces its verdict comes from: arguments, the
phases' command lines and environments, the checkpoint copy, and the report built from
runs' metrics.jsonl."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import multi_gpu as bench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_arguments_full_and_quick_defaults():
  full = bench.parse_args(['--out', 'x'])
  assert (full.steps, full.batch, full.seq_len, full.cp_len, full.gpus) == (200, 8, 8192, 1 << 20, 0)
  assert full.phases == list(bench.PHASES)
  quick = bench.parse_args(['--out', 'x', '--quick', '--steps', '4', '--phases', 'dp,cp'])
  assert (quick.steps, quick.seq_len, quick.cp_len, quick.phases) == (4, 256, 1024, ['dp', 'cp'])
  child = bench.parse_args(['--out', 'x', '--child', 'precompile', '--config', 'c.py', '--config.seed=0'])
  assert child.train_argv == ['--config', 'c.py', '--config.seed=0']
  for bad in (['--steps', '7'], ['--phases', 'single,nope'], ['--config.seed=0']):
    with pytest.raises(SystemExit):
      bench.parse_args(['--out', 'x'] + bad)


def test_device_count_one_gpu_only_for_the_single_device_phases():
  def problem(phases, gpus, visible, batch=8):
    args = bench.parse_args(['--out', 'x', '--phases', phases, '--batch', str(batch)])
    args.gpus = gpus
    return bench.device_count_problem(args, visible)

  assert problem('single,fit_1gpu', 1, 1) is None
  assert problem('single,dp', 2, 2) is None
  assert 'need 2 to 1 devices' in problem('single,dp', 1, 1)
  assert 'need 1 to 2 devices' in problem('single', 3, 2)
  assert 'does not split over 3' in problem('single,fsdp', 3, 4)


def test_phase_commands_and_environments(monkeypatch):
  args = bench.parse_args(['--out', '/tmp/o'])
  args.gpus, args.visible_gpus = 2, ['3', '5']
  meshes = bench.meshes(2)
  dp = bench.train_argv(args, '/tmp/o/runs/dp', meshes['dp'])
  assert dp[:4] == ['--config', bench.CONFIG, '--workdir', '/tmp/o/runs/dp']
  assert {'--config.mesh.data=2', '--config.mesh.fsdp=1', '--config.train.log_every=1', '--config.seed=0',
          '--config.checkpoint.every_steps=100', '--config.train.global_batch_size=8'} <= set(dp)
  assert '--config.mesh.fsdp=2' in bench.train_argv(args, 'w', meshes['fsdp'])
  monkeypatch.delenv('SPARSEFORMER_COMPILATION_CACHE', raising=False)
  monkeypatch.delenv('XLA_PYTHON_CLIENT_PREALLOCATE', raising=False)  # CI's test script may set it
  single = bench.phase_env(args, 1, shares_devices=False)
  assert single['CUDA_VISIBLE_DEVICES'] == '3' and 'XLA_PYTHON_CLIENT_PREALLOCATE' not in single
  assert bench.phase_env(args, 1, shares_devices=False, first=1)['CUDA_VISIBLE_DEVICES'] == '5'
  shared = bench.phase_env(args, 2, shares_devices=True)
  assert shared['CUDA_VISIBLE_DEVICES'] == '3,5' and shared['XLA_PYTHON_CLIENT_PREALLOCATE'] == 'false'
  for env in (single, shared):
    assert [env[name] for name in ('NCCL_NVLS_ENABLE', 'TORCH_SYMM_MEM_DISABLE_MULTICAST', 'NVSHMEM_DISABLE_NVLS')] == [
        '0', '1', '1']
    assert env['SPARSEFORMER_COMPILATION_CACHE'] == '/tmp/o/jax_cache'
  quick = bench.parse_args(['--out', '/tmp/o', '--quick'])
  env = bench.phase_env(quick, 4, shares_devices=False)
  assert '--xla_force_host_platform_device_count=4' in env['XLA_FLAGS'] and env['JAX_PLATFORMS'] == 'cpu'
  assert '--config.model.d_model=64' in bench.train_argv(quick, 'w', meshes['single'])


def test_copy_checkpoint_makes_it_the_only_one(tmp_path):
  step = tmp_path / 'dp' / 'checkpoints' / '100'
  (step / 'model').mkdir(parents=True)
  (step / 'model' / 'array').write_text('x')
  (tmp_path / 'dp' / 'checkpoints' / '200').mkdir()
  bench.copy_checkpoint(str(tmp_path / 'dp'), 100, str(tmp_path / 'resume'))
  assert os.listdir(tmp_path / 'resume' / 'checkpoints') == ['100']
  assert (tmp_path / 'resume' / 'checkpoints' / '100' / 'model' / 'array').read_text() == 'x'
  with pytest.raises(SystemExit):
    bench.copy_checkpoint(str(tmp_path / 'dp'), 50, str(tmp_path / 'other'))


def write_run(runs, name, losses, step_time, first_step=1):
  os.makedirs(runs / name)
  with open(runs / name / 'metrics.jsonl', 'w') as f:
    for offset, loss in enumerate(losses):
      step = first_step + offset
      seconds = 30.0 if offset == 0 else step_time
      f.write(json.dumps({'step': step, 'train/loss': loss, 'train/step_time': seconds}) + '\n')
    f.write(json.dumps({'step': first_step + len(losses) - 1, 'eval/validation/nll': 2.0}) + '\n')


def fake_experiment(tmp_path, dp_losses):
  """collect() over runs of 8 steps: single at 0.4 s a step, dp and fsdp on 4 devices."""
  args = bench.parse_args(['--out', str(tmp_path), '--steps', '8', '--warmup', '2', '--quick'])
  args.gpus = 4
  runs = tmp_path / 'runs'
  single = [5.0 - 0.1 * i for i in range(8)]
  write_run(runs, 'single', single, 0.4)
  write_run(runs, 'dp', dp_losses, 0.125)
  write_run(runs, 'fsdp', [x * (1 + 1e-6) for x in single], 0.2)
  write_run(runs, 'resume_fsdp_from_dp', dp_losses[4:], 0.2, first_step=5)
  phases = {name: {'command': f'python train.py {name}', 'returncode': 0, 'wall_s': 10.0}
            for name in ('single', 'dp', 'fsdp', 'resume_fsdp_from_dp', 'fit_1gpu')}
  (tmp_path / 'logs').mkdir()
  (tmp_path / 'logs' / 'fit_1gpu.log').write_text(
      'model: ...\n  arguments  1.381 GiB  (1 bytes)\n  temporaries  300.500 GiB  (2 bytes)\n'
      '  total  301.881 GiB  (3 bytes)\n')
  device = {'kind': 'fake', 'dtype': 'float32', 'jax': '0'}
  return bench.collect(args, device, phases, str(runs), str(tmp_path / 'logs'))


def test_report_scaling_and_loss_checks(tmp_path):
  single = [5.0 - 0.1 * i for i in range(8)]
  results = fake_experiment(tmp_path, [x * (1 + 2e-6) for x in single])
  runs = results['runs']
  assert runs['single']['step_time_s'] == 0.4 and runs['single']['first_step_s'] == 30.0
  assert runs['single']['tokens_per_s'] == 8 * 256 / 0.4
  assert runs['dp']['tokens_per_s_per_device'] == 8 * 256 / 0.125 / 4
  assert runs['dp']['scaling_efficiency'] == pytest.approx(0.8)
  assert runs['fsdp']['scaling_efficiency'] == pytest.approx(0.5)
  checks = {(c['run'], c['against']): c for c in results['loss_checks']}
  assert set(checks) == {('dp', 'single'), ('fsdp', 'single'), ('resume_fsdp_from_dp', 'dp'),
                         ('resume_fsdp_from_dp', 'single')}
  resumed = checks[('resume_fsdp_from_dp', 'dp')]
  assert (resumed['steps'], resumed['early_steps'], resumed['early_diff']) == ('5-8', '5-8', 0.0)
  assert checks[('resume_fsdp_from_dp', 'single')]['early_diff'] is None  # single is not where it resumed from
  assert checks[('dp', 'single')]['max_diff'] == pytest.approx(2e-6) and results['passed']
  assert results['fit_1gpu'] == {'length': 1024, 'arguments_gib': 1.381, 'temporaries_gib': 300.5, 'total_gib': 301.881}
  text = bench.markdown(results)
  assert '| dp | 4 | 0.1250 | 16,384 | 4,096 | 0.800 | 30.0 |' in text
  assert '301.9 GiB per device' in text and text.rstrip().endswith('Verdict: PASS')


def test_verdict_ignores_the_helper_phases_but_not_a_run(tmp_path):
  single = [5.0 - 0.1 * i for i in range(8)]
  args = bench.parse_args(['--out', str(tmp_path), '--steps', '8', '--quick'])
  args.gpus = 4
  for name in ('single', 'dp'):
    write_run(tmp_path / 'runs', name, single, 0.2)
  phases = {name: {'command': name, 'returncode': 0, 'wall_s': 1.0} for name in ('single', 'dp')}
  phases['compile_dp'] = {'command': 'c', 'returncode': 1, 'wall_s': 1.0, 'error': 'boom'}
  device = {'dtype': 'float32'}
  assert bench.collect(args, device, phases, str(tmp_path / 'runs'), str(tmp_path))['passed']
  phases['dp']['returncode'] = 'timeout'
  results = bench.collect(args, device, phases, str(tmp_path / 'runs'), str(tmp_path))
  assert not results['passed'] and results['failed_phases'] == ['dp', 'compile_dp'] and 'dp' not in results['runs']


def test_report_fails_on_a_drifting_loss(tmp_path):
  dp = [5.0 - 0.1 * i for i in range(8)]
  dp[6] *= 1.01  # 1e-2 at step 7: over float32's 1e-4
  results = fake_experiment(tmp_path, dp)
  check = next(c for c in results['loss_checks'] if c['run'] == 'dp')
  assert not check['passed'] and check['max_at'] == 7 and check['early_diff'] == pytest.approx(0.01)
  assert not results['passed'] and 'Verdict: FAIL' in bench.markdown(results)


def test_loss_check_early_window_and_every_step_limits():
  single = {str(s): 1.0 for s in range(1, 21)}
  drifting = {**single, **{str(s): 1.0 + 0.004 * (s - 10) for s in range(11, 21)}}  # 4e-2 by step 20
  runs = {'single': {'losses': single}, 'dp': {'losses': drifting}}
  limits = bench.LOSS_TOLERANCE['bfloat16']
  check = bench.loss_check(runs, 'dp', 'single', True, limits)
  assert check['early_steps'] == '1-10' and check['early_diff'] == 0 and check['passed']
  assert check['max_at'] == 20 and check['max_diff'] == pytest.approx(0.04)
  runs['dp']['losses']['3'] = 1.002  # 2e-3 within the first 10 steps: a defect, not drift
  assert not bench.loss_check(runs, 'dp', 'single', True, limits)['passed']
  assert bench.loss_check(runs, 'dp', 'single', False, limits)['passed']


@pytest.mark.slow
@pytest.mark.time_limit(660)  # its child process may take 600 s
def test_quick_run_exercises_every_phase(tmp_path):
  out = tmp_path / 'mg'
  env = {k: v for k, v in os.environ.items() if k != 'SPARSEFORMER_COMPILATION_CACHE'}
  command = [sys.executable, os.path.join(REPO, 'benchmarks', 'multi_gpu.py'), '--quick', '--out', str(out),
             '--data_dir', str(tmp_path / 'tfds')]
  result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]
  results = json.loads((out / 'results.json').read_text())
  assert results['passed'] and not results['failed_phases']
  assert set(results['phases']) == {'single', 'compile_dp', 'compile_fsdp', 'dp', 'fsdp', 'resume_fsdp_from_dp',
                                    'resume_dp_from_fsdp', 'cp', 'fit_1gpu'}
  runs = results['runs']
  assert [len(runs[n]['losses']) for n in bench.TIMED_RUNS] == [6, 6, 6]
  assert list(runs['resume_dp_from_fsdp']['losses']) == ['4', '5', '6']
  assert len(results['loss_checks']) == 6 and all(c['passed'] for c in results['loss_checks'])
  # the dp step came compiled from the cache the precompile process filled
  assert runs['dp']['first_step_s'] < runs['single']['first_step_s'] / 2
  assert [row['layer'] for row in results['cp']] == ['dense', 'window:300']
  assert [row['previous_shards'] for row in results['cp']] == [3, 2]
  assert results['fit_1gpu']['total_gib'] > 0
  assert (out / 'results.md').read_text().count('| pass |') == 8
