"""Scoring of the synthetic tasks (evaluation/task_eval.py): exact match by teacher forcing,
string_match_all, answer log-likelihood, the model's logprob_fn against full logits, and
the eval_tasks command end to end. Test-only tasks are registered here, so the scoring is
tested without the real generators."""

import json
import math
import os

import jax
import numpy as np
import pytest

from sparseformer import sharding
from sparseformer.cli.eval_tasks import eval_tasks_command
from sparseformer.cli.main import run_command
from sparseformer.cli.train import train_command
from sparseformer.config import base_config, validate_eval
from sparseformer.data.tokenizers import ByteTokenizer
from sparseformer.errors import UserError
from sparseformer.evaluation import task_eval
from sparseformer.evaluation.tasks import base
from sparseformer.model import resolve_dims
from sparseformer.training.state import model_arrays, model_spec
from mesh_helpers import results_on_8_cpu_devices
from train_helpers import ROOT, tiny_argv

TOKENIZER = ByteTokenizer()


def needle_task(rng, tokenizer, length, depth, split, answers=1):
  """Filler with `answers` key=value needles at `depth`, then one question per key."""
  keys = [f'k{i}' for i in range(answers)]
  values = [str(int(v)) for v in rng.integers(100, 1000, answers)]
  needles = [f' {k}={v}.' for k, v in zip(keys, values)]
  turns = [(f' {k}?', f' {v}') for k, v in zip(keys, values)]
  used = 1 + sum(len(n) for n in needles) + sum(len(q) + len(a) for q, a in turns)
  filler = max(length - used, 0)
  before = int(round(depth * filler))
  pieces = [base.Piece('.' * before, 'filler')] + [base.Piece(n, 'needle') for n in needles]
  pieces += [base.Piece('.' * (filler - before), 'filler')]
  for question, answer in turns:
    pieces += [base.Piece(question, 'question'), base.Piece(answer, 'answer')]
  return base.Example('test_needle', tuple(pieces), length, depth=before / max(filler, 1))


def depthless_task(rng, tokenizer, length, depth, split):
  value = str(int(rng.integers(10, 100)))
  pieces = (base.Piece(f'say {value}' + ' ' * max(length - 12, 0), 'filler'), base.Piece(':', 'question'),
            base.Piece(value, 'answer'))
  return base.Example('test_plain', pieces, length)


for _name, _fn in [('test_needle', needle_task), ('test_plain', depthless_task)]:
  if _name not in base.task_names():
    base.register(_name)(_fn)


def encoded(spec, length, index=0, depth=0.5):
  return base.encode(base.make_example(spec, TOKENIZER, length, seed=0, index=index, depth=depth), TOKENIZER)


# ---------------------------------------------------------------------------------------
# Fake logprob_fns: they see only the batch, and know the truth from the row itself


def oracle(batch, wrong=None):
  """log p = 0 of the true next token, which is the argmax; `wrong` (a [B, A] bool array
  or None) flips argmax off and log p to -5 at those slots."""
  tokens = batch['tokens']
  true_next = np.take_along_axis(tokens, batch['query_positions'] + 1, axis=1)
  is_argmax = true_next == batch['query_targets']
  logprob = np.where(is_argmax, 0.0, -30.0)
  if wrong is not None:
    is_argmax = is_argmax & ~wrong
    logprob = np.where(wrong, -5.0, logprob)
  return logprob, is_argmax


def uniform(vocab):
  def fn(batch):
    shape = batch['query_targets'].shape
    return np.full(shape, -math.log(vocab)), batch['query_targets'] == 0  # ties go to token 0
  return fn


def test_oracle_scores_everything_exact():
  examples = [encoded('test_needle', 60, i) for i in range(3)] + [encoded('test_needle:answers=3', 90, 5)]
  calls = []

  def fn(batch):
    calls.append({k: v.shape for k, v in batch.items()})
    return oracle(batch)
  results = task_eval.score_rows(fn, examples, row_len=128, batch_size=3)
  assert len(calls) == 2 and all(c['tokens'] == (3, 128) for c in calls)  # the last batch padded to 3 rows
  assert len(results) == 4
  for example, result in zip(examples, results):
    assert result['exact'] and result['score'] == 1.0 and result['answer_logprob'] == 0.0
    assert result['answer_tokens'] == sum(end - start for start, end in example.answer_spans)
  assert len(results[-1]['pieces']) == 3


def test_uniform_scores_log_vocab_per_answer_token_and_no_exact_match():
  vocab = 259
  examples = [encoded('test_needle:answers=2', 80, i) for i in range(3)]
  results = task_eval.score_rows(uniform(vocab), examples, row_len=128, batch_size=2)
  for example, result in zip(examples, results):
    tokens = sum(end - start for start, end in example.answer_spans)
    assert result['answer_tokens'] == tokens == 8  # ' 123' twice: padding slots are not counted
    np.testing.assert_allclose(result['answer_logprob'], -tokens * math.log(vocab), rtol=1e-12)
    assert not result['exact'] and result['score'] == 0.0  # token 0 (pad) is never an answer token


