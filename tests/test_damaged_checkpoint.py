"""A damaged checkpoint (a file cut short, or 4 KB of flipped bits that orbax would read
without complaint) is one line naming the step and the file, in training's resume and in
eval.py, and nothing is written; with checkpoint.fallback_to_readable the newest readable
step is used instead, saying so. Checksums are written with every save, synchronous or not."""

import json
import os
import shutil

import jax.numpy as jnp
import pytest

from sparseformer.cli.eval import eval_command
from sparseformer.cli.main import run_command
from sparseformer.cli.train import train_command
from sparseformer.training import checksums
from sparseformer.training.checkpoint import Checkpointer
from test_errors_before_writes import tree_snapshot
from train_helpers import TRAINED_FIELDS as FIELDS
from train_helpers import tiny_argv, trained_workdir

STEPS = 4


@pytest.fixture(scope='module')
def trained(tmp_path_factory, data_dir):
  """A finished tiny run with checkpoints at steps 2 and 4 (read-only: tests damage copies)."""
  return trained_workdir(tmp_path_factory, data_dir)


def truncate(step_dir):
  """The damage of the issue: model/_sharding cut short (orbax: FAILED_PRECONDITION ... Invalid JSON)."""
  os.truncate(os.path.join(step_dir, 'model', '_sharding'), 10)
  return os.path.join('model', '_sharding')


