"""Task rows (data/task_rows.py) and their mix into the training rows: determinism, the
fraction, exact resume, the answer-only loss mask, per-process examples, and validation.

The tests use a tiny test-only task, 'test_copy', registered here: keys with 3-letter
values (2 keys: 26 tokens with bos), then one question per key whose answer is the value; '|' filler (never in
tinyshakespeare) marks task rows."""

import json

import grain
import numpy as np
import pytest

from sparseformer import config as config_lib
from sparseformer import data
from sparseformer.data.packing import PackedRows
from sparseformer.data.task_rows import task_seed
from sparseformer.data.tokenizers import ByteTokenizer
from sparseformer.errors import UserError
from sparseformer.evaluation.tasks import base as tasks_base

BYTES = ByteTokenizer()
MARK = ord('|') + 3  # the filler's byte token


def copy_task(rng, tokenizer, length, depth, split, keys=2):
  values = [''.join(rng.choice(list('ABCDEFGH'), 3)) for _ in range(keys)]
  context = [tasks_base.Piece(f'{chr(97 + i)}={v};', 'needle') for i, v in enumerate(values)]
  turns = []
  for i, v in enumerate(values):
    turns += [tasks_base.Piece(f' {chr(97 + i)}?', 'question'), tasks_base.Piece(v, 'answer')]
  used = 1 + 1 + sum(tasks_base.token_count(tokenizer, p.text) for p in context + turns)  # bos, one '|'
  if used > length:
    raise UserError(f'test_copy with {keys} keys needs {used} tokens, got {length}')
  filler = tasks_base.Piece('|' * (length - used + 1), 'filler')  # bytes: a token per character
  return tasks_base.Example('test_copy', (filler, *context, *turns), length)


if 'test_copy' not in tasks_base.task_names():
  tasks_base.register('test_copy')(copy_task)


def data_config(data_dir, **fields):
  cfg = data.default_data_config()
  cfg.data_dir = str(data_dir)
  cfg.update({'tasks': ('test_copy',), **fields})
  return cfg


def take(iterator, count):
  return [next(iterator) for _ in range(count)]


def assert_batches_equal(want, got):
  assert len(want) == len(got)
  for a, b in zip(want, got):
    assert set(a) == set(b)
    for name in a:
      np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def rows_of(batches):
  return [{name: batch[name][i] for name in batch} for batch in batches for i in range(len(batch['tokens']))]


def is_task_row(row):
  return bool(np.any(row['tokens'] == MARK))


# Packing documents with loss weights


def test_weighted_documents_pack_like_plain_ones_with_their_weights():
  rng = np.random.default_rng(0)
  documents = [rng.integers(3, 100, n) for n in (7, 40, 12, 5, 23, 3, 9)]
  weights = [(rng.uniform(size=len(d) - 1) < 0.5).astype(np.float32) for d in documents]
  plain = list(PackedRows(grain.MapDataset.source(documents).to_iter_dataset(), 16, 0))
  weighted_dataset = PackedRows(grain.MapDataset.source(list(zip(documents, weights))).to_iter_dataset(), 16, 0)
  weighted = list(weighted_dataset)
  assert len(plain) == len(weighted)
  for a, b in zip(plain, weighted):
    for name in ('tokens', 'targets', 'positions', 'segment_ids'):
      np.testing.assert_array_equal(a[name], b[name])
    np.testing.assert_array_equal(a['loss_mask'], (a['segment_ids'] > 0).astype(np.float32))
  # The pairs in row order are the documents' pairs in order (the 40-token one is split), with their weights.
  mask = np.concatenate([row['loss_mask'][row['segment_ids'] > 0] for row in weighted])
  np.testing.assert_array_equal(mask, np.concatenate(weights))
  # Resume inside the split document.
  iterator = iter(weighted_dataset)
  next(iterator)
  next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))
  assert state['pairs_emitted'] > 0 and len(json.dumps(state)) < 100
  resumed = iter(weighted_dataset)
  resumed.set_state(state)
  assert_batches_equal(weighted[2:], list(resumed))


# The training iterator with task rows


def train_iterator(cfg, seed=0, **kwargs):
  return data.train_iterator(cfg, **{'seq_len': 64, 'global_batch_size': 4, 'seed': seed, **kwargs})