@pytest.mark.parametrize('wrong_piece', [0, 2, 3])
def test_one_wrong_piece_of_several(wrong_piece):
  examples = [encoded('test_needle:answers=4', 100), encoded('test_needle:answers=4', 100, index=1)]

  def fn(batch):
    wrong = np.zeros(batch['query_targets'].shape, bool)
    # the slot of answer token t is its rank among the row's answer tokens
    slot = sum(e - s for s, e in examples[0].answer_spans[:wrong_piece]) + 1
    wrong[0, slot] = True  # one token of one piece of the first example only
    return oracle(batch, wrong)
  first, second = task_eval.score_rows(fn, examples, row_len=128, batch_size=4)
  assert first['score'] == 0.75 and not first['exact']
  assert [p['exact'] for p in first['pieces']] == [i != wrong_piece for i in range(4)]
  np.testing.assert_allclose(first['answer_logprob'], -5.0)
  assert second['exact'] and second['score'] == 1.0


def test_answer_positions_are_those_predicting_the_answer():
  example = encoded('test_needle', 40)
  batch = task_eval.make_batch([example], 64, task_eval.answer_slots([example]), rows=2)
  (start, end), = example.answer_spans
  count = end - start
  assert list(batch['query_positions'][0, :count]) == list(range(start - 1, end - 1))
  assert list(batch['query_targets'][0, :count]) == list(example.tokens[start:end])
  assert batch['query_mask'].sum() == count and not batch['query_mask'][1].any()
  assert batch['segment_ids'][0].sum() == len(example.tokens) and not batch['segment_ids'][1].any()
  assert list(batch['positions'][0, :len(example.tokens)]) == list(range(len(example.tokens)))


# ---------------------------------------------------------------------------------------
# The model's logprob_fn