def flip_bits(step_dir):
  """4 KB of flipped bits in the middle of the largest file of the model's arrays."""
  files = [os.path.join(d, n) for d, _, names in os.walk(os.path.join(step_dir, 'model')) for n in names]
  path = max(files, key=os.path.getsize)
  size = os.path.getsize(path)
  start, length = max(0, size // 2 - 2048), min(4096, size)
  with open(path, 'r+b') as f:
    f.seek(start)
    piece = f.read(length)
    f.seek(start)
    f.write(bytes(b ^ 0xFF for b in piece))
  return os.path.relpath(path, step_dir)


DAMAGE = {'truncated': truncate, 'flipped': flip_bits}


def damaged_copy(trained, tmp_path, damage):
  """A copy of the trained run with step 4 damaged; (workdir, the damaged file relative to the step)."""
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  return workdir, DAMAGE[damage](str(workdir / 'checkpoints' / str(STEPS)))


def train(workdir, data_dir, capsys, **overrides):
  capsys.readouterr()
  code = run_command(train_command, tiny_argv(workdir, data_dir, **{**FIELDS, **overrides}))
  out, err = capsys.readouterr()
  return code, out, err.strip().splitlines()


def evaluate(workdir, capsys, *overrides):
  capsys.readouterr()
  code = run_command(eval_command, ['--workdir', str(workdir), '--config.eval.max_batches=1', *overrides])
  out, err = capsys.readouterr()
  return code, out, err.strip().splitlines()


def assert_names_the_damage(code, lines, damaged_file, *fragments):
  assert code == 2, lines
  assert len(lines) == 1 and lines[0].startswith('error: checkpoint step 4 '), lines
  assert 'is damaged' in lines[0] and damaged_file in lines[0], lines
  assert all(fragment in lines[0] for fragment in fragments), lines


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_resume_from_a_damaged_step_is_one_line_and_writes_nothing(trained, data_dir, tmp_path, capsys, damage):
  workdir, damaged_file = damaged_copy(trained, tmp_path, damage)
  before = tree_snapshot(workdir)
  code, _, lines = train(workdir, data_dir, capsys, train__steps=6)
  assert_names_the_damage(code, lines, damaged_file, 'fallback_to_readable=true')
  assert tree_snapshot(workdir) == before


def test_resume_falls_back_to_the_newest_readable_step(trained, data_dir, tmp_path, capsys):
  workdir, _ = damaged_copy(trained, tmp_path, 'truncated')
  code, out, err = train(workdir, data_dir, capsys, checkpoint__fallback_to_readable=True)
  assert code == 0, err
  said = [line for line in out.splitlines() if 'is damaged' in line]
  assert len(said) == 1 and 'step 4' in said[0] and 'model/_sharding' in said[0], out
  assert said[0].endswith('resuming from step 2, the newest readable one (checkpoint.fallback_to_readable)')
  # Nothing lost: the damaged step is set aside, and step 4 is trained and saved again.
  assert os.listdir(workdir / 'damaged_checkpoints') == ['4']
  assert os.path.getsize(workdir / 'damaged_checkpoints' / '4' / 'model' / '_sharding') == 10
  assert sorted(os.listdir(workdir / 'checkpoints')) == ['2', '4']
  assert checksums.verify(str(workdir / 'checkpoints' / '4'))


@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_eval_of_a_damaged_step_is_one_line_and_writes_nothing(trained, tmp_path, capsys, damage):
  workdir, damaged_file = damaged_copy(trained, tmp_path, damage)
  code, _, lines = evaluate(workdir, capsys)
  assert_names_the_damage(code, lines, damaged_file, 'fallback_to_readable=true')
  assert not os.path.exists(workdir / 'eval')


def test_eval_falls_back_to_the_newest_readable_step(trained, tmp_path, capsys):
  workdir, damaged_file = damaged_copy(trained, tmp_path, 'flipped')
  code, out, err = evaluate(workdir, capsys, '--config.checkpoint.fallback_to_readable=true')
  assert code == 0, err
  assert f'is damaged: {damaged_file}: contents differ' in out
  assert 'evaluating step 2, the newest readable one (checkpoint.fallback_to_readable)' in out
  [result] = [n for n in os.listdir(workdir / 'eval') if n.endswith('.json')]
  assert '_step2_' in result and json.loads((workdir / 'eval' / result).read_text())['step'] == 2
  # An explicit step is evaluated or refused, never replaced by another.
  code, _, lines = evaluate(workdir, capsys, '--config.checkpoint.fallback_to_readable=true', '--config.eval.step=4')
  assert_names_the_damage(code, lines, damaged_file)


def test_a_step_without_checksums_is_read_unverified(trained, tmp_path, capsys):
  """Checkpoints from before checksums (or saved with checkpoint.checksums=False) still
  load, with a note; what orbax cannot read is still named as damage, from its error."""
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  step_dir = workdir / 'checkpoints' / str(STEPS)
  os.remove(step_dir / checksums.MANIFEST)
  code, out, err = evaluate(workdir, capsys)
  assert code == 0, err
  assert 'note: checkpoint step 4 has no checksums.json' in out
  truncate(str(step_dir))
  code, _, lines = evaluate(workdir, capsys)
  assert_names_the_damage(code, lines, 'model/_sharding')


def test_an_unreadable_manifest_is_damage(trained, tmp_path, capsys):
  workdir = tmp_path / 'run'
  shutil.copytree(trained, workdir)
  os.truncate(workdir / 'checkpoints' / str(STEPS) / checksums.MANIFEST, 5)
  code, _, lines = evaluate(workdir, capsys)
  assert_names_the_damage(code, lines, 'checksums.json: unreadable')


@pytest.mark.parametrize('async_save', [False, True])
def test_every_save_writes_checksums_that_verify(tmp_path, async_save):
  directory = str(tmp_path / 'checkpoints')
  checkpointer = Checkpointer(directory, keep=2, async_save=async_save)
  model = {'params': {'w': jnp.arange(4096, dtype=jnp.float32)}, 'mechanism_state': {}}
  checkpointer.save_model(3, model, {'note': 'test'})
  checkpointer.close()
  step_dir = os.path.join(directory, '3')
  assert sorted(os.listdir(directory)) == ['3']  # the manifest went in before the rename
  files = checksums.read_manifest(step_dir)
  assert {'model/_METADATA', 'meta/metadata'} <= set(files)
  assert checksums.verify(step_dir) is True
  flip_bits(step_dir)
  with pytest.raises(checksums.DamagedCheckpoint, match='contents differ'):
    checksums.verify(step_dir)
