"""The README's resume promises, end to end on tiny runs: relaunching after SIGKILL (at a
pause point, or in the middle of an asynchronous save) or after SIGTERM gives bitwise the
losses of an uninterrupted run (on CPU), and a half-written checkpoint is never resumed from."""

import os
import signal

import pytest
from train_helpers import TrainProcess, logged_losses, run_script, tiny_argv

STEPS = 8
TIMEOUT = 240  # seconds for one launch of train.py; a tiny run takes well under a minute
# Checkpoints at steps 3, 6 and 8: a save that is not the last one can be interrupted.
FIELDS = {'train__steps': STEPS, 'checkpoint__every_steps': 3}
ROUTING = {**FIELDS, 'model__layer_attention': "('routing:2', 'dense')"}


def train_to_the_end(workdir, data_dir, fields):
  result = run_script('train.py', tiny_argv(workdir, data_dir, **fields), timeout=TIMEOUT)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  return result.stdout


def finished_steps(workdir):
  return sorted(int(name) for name in os.listdir(workdir / 'checkpoints') if name.isdigit())


def unfinished_saves(workdir):
  return sorted(name for name in os.listdir(workdir / 'checkpoints') if not name.isdigit())


def assert_losses_of_an_uninterrupted_run(workdir, straight_workdir):
  got, expected = logged_losses(workdir), logged_losses(straight_workdir)
  assert sorted(got) == list(range(1, STEPS + 1))
  assert got == expected  # bitwise: the floats written are identical


@pytest.fixture(scope='module')
def straight_run(tmp_path_factory, data_dir):
  """The workdir of the dense model trained without interruption."""
  workdir = tmp_path_factory.mktemp('straight') / 'run'
  train_to_the_end(workdir, data_dir, FIELDS)
  return workdir


def kill_when_paused_after(step, workdir, data_dir, fields):
  with TrainProcess(tiny_argv(workdir, data_dir, **fields), env={'SPARSEFORMER_PAUSE_AFTER_STEP': str(step)}) as run:
    run.wait_for_line(f'paused after step {step}', TIMEOUT)
    assert run.kill() == -signal.SIGKILL


@pytest.mark.slow  # 22 s: the dense kill-and-resume test runs by default
def test_routing_model_killed_and_resumed_gives_the_losses_of_an_uninterrupted_run(tmp_path, data_dir):
  """The k-means centroids of routing attention are state outside the optimizer: they
  must come back with the checkpoint, or the routing (and the losses) change."""
  straight, interrupted = tmp_path / 'straight', tmp_path / 'interrupted'
  train_to_the_end(straight, data_dir, ROUTING)
  kill_when_paused_after(4, interrupted, data_dir, ROUTING)
  assert finished_steps(interrupted) == [3]
  resumed = train_to_the_end(interrupted, data_dir, ROUTING)
  assert 'resumed from step 3' in resumed
  assert_losses_of_an_uninterrupted_run(interrupted, straight)


def test_kill_during_an_asynchronous_save_resumes_from_the_previous_checkpoint(tmp_path, data_dir, straight_run):
  workdir = tmp_path / 'run'
  env = {'SPARSEFORMER_PAUSE_DURING_SAVE_OF_STEP': '6'}
  with TrainProcess(tiny_argv(workdir, data_dir, **FIELDS), env=env) as run:
    run.wait_for_line('paused during the save', TIMEOUT)
    # The kill lands inside the save: step 6 exists only as orbax's temporary directory.
    assert finished_steps(workdir) == [3]
    assert any(name.startswith('6.orbax-checkpoint-tmp') for name in unfinished_saves(workdir))
    assert run.kill() == -signal.SIGKILL

  resumed = train_to_the_end(workdir, data_dir, FIELDS)
  assert 'resumed from step 3' in resumed
  assert_losses_of_an_uninterrupted_run(workdir, straight_run)
  assert finished_steps(workdir) == [3, 6, 8] and unfinished_saves(workdir) == []


def test_sigterm_saves_and_exits_then_relaunch_gives_the_losses_of_an_uninterrupted_run(
    tmp_path, data_dir, straight_run):
  workdir = tmp_path / 'run'
  with TrainProcess(tiny_argv(workdir, data_dir, **FIELDS), env={'SPARSEFORMER_PAUSE_AFTER_STEP': '4'}) as run:
    run.wait_for_line('paused after step 4', TIMEOUT)
    run.process.send_signal(signal.SIGTERM)  # the pause ends: step 5 runs, is saved, and the run stops
    code, output = run.finish(TIMEOUT)
  assert code == 0, output
  assert 'SIGTERM: saved step 5' in output
  assert finished_steps(workdir) == [3, 5]  # step 5 is not a checkpoint step: SIGTERM saved it

  resumed = train_to_the_end(workdir, data_dir, FIELDS)
  assert 'resumed from step 5' in resumed
  assert_losses_of_an_uninterrupted_run(workdir, straight_run)