def test_model_logprob_fn_equals_full_logits():
  cfg = base_config()
  m = cfg.model
  m.d_model, m.num_layers, m.num_heads, m.dtype = 32, 2, 2, 'float32'
  dims = resolve_dims(m, TOKENIZER.vocab_size)
  mesh = sharding.make_mesh(cfg.mesh)
  spec = model_spec(dims, mesh, cfg.mesh.rules)
  arrays = jax.jit(lambda: model_arrays(dims, jax.random.key(3)))()
  fn = task_eval.model_logprob_fn(spec.graphdef, arrays, mesh, cfg.mesh.rules)
  examples = [encoded('test_needle:answers=2', 100, 0), encoded('test_needle', 50, 1, depth=0.0)]
  batch = task_eval.make_batch(examples, 128, task_eval.answer_slots(examples), rows=3)
  mask = batch.pop('query_mask')

  from flax import nnx
  model = nnx.merge(spec.graphdef, arrays['params'], arrays['mechanism_state'])
  logits, _ = model(batch['tokens'], batch['positions'], batch['segment_ids'])
  logprobs = np.asarray(jax.nn.log_softmax(np.asarray(logits, np.float32), axis=-1))
  rows = np.arange(3)[:, None]
  queried = logprobs[rows, batch['query_positions']]  # [B, A, vocab]
  # A random model rarely predicts the answer: make every other target its argmax, so
  # that is_argmax is checked both ways.
  batch['query_targets'] = np.where(np.arange(batch['query_targets'].shape[1]) % 2 == 0,
                                    queried.argmax(-1), batch['query_targets']).astype(np.int32)
  target_logprob, is_argmax = fn(batch)
  assert target_logprob.shape == is_argmax.shape == batch['query_targets'].shape
  expected = np.take_along_axis(queried, batch['query_targets'][..., None], -1)[..., 0]
  expected_argmax = queried.argmax(-1) == batch['query_targets']
  assert expected_argmax[mask].any() and not expected_argmax[mask].all()
  np.testing.assert_allclose(target_logprob[mask], expected[mask], rtol=0, atol=1e-5)
  np.testing.assert_array_equal(is_argmax[mask], expected_argmax[mask])
  # and through score_rows (the examples' own targets): the sums of those numbers
  results = task_eval.score_rows(fn, examples, 128, batch_size=3)
  own = task_eval.make_batch(examples, 128, task_eval.answer_slots(examples), rows=3)
  own_logprob = np.take_along_axis(queried, own['query_targets'][..., None], -1)[..., 0]
  np.testing.assert_allclose([r['answer_logprob'] for r in results],
                             [own_logprob[i][own['query_mask'][i]].sum() for i in range(2)], rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Config and the command


@pytest.mark.parametrize('field, value, fragment', [
    ('tasks', ('test_needel',), "did you mean 'test_needle'"),
    ('tasks', ('test_needle:answer=2',), "no option 'answer'"),
    ('task_lengths', (64, 0), 'eval.task_lengths'),
    ('task_depths', 0, 'eval.task_depths'),
    ('task_samples', 0, 'eval.task_samples'),
    ('task_batch_size', -1, 'eval.task_batch_size'),
])
def test_bad_task_settings(field, value, fragment):
  cfg = base_config()
  cfg.eval[field] = value
  with pytest.raises(UserError, match=fragment):
    validate_eval(cfg.eval)


def test_settings_defaults():
  cfg = base_config()
  cfg.eval.tasks = ('test_needle', 'test_plain')
  cfg.eval.task_batch_size = 0
  validate_eval(cfg.eval)
  settings = task_eval.task_settings(cfg)
  assert settings['lengths'] == [cfg.data.seq_len]
  assert settings['batch_size'] == cfg.train.global_batch_size
  assert settings['depths'] == [0.0, 0.25, 0.5, 0.75, 1.0]
  assert settings['row_multiple'] == cfg.model.attention.block_size


def test_evaluate_tasks_grid_with_an_oracle(tmp_path):
  cfg = base_config()
  cfg.eval.tasks, cfg.eval.task_lengths, cfg.eval.task_depths, cfg.eval.task_samples = (
      ('test_needle', 'test_plain', 'test_needle:answers=2'), (48, 200), 3, 2)
  cfg.eval.task_batch_size = 4
  seen_lengths = []

  def fn(batch):
    seen_lengths.append(batch['tokens'].shape[1])
    return oracle(batch)
  results = task_eval.evaluate_tasks(cfg, fn, TOKENIZER)
  assert sorted(set(seen_lengths)) == [128, 256]  # rounded up to the block size
  needle, plain = results['tasks']['test_needle'], results['tasks']['test_plain']
  assert np.array(needle['grid']).shape == (2, 3) and needle['depths'] == [0.0, 0.5, 1.0]
  assert np.array(plain['grid']).shape == (2, 1) and plain['depths'] == [None]
  assert needle['lengths']['48']['examples'] == 6 and plain['lengths']['200']['examples'] == 2
  assert needle['accuracy'] == plain['accuracy'] == 1.0 and results['accuracy_by_length'] == {'48': 1.0, '200': 1.0}
  json.dumps(results)  # JSON-able
  lines = task_eval.format_table(results)
  assert len(lines) == 5 and '1.000' in lines[1]
  paths = task_eval.write_task_results(results, str(tmp_path), 'tasks_step1')
  assert [os.path.basename(p) for p in paths] == [
      'tasks_step1.json', 'tasks_step1_test_needle.png', 'tasks_step1_test_plain.png',
      'tasks_step1_test_needle_answers=2.png']
  assert all(os.path.getsize(p) > 1000 for p in paths[1:])


def test_eval_tasks_command_end_to_end(tmp_path, data_dir, capsys):
  workdir = tmp_path / 'run'
  assert run_command(train_command, tiny_argv(workdir, data_dir, train__steps=3, train__eval_batches=1)) == 0
  assert run_command(eval_tasks_command, ['--workdir', str(workdir)]) == 2
  assert '--config.eval.tasks' in capsys.readouterr().err
  argv = ['--workdir', str(workdir), "--config.eval.tasks=('test_needle', 'test_plain')",
          '--config.eval.task_lengths=(40, 150)', '--config.eval.task_depths=2', '--config.eval.task_samples=2']
  assert run_command(eval_tasks_command, argv) == 0
  out = capsys.readouterr().out
  assert 'test_needle' in out and 'wrote' in out
  report = json.loads((workdir / 'eval' / 'tasks_step3.json').read_text())
  assert report['step'] == 3 and report['settings']['lengths'] == [40, 150] and report['rope']['scaling'] == 'none'
  assert np.array(report['tasks']['test_needle']['grid']).shape == (2, 2)
  assert np.array(report['tasks']['test_plain']['grid']).shape == (2, 1)
  for task in ('test_needle', 'test_plain'):
    assert (workdir / 'eval' / f'tasks_step3_{task}.png').stat().st_size > 1000
    for entry in report['tasks'][task]['lengths'].values():
      assert 0.0 <= entry['accuracy'] <= 1.0 and entry['answer_logprob_per_token'] < 0


def passkey_registered_on_import():
  import subprocess
  import sys
  code = 'import sparseformer.evaluation.tasks.base as b; print("passkey" in b.task_names())'
  return subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=ROOT).stdout.strip() == 'True'