def test_task_rows_are_deterministic_for_a_seed(data_dir):
  cfg = data_config(data_dir, task_fraction=0.5, task_min_len=30)
  assert_batches_equal(take(train_iterator(cfg), 4), take(train_iterator(cfg), 4))
  first, other = rows_of(take(train_iterator(cfg), 4)), rows_of(take(train_iterator(cfg, seed=1), 4))
  tasks_first = [row['tokens'] for row in first if is_task_row(row)]
  tasks_other = [row['tokens'] for row in other if is_task_row(row)]
  assert tasks_first and not np.array_equal(tasks_first[0], tasks_other[0])


@pytest.mark.parametrize('fraction', [0.3, 0.05, 1.0])
def test_the_fraction_of_task_rows(data_dir, fraction):
  rows = rows_of(take(train_iterator(data_config(data_dir, task_fraction=fraction)), 50))  # 200 rows
  share = sum(map(is_task_row, rows)) / len(rows)
  assert abs(share - fraction) <= 0.02, share
  batch = take(train_iterator(data_config(data_dir, task_fraction=fraction)), 1)[0]
  assert set(batch) == {'tokens', 'targets', 'positions', 'segment_ids', 'loss_mask'}
  assert all(batch[name].shape == (4, 64) for name in batch)
  assert batch['loss_mask'].dtype == np.float32 and batch['tokens'].dtype == np.int32


@pytest.mark.parametrize('fraction,min_len', [(0.3, 0), (0.3, 30), (1.0, 0), (1.0, 30)])
def test_resume_continues_with_the_next_batch(data_dir, fraction, min_len):
  cfg = data_config(data_dir, task_fraction=fraction, task_min_len=min_len)
  reference, states, expected = train_iterator(cfg, seq_len=128), [], []
  for _ in range(8):  # 4 KB passages in rows of 128: book states fall inside documents
    state = reference.get_state()
    assert len(json.dumps(state)) < 300
    states.append(json.loads(json.dumps(state)))
    expected.append(next(reference))
  if fraction < 1:
    assert any(state['parents'][0]['pairs_emitted'] > 0 for state in states)  # inside a book document
  if min_len:
    assert any(len(set(row['segment_ids'][row['segment_ids'] > 0])) > 1
               for row in rows_of(expected) if is_task_row(row))  # examples were packed together
  for index in (1, 3, 7):
    resumed = train_iterator(cfg, seq_len=128)
    resumed.set_state(states[index])
    assert_batches_equal(expected[index:], take(resumed, 8 - index))


@pytest.mark.time_limit(240)
def test_batches_made_in_worker_processes_resume_exactly_and_only_with_their_worker_count(data_dir):
  cfg = data_config(data_dir, task_fraction=0.5, task_min_len=30, workers=2)
  reference = train_iterator(cfg)
  try:
    take(reference, 3)
    state = json.loads(json.dumps(reference.get_state()))
    expected = take(reference, 3)
  finally:
    reference.close()
  assert sum(is_task_row(row) for row in rows_of(expected)) >= 3  # books and tasks, made by the workers
  resumed = train_iterator(cfg)
  try:
    resumed.set_state(state)
    assert_batches_equal(expected, take(resumed, 3))
  finally:
    resumed.close()
  for workers in (0, 3):
    other = train_iterator(data_config(data_dir, task_fraction=0.5, task_min_len=30, workers=workers))
    with pytest.raises((KeyError, ValueError)):
      other.set_state(state)
    if workers:
      other.close()


def answer_mask(encoded, seq_len):
  mask = np.zeros(seq_len, np.float32)
  for start, end in encoded.answer_spans:
    mask[start - 1:end - 1] = 1.0
  return mask


def test_answer_loss_marks_exactly_the_answer_predicting_pairs(data_dir):
  seed, seq_len = 5, 64
  rows = rows_of(take(train_iterator(data_config(data_dir, task_fraction=1.0), seed=seed, seq_len=seq_len), 3))
  for index, row in enumerate(rows):  # task_min_len 0: row k is example k of process 0
    example = tasks_base.make_example('test_copy', BYTES, seq_len, seed=task_seed(seed, 0), index=index)
    encoded = tasks_base.encode(example, BYTES)
    np.testing.assert_array_equal(row['tokens'][:len(encoded.tokens)], encoded.tokens)
    np.testing.assert_array_equal(row['loss_mask'], answer_mask(encoded, seq_len))
    assert BYTES.decode(row['targets'][row['loss_mask'] > 0]) == ''.join(example.answers)


