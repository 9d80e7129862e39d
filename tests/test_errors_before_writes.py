"""Bad input to train is one line on stderr naming the field, exit status 2, and no write:
an existing workdir keeps every file byte for byte, a new one is not created."""

import os

import pytest

from sparseformer.cli.main import run_command
from sparseformer.cli.train import train_command
from train_helpers import tiny_argv

STEPS = 2


def tree_snapshot(root):
  """{relative path: bytes} of every file under root, plus every directory (value None)."""
  snapshot = {}
  for directory, subdirs, files in os.walk(root):
    for name in subdirs:
      snapshot[os.path.relpath(os.path.join(directory, name), root)] = None
    for name in files:
      path = os.path.join(directory, name)
      with open(path, 'rb') as f:
        snapshot[os.path.relpath(path, root)] = f.read()
  return snapshot


@pytest.fixture(scope='module')
def finished_workdir(tmp_path_factory, data_dir):
  workdir = tmp_path_factory.mktemp('finished') / 'run'
  argv = tiny_argv(workdir, data_dir, train__steps=STEPS, checkpoint__every_steps=STEPS, train__eval_batches=1)
  assert run_command(train_command, argv) == 0
  return workdir


def run_train(workdir, data_dir, capsys, overrides):
  capsys.readouterr()
  fields = {'train.steps': STEPS, 'checkpoint.every_steps': STEPS, 'train.eval_batches': 1, **overrides}
  code = run_command(train_command, tiny_argv(workdir, data_dir, **{k.replace('.', '__'): v for k, v in fields.items()}))
  return code, capsys.readouterr().err.strip().splitlines()


def assert_one_line_naming(code, lines, field):
  assert code == 2, lines
  assert len(lines) == 1 and lines[0].startswith('error: ') and field in lines[0], lines


# (overrides, what the message names): fields caught by config.validate and,
# past it, by the trainer (data splits, the saved checkpoint) before anything is written.
BAD_FIELDS = [
    ({'model.rope.scaling': 'dynamic'}, 'model.rope.scaling'),
    ({'model.rope.factor': '0.5'}, 'model.rope.factor'),
    ({'model.rope.scaling': 'linear', 'model.rope.factor': '0.5'}, 'model.rope.factor'),
    ({'model.rope.scaling': 'ntk', 'model.rope.factor': 'inf'}, 'model.rope.factor'),
    ({'model.rope.factor': '4.0'}, 'model.rope.factor'),  # with scaling none: would have no effect
    ({'model.rope.theta': '0.0'}, 'model.rope.theta'),
    ({'model.rope.original_seq_len': '-1'}, 'model.rope.original_seq_len'),
    ({'model.rope.scaling': 'yarn'}, 'model.rope.original_seq_len'),  # yarn without the original length
    ({'model.head_dim': '15'}, 'model.head_dim'),
    ({'model.num_kv_heads': '-2'}, 'model.num_kv_heads'),
    ({'model.vocab_size': '-1'}, 'model.vocab_size'),
    ({'model.norm_eps': '0.0'}, 'model.norm_eps'),
    ({'model.attention.block_size': '100'}, 'model.attention.block_size'),
    ({'model.attention.gate.density': '1.5'}, 'model.attention.gate.density'),
    ({'train.b2': '1.0'}, 'train.b2'),
    ({'train.min_lr_ratio': '2.0'}, 'train.min_lr_ratio'),
    ({'train.warmup_steps': '-1'}, 'train.warmup_steps'),
    ({'train.eval_every': '-5'}, 'train.eval_every'),
    ({'train.trainable': 'no_such_parameter'}, 'train.trainable'),
    ({'eval.batch_size': '-1'}, 'eval.batch_size'),
    ({'checkpoint.keep': '0'}, 'checkpoint.keep'),
    ({'mesh.rules': "(('batch', 'dta'),)"}, 'mesh.rules'),
    ({'data.text_key': 'body'}, 'data.text_key'),
    ({'data.train_split': 'training'}, 'data.train_split'),
    ({'data.eval_split': 'test'}, 'data.eval_split'),
    ({'data.tokenizer': 'spm:/nonexistent.model'}, 'data.tokenizer'),
    ({'model.d_model': '48'}, 'does not match the model'),  # the workdir's checkpoint, not this model
    # task rows the saved data position (of book rows) cannot resume
    ({'data.tasks': "('mqar:pairs=2,vocab=16',)", 'data.task_fraction': '1.0'}, 'data position'),
    ({'data.tasks': "('mqar:pairs=2,vocab=16',)", 'data.task_fraction': '0.5'}, 'data position'),
]


def case_id(overrides):
  return ','.join(f'{field}={value}' for field, value in overrides.items())


@pytest.mark.parametrize('overrides,named', BAD_FIELDS, ids=[case_id(o) for o, _ in BAD_FIELDS])
def test_bad_field_leaves_an_existing_workdir_unchanged(finished_workdir, data_dir, capsys, overrides, named):
  before = tree_snapshot(finished_workdir)
  code, lines = run_train(finished_workdir, data_dir, capsys, overrides)
  assert_one_line_naming(code, lines, named)
  assert tree_snapshot(finished_workdir) == before


NEW_WORKDIR_CASES = [
    ({'model.rope.scaling': 'linear', 'model.rope.factor': '0.5'}, 'model.rope.factor'),
    ({'model.rope.theta': '-1.0'}, 'model.rope.theta'),
    ({'data.eval_split': 'test'}, 'data.eval_split'),
    ({'init_from': '/nonexistent/run'}, '/nonexistent/run'),
]


@pytest.mark.parametrize('overrides,named', NEW_WORKDIR_CASES, ids=[case_id(o) for o, _ in NEW_WORKDIR_CASES])
def test_bad_field_creates_no_new_workdir(tmp_path, data_dir, capsys, overrides, named):
  workdir = tmp_path / 'never'
  code, lines = run_train(workdir, data_dir, capsys, overrides)
  assert_one_line_naming(code, lines, named)
  assert not os.path.exists(workdir)