@pytest.mark.skipif(not passkey_registered_on_import(), reason='the passkey generator is not registered yet')
def test_eval_tasks_module_runs_in_a_fresh_python(tmp_path, data_dir):
  import subprocess
  import sys
  from train_helpers import child_env
  workdir = tmp_path / 'run'
  assert run_command(train_command, tiny_argv(workdir, data_dir, train__steps=2, train__eval_batches=1)) == 0
  result = subprocess.run([sys.executable, '-m', 'sparseformer.cli.eval_tasks', '--workdir', str(workdir),
                           "--config.eval.tasks=('passkey',)", '--config.eval.task_lengths=(256,)',
                           '--config.eval.task_depths=2', '--config.eval.task_samples=1'],
                          env=child_env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr
  report = json.loads((workdir / 'eval' / 'tasks_step2.json').read_text())
  assert np.array(report['tasks']['passkey']['grid']).shape == (1, 2)
  assert (workdir / 'eval' / 'tasks_step2_passkey.png').exists()


MESH_SCRIPT = r'''
import json, sys
import jax, numpy as np
from sparseformer.evaluation import task_eval
from sparseformer.training.state import model_arrays, model_shardings
from tests.mesh_helpers import tiny_window_model

rng = np.random.default_rng(0)
examples = []
for n, answers in [(100, ((90, 94),)), (128, ((60, 63), (120, 128))), (70, ((65, 70),)), (30, ((20, 24),))]:
  from sparseformer.evaluation.tasks.base import EncodedExample
  tokens = rng.integers(3, 259, n).astype(np.int32)
  tokens[0] = 1
  examples.append(EncodedExample(tokens, answers, (), 10))
batch = task_eval.make_batch(examples, 128, task_eval.answer_slots(examples))
batch.pop('query_mask')

def run(axes):
  _, mesh, rules, spec = tiny_window_model(axes, 259, dtype='float32')
  arrays = jax.jit(lambda: model_arrays(spec.dims, jax.random.key(0)), out_shardings=model_shardings(spec))()
  logprob, is_argmax = task_eval.model_logprob_fn(spec.graphdef, arrays, mesh, rules)(batch)
  return [logprob.tolist(), is_argmax.tolist()]

print('RESULTS ' + json.dumps([run(axes) for axes in json.loads(sys.argv[1])]))
'''


def test_model_logprob_fn_on_a_data_sequence_tensor_mesh_matches_one_device():
  """Rows of 128 on data 2 x sequence 2 x tensor 2 (8 CPU devices), a block-sparse window
  mechanism: the same log-probabilities and argmax flags as on one device."""
  cases = [{'data': 1}, {'data': 2, 'sequence': 2, 'tensor': 2}]
  (one_logprob, one_argmax), (mesh_logprob, mesh_argmax) = results_on_8_cpu_devices(MESH_SCRIPT, cases)
  np.testing.assert_allclose(mesh_logprob, one_logprob, rtol=0, atol=1e-5)
  assert mesh_argmax == one_argmax


def test_decoded_answers_are_generated_from_the_true_text_before_them():
  from sparseformer.evaluation.task_decode import decoded_exact
  examples = [base.EncodedExample(np.arange(10, 30), ((5, 7), (12, 15)), (), 4),
              base.EncodedExample(np.arange(40, 50), ((8, 9),), (), 4)]
  seen = []

  def generate(prompts, count):  # answers the first and third pieces right, the second wrong
    seen.extend((list(p), count) for p in prompts)
    answers = {15: [15, 16], 22: [99, 23, 24], 48: [48, 0, 0]}
    return [answers[p[-1] + 1] for p in prompts]
  assert decoded_exact(generate, examples, batch_size=2) == [[True, False], [True]]
  assert seen == [(list(range(10, 15)), 3), (list(range(10, 22)), 3), (list(range(40, 48)), 1)]


def test_eval_tasks_decodes_the_answers_as_teacher_forcing_scores_them(tmp_path, data_dir, capsys):
  workdir = tmp_path / 'run'
  assert run_command(train_command, tiny_argv(workdir, data_dir, train__steps=3, train__eval_batches=1)) == 0
  argv = ['--workdir', str(workdir), "--config.eval.tasks=('test_needle', 'test_plain')",
          '--config.eval.task_lengths=(40,)', '--config.eval.task_depths=2', '--config.eval.task_samples=2',
          '--config.eval.task_decode=true']
  assert run_command(eval_tasks_command, argv) == 0
  assert 'decoded' in capsys.readouterr().out
  report = json.loads((workdir / 'eval' / 'tasks_step3.json').read_text())
  for task in report['tasks'].values():
    assert task['decoded_accuracy'] == task['accuracy']
    assert task['lengths']['40']['decoded_accuracy'] == task['lengths']['40']['accuracy']