def test_packed_task_rows_mask_answers_or_every_pair(data_dir):
  cfg = data_config(data_dir, task_fraction=1.0, task_min_len=26, tasks=('test_copy:keys=1', 'test_copy'))
  for row in rows_of(take(train_iterator(cfg), 4)):
    for segment in set(row['segment_ids'][row['segment_ids'] > 0]):
      where = row['segment_ids'] == segment
      tokens, targets, mask = row['tokens'][where], row['targets'][where], row['loss_mask'][where] > 0
      text = BYTES.decode(np.append(tokens[1:], targets[-1]))
      answers = [part.split('?')[1][:3] for part in text.split(' ')[1:]]
      assert BYTES.decode(targets[mask]) == ''.join(answers)
      assert all(BYTES.decode(tokens[i:i + 1]) == '?' for i in np.flatnonzero(mask[1:] & ~mask[:-1]) + 1)
  cfg.task_loss = 'all'
  for row in rows_of(take(train_iterator(cfg), 2)):
    np.testing.assert_array_equal(row['loss_mask'], (row['segment_ids'] > 0).astype(np.float32))


@pytest.mark.parametrize('task_loss', ['answers', 'all'])
def test_task_answer_weight_scales_the_answer_pairs_only(data_dir, task_loss):
  cfg = data_config(data_dir, task_fraction=1.0, task_min_len=26, tasks=('test_copy:keys=1', 'test_copy'),
                    task_loss=task_loss)
  plain = rows_of(take(train_iterator(cfg), 3))
  cfg.task_answer_weight = 40.0
  weighted = rows_of(take(train_iterator(cfg), 3))
  for before, after in zip(plain, weighted):
    np.testing.assert_array_equal(before['tokens'], after['tokens'])
    answers = before['loss_mask'] > 0 if task_loss == 'answers' else after['loss_mask'] == 40.0
    assert answers.sum() > 0
    np.testing.assert_array_equal(after['loss_mask'][answers], 40.0)
    np.testing.assert_array_equal(after['loss_mask'][~answers], before['loss_mask'][~answers])
    if task_loss == 'all':  # the same pairs as the 'answers' mask would keep
      assert BYTES.decode(after['targets'][answers]).isalnum()


def test_a_spec_at_a_fixed_length_packs_its_short_examples_beside_row_length_ones(data_dir):
  seq_len = 128
  cfg = data_config(data_dir, task_fraction=1.0, tasks=('test_copy:keys=1@32', 'test_copy'))
  rows = rows_of(take(train_iterator(cfg, seq_len=seq_len), 4))
  lengths = []  # pairs of each example (segment) in the rows
  for row in rows:
    segments = row['segment_ids'][row['segment_ids'] > 0]
    lengths += [int(np.sum(segments == s)) for s in sorted(set(segments))]
  # 'test_copy@32' examples fill 32 pairs exactly; plain specs are made for seq_len (task_min_len 0).
  assert set(lengths) == {32, seq_len} and lengths.count(32) >= 2
  assert any(len(set(row['segment_ids'][row['segment_ids'] > 0])) == 4 for row in rows)  # four short ones in a row
  with_resume = train_iterator(cfg, seq_len=seq_len)
  take(with_resume, 2)
  state = json.loads(json.dumps(with_resume.get_state()))
  resumed = train_iterator(cfg, seq_len=seq_len)
  resumed.set_state(state)
  assert_batches_equal(take(with_resume, 2), take(resumed, 2))


def test_processes_make_different_task_rows(data_dir):
  cfg = data_config(data_dir, task_fraction=1.0)
  one, two = (take(train_iterator(cfg, process_index=p, process_count=2), 2) for p in (0, 1))
  assert one[0]['tokens'].shape == (2, 64)
  for a, b in zip(rows_of(one), rows_of(two)):
    assert not np.array_equal(a['tokens'], b['tokens'])


