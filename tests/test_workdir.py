"""The workdir around the checkpoints: one train.py at a time (train.lock), Ctrl-C saves and
stops, relaunches with another config keep a history and say what changed, bad paths and
non-finite numbers are refused before anything is written, and evaluation results are
named by dataset and never overwrite an evaluation with other settings."""

import json
import os
import shutil
import signal
import socket

import pytest

from sparseformer.cli.eval import eval_command
from sparseformer.cli.main import run_command
from sparseformer.cli.train import train_command
from sparseformer.training import workdir as workdir_lib
from sparseformer.training.trainer import TrainLoop
from test_errors_before_writes import tree_snapshot
from train_helpers import TRAINED_FIELDS as FIELDS
from train_helpers import TrainProcess, tiny_argv, trained_workdir

TIMEOUT = 120  # seconds for the train.py child; a tiny run takes well under a minute


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
  """A finished tiny run of 4 steps (read-only: tests that write use a copy)."""
  return trained_workdir(tmp_path_factory, data_dir)


def copy_of(trained, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  return workdir


def run(command, argv, capsys):
  capsys.readouterr()
  code = run_command(command, argv)
  out, err = capsys.readouterr()
  return code, out, err.strip().splitlines()


def train(workdir, data_dir, capsys, **overrides):
  return run(train_command, tiny_argv(workdir, data_dir, **{**FIELDS, **overrides}), capsys)


def assert_one_line(code, lines, *fragments):
  assert code == 2, lines
  assert len(lines) == 1 and lines[0].startswith('error: '), lines
  assert all(fragment in lines[0] for fragment in fragments), lines


# ---------------------------------------------------------------------------------------
# The lock and Ctrl-C


def test_second_train_is_refused_naming_the_holder_and_ctrl_c_saves_and_stops(tmp_path, data_dir, capsys):
  workdir = tmp_path / 'run'
  argv = tiny_argv(workdir, data_dir, train__steps=4, checkpoint__every_steps=4, train__eval_batches=1)
  with TrainProcess(argv, env={'SPARSEFORMER_PAUSE_AFTER_STEP': '2'}) as first:
    first.wait_for_line('paused after step 2', TIMEOUT)
    before = tree_snapshot(workdir)
    code, _, lines = run(train_command, argv, capsys)
    assert_one_line(code, lines, f'{workdir} is in use', f'pid {first.process.pid} on host {socket.gethostname()}',
                    'started ')
    assert tree_snapshot(workdir) == before

    first.process.send_signal(signal.SIGINT)  # Ctrl-C: the pause ends, step 3 runs, is saved, and the run stops
    code, output = first.finish(TIMEOUT)
  assert code == 0, output
  assert 'SIGINT: saved step 3 and stopped; relaunch with the same workdir to continue' in output
  assert 'Traceback' not in output and 'KeyboardInterrupt' not in output, output
  assert os.listdir(workdir / 'checkpoints') == ['3']
  assert (workdir / workdir_lib.LOCK).read_text() == ''  # released


def test_a_stale_lock_is_taken_over_with_a_note(trained, tmp_path, data_dir, capsys):
  workdir = copy_of(trained, tmp_path)
  gone = {'pid': 2 ** 22 + 1, 'host': socket.gethostname(), 'started': '2020-01-01T00:00:00+00:00'}
  (workdir / workdir_lib.LOCK).write_text(json.dumps(gone))  # a holder killed with SIGKILL leaves this
  code, out, err = train(workdir, data_dir, capsys)
  assert code == 0, err
  assert f'note: took over the lock of {workdir} from pid {gone["pid"]} on host {gone["host"]}' in out
  assert (workdir / workdir_lib.LOCK).read_text() == ''


def test_a_held_lock_refuses_before_any_work(trained, tmp_path, data_dir, capsys):
  workdir = copy_of(trained, tmp_path)
  lock = workdir_lib.WorkdirLock.acquire(str(workdir), log=lambda message: None)
  try:
    before = tree_snapshot(workdir)
    code, _, lines = train(workdir, data_dir, capsys, train__steps=6)
    assert_one_line(code, lines, f'pid {os.getpid()} on host')
    assert tree_snapshot(workdir) == before
  finally:
    lock.release()


def test_a_second_ctrl_c_stops_at_once_in_one_line(capsys):
  loop = TrainLoop.__new__(TrainLoop)  # the handler alone: no model needed
  loop.stop_requested, loop.is_main_process = None, False
  loop._on_stop_signal(signal.SIGINT, None)
  assert loop.stop_requested == 'SIGINT'
  with pytest.raises(KeyboardInterrupt):
    loop._on_stop_signal(signal.SIGINT, None)

  def interrupted(argv):
    raise KeyboardInterrupt
  code, _, lines = run(interrupted, [], capsys)
  assert code == 130 and len(lines) == 1 and lines[0].startswith('error: interrupted'), lines


# ---------------------------------------------------------------------------------------
# The config history


def test_a_changed_relaunch_keeps_the_history_and_says_what_changed(trained, tmp_path, data_dir, capsys):
  workdir = copy_of(trained, tmp_path)
  code, out, err = train(workdir, data_dir, capsys, train__steps=5, train__lr=1e-3)
  assert code == 0, err
  lines = out.splitlines()
  header = lines.index(next(line for line in lines if line.startswith('config changed since the last launch')))
  assert 'starts at step 4' in lines[header]
  assert lines[header + 1:header + 3] == ['  train.lr: 0.003 -> 0.001', '  train.steps: 4 -> 5']
  history = [json.loads(line) for line in (workdir / workdir_lib.HISTORY).read_text().splitlines()]
  assert [record['start_step'] for record in history] == [0, 4]
  assert history[0]['config']['train']['lr'] == 3e-3 and history[1]['config']['train']['lr'] == 1e-3
  assert history[1]['changed'] == {'train.lr': [3e-3, 1e-3], 'train.steps': [4, 5]}
  assert json.loads((workdir / 'config.json').read_text())['config']['train']['lr'] == 1e-3


# ---------------------------------------------------------------------------------------
# Refused before anything is written


def unwritable_directory(tmp_path):
  """A directory this process cannot write: chmod for a user, /proc/1 for root (who may write anything else)."""
  directory = tmp_path / 'read_only'
  directory.mkdir()
  directory.chmod(0o555)
  if not os.access(directory, os.W_OK):
    return directory
  if os.path.isdir('/proc/1') and not os.access('/proc/1', os.W_OK):
    return '/proc/1'
  pytest.skip('no directory here is unwritable for this user')


def test_a_workdir_that_cannot_be_written_is_refused(tmp_path, data_dir, capsys):
  (tmp_path / 'a_file').write_text('')
  cases = [(tmp_path / 'a_file', 'is a file, not a directory'),
           (tmp_path / 'a_file' / 'run', 'a_file is a file, not a directory'),
           (os.path.join(unwritable_directory(tmp_path), 'run'), 'is not writable')]
  for workdir, fragment in cases:
    code, _, lines = train(workdir, data_dir, capsys)
    assert_one_line(code, lines, '--workdir', fragment)
  assert not os.path.exists(cases[2][0])


@pytest.mark.parametrize('overrides,named', [
    ({'train__lr': 'inf'}, 'train.lr=inf'),
    ({'train__lr': 'nan'}, 'train.lr=nan'),
    ({'train__lr': '-0.001'}, 'train.lr=-0.001'),
    ({'train__weight_decay': 'inf'}, 'train.weight_decay=inf'),
    ({'data__eval_split': 'nosuch'}, 'data.eval_split'),
], ids=['lr_inf', 'lr_nan', 'lr_negative', 'weight_decay_inf', 'eval_split'])
def test_bad_numbers_and_splits_are_refused_before_the_workdir_exists(tmp_path, data_dir, capsys, overrides, named):
  workdir = tmp_path / 'never'
  code, _, lines = train(workdir, data_dir, capsys, **overrides)
  assert_one_line(code, lines, named)
  assert not os.path.exists(workdir)


# ---------------------------------------------------------------------------------------
# Evaluation results


def test_eval_names_results_by_dataset_and_never_overwrites_another_evaluation(trained, tmp_path, capsys):
  workdir = copy_of(trained, tmp_path)
  evaluate = lambda *overrides: run(eval_command, ['--workdir', str(workdir), *overrides], capsys)  # noqa: E731
  books = '--config.data.name=sparseformer_text/books'
  code, out, err = evaluate(books, '--config.eval.max_batches=1')
  assert code == 0, err
  assert 'evaluating step 4 on sparseformer_text/books, split validation, length 32' in out
  name = 'sparseformer_text-books_validation_step4_len32'
  report = json.loads((workdir / 'eval' / f'{name}.json').read_text())
  assert (report['dataset'], report['split'], report['step']) == ('sparseformer_text/books', 'validation', 4)
  assert report['settings']['max_batches'] == 1

  assert evaluate(books, '--config.eval.max_batches=1')[0] == 0  # the same evaluation: its file is replaced
  code, out, err = evaluate(books, '--config.eval.max_batches=2')
  assert code == 0, err
  assert (f'note: {name}.json holds an evaluation with other settings (max_batches: 1 -> 2): '
          f'writing {name}-2.json') in out
  assert json.loads((workdir / 'eval' / f'{name}.json').read_text())['settings']['max_batches'] == 1
  assert json.loads((workdir / 'eval' / f'{name}-2.json').read_text())['settings']['max_batches'] == 2
  assert evaluate('--config.eval.max_batches=1')[0] == 0  # the run's own dataset
  assert sorted(n for n in os.listdir(workdir / 'eval') if n.endswith('.json')) == [
      f'{name}-2.json', f'{name}.json', 'sparseformer_text-tinyshakespeare_validation_step4_len32.json']