def test_task_fraction_one_reads_no_books(data_dir):
  cfg = data_config(data_dir, task_fraction=1.0, train_split='no_such_split')
  assert all(is_task_row(row) for row in rows_of(take(train_iterator(cfg), 2)))


# Bad settings


def test_a_task_too_long_for_the_rows_fails_when_the_iterator_is_built(data_dir):
  with pytest.raises(UserError, match=r"data.tasks: 'test_copy:keys=9' at sequence length 64: .*needs 110 tokens"):
    train_iterator(data_config(data_dir, task_fraction=1.0, tasks=('test_copy', 'test_copy:keys=9')))
  with pytest.raises(UserError, match=r"data.tasks: 'test_copy' at data.task_min_len 10: .*needs 26 tokens"):
    train_iterator(data_config(data_dir, task_fraction=0.5, task_min_len=10))
  with pytest.raises(UserError, match=r"data.tasks: 'test_copy@20' at its length 20: .*needs 26 tokens"):
    train_iterator(data_config(data_dir, task_fraction=0.5, tasks=('test_copy@20',)))
  with pytest.raises(UserError, match=r"data.tasks: 'test_copy@65': @65 is longer than the rows \(64 tokens\)"):
    train_iterator(data_config(data_dir, task_fraction=0.5, tasks=('test_copy@65',)))


@pytest.mark.parametrize('fields,message', [
    ({'tasks': ('test_copyy',)}, r"data.tasks\[0\]: unknown task 'test_copyy' \(did you mean 'test_copy'\?\)"),
    ({'tasks': ('test_copy:kyes=2',)}, r"data.tasks\[0\]: .*no option 'kyes' \(did you mean 'keys'\?\)"),
    ({'tasks': ('test_copy:keys=two',)}, r"data.tasks\[0\]: task option value 'two': expected int"),
    ({'task_fraction': 1.5}, r'data.task_fraction=1.5: use a fraction in \[0, 1\]'),
    ({'task_fraction': -0.1}, r'data.task_fraction=-0.1: use a fraction in \[0, 1\]'),
    ({'task_fraction': 0.0}, r"data.tasks=\('test_copy',\) would be unused with data.task_fraction=0"),
    ({'tasks': (), 'task_fraction': 0.5}, r'data.task_fraction=0.5 needs task specs in data.tasks'),
    ({'task_min_len': -1}, r'data.task_min_len=-1: use 0 .* or a length in \[1, 256\]'),
    ({'task_min_len': 257}, r'data.task_min_len=257'),
    ({'task_loss': 'answer'}, r"data.task_loss='answer': use answers or all"),
    ({'task_answer_weight': 0.0}, r'data.task_answer_weight=0.0: use a weight > 0'),
    ({'workers': -1}, r'data.workers=-1: use a count of processes >= 0'),
    ({'tasks': ('test_copy@',)}, r"data.tasks\[0\]: .*after @ give the example length in tokens, e.g. test_copy@512"),
    ({'tasks': ('test_copy:keys=2@0',)}, r"data.tasks\[0\]: .*after @ give the example length"),
    ({'tasks': ('test_copy@300',)}, r"data.tasks\[0\]: 'test_copy@300': @300 is longer than the rows "
     r"\(data.seq_len=256\)"),
])
def test_bad_task_settings_are_user_errors(fields, message):
  cfg = config_lib.base_config()
  cfg.data.update({'tasks': ('test_copy',), 'task_fraction': 0.5, **fields})
  with pytest.raises(UserError, match=message):
    config_lib.validate_data(cfg.data)


def test_good_task_settings_pass():
  cfg = config_lib.base_config()
  config_lib.validate_data(cfg.data)
  cfg.data.update({'tasks': ('test_copy', 'test_copy:keys=2@128'), 'task_fraction': 1.0, 'task_min_len': 256,
                   'task_loss': 'all'})
  config_lib.validate_data(cfg.data)


def test_an_example_length_in_eval_tasks_is_a_user_error():
  cfg = config_lib.base_config()
  cfg.eval.tasks = ('passkey@512',)
  with pytest.raises(UserError, match=r"eval.tasks\[0\]: 'passkey@512': @L .* is for data.tasks; .*eval.task_lengths"):
    config_lib.validate_eval(cfg.eval)
