"""The data package: corpora as TFDS datasets, tokenizers, packing rules, resumable
iteration, evaluation passes, and bad input turned into UserError."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import grain
import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

from sparseformer import data
from sparseformer.data import build
from sparseformer.data.packing import PackedRows
from sparseformer.data.sparseformer_text import sparseformer_text_dataset_builder as corpora
from sparseformer.data.tokenizers import ByteTokenizer, make_tokenizer, train_from_dataset
from sparseformer.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parents[1]
BYTES = ByteTokenizer()


def data_config(data_dir, **fields):
  cfg = data.default_data_config()
  cfg.data_dir = str(data_dir)
  cfg.update(fields)
  return cfg


def read_split(data_dir, name, split):
  """[(doc_id, text)] of a prepared split, read the way users read TFDS without TF."""
  import tensorflow_datasets as tfds
  source = tfds.data_source(name, data_dir=str(data_dir), split=split)
  return [(source[i]['doc_id'].decode(), source[i]['text'].decode('utf-8')) for i in range(len(source))]


def run_python(*args):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=120)


@pytest.fixture(scope='session')
def books_data_dir(tmp_path_factory):
  directory = tmp_path_factory.mktemp('books_tfds')
  data.ensure_prepared(data_config(directory, name='sparseformer_text/books'))
  return directory


# The builder


def test_tinyshakespeare_passages_split_at_blank_lines(data_dir):
  name = 'sparseformer_text/tinyshakespeare'
  train, validation = read_split(data_dir, name, 'train'), read_split(data_dir, name, 'validation')
  documents = sorted(train + validation)
  assert len(validation) == len(documents) // 10 and len(train) == len(documents) - len(validation)
  assert [doc_id for doc_id, _ in validation] == [f'tinyshakespeare-{i:04d}' for i in range(9, len(documents), 10)]
  assert all(text.strip() and len(text.encode('utf-8')) <= corpora.PASSAGE_BYTES for _, text in documents)
  assert not {text for _, text in train} & {text for _, text in validation}
  # Cut only at blank lines: the passages in order give back the text (runs of blank
  # lines become one), and none starts or ends inside a speech.
  original = corpora.read_text(corpora.CORPORA / 'tinyshakespeare.txt')
  assert '\n'.join(text for _, text in documents) == re.sub(r'\n(?:[ \t]*\n)+', '\n\n', original)
  assert all(text.endswith('\n') and not text.endswith('\n\n') for _, text in documents)


def test_books_are_whole_documents_without_gutenberg_boilerplate(books_data_dir):
  name = 'sparseformer_text/books'
  train, validation = read_split(books_data_dir, name, 'train'), read_split(books_data_dir, name, 'validation')
  assert sorted(doc_id for doc_id, _ in validation) == ['pg20249', 'pg9198']
  assert len(train) == 9 and not {d for d, _ in train} & {d for d, _ in validation}
  for doc_id, text in train + validation:
    raw = (corpora.CORPORA / 'books' / f'{doc_id}.txt').read_text('utf-8')
    assert text.strip() and text.strip() in raw, doc_id  # one whole, contiguous document
    assert len(text) > 50_000 or doc_id == 'pg20249'
    for boilerplate in ('START OF THE PROJECT', 'START OF THIS PROJECT', 'END OF THE PROJECT', 'END OF THIS PROJECT',
                        'Project Gutenberg-tm', 'use of anyone anywhere',
                        'End of the Project Gutenberg', "End of Project Gutenberg's"):
      assert boilerplate.lower() not in text.lower(), (doc_id, boilerplate)


def test_gutenberg_markers_encodings_and_fallback(tmp_path):
  book = ('The Project Gutenberg EBook of X\nlicence\n\n*** START OF THIS PROJECT GUTENBERG EBOOK X,\nWRAPPED ***\n\n'
          'Body caf\u00e9.\n\nEnd of the Project Gutenberg EBook of X\n\n*** END OF THIS PROJECT GUTENBERG EBOOK X ***\n'
          'licence\n')
  assert corpora.strip_gutenberg(book) == 'Body caf\u00e9.\n'
  assert corpora.strip_gutenberg('No markers here.\n\n') == 'No markers here.\n'
  latin1, utf8 = tmp_path / 'latin1.txt', tmp_path / 'utf8.txt'
  latin1.write_bytes(book.replace('\n', '\r\n').encode('iso-8859-1'))
  utf8.write_bytes(b'\xef\xbb\xbf' + book.encode('utf-8'))
  assert corpora.read_text(latin1) == book and corpora.read_text(utf8) == book


@pytest.mark.parametrize('content,message', [
    (None, 'is missing'),
    ('  \n\n', 'is empty'),
    ('A:\nSpeak.\n\nB:\nNo.\n', 'gives no validation documents'),
])
def test_corpus_problems_are_user_errors(tmp_path, monkeypatch, content, message):
  if content is not None:
    (tmp_path / 'tinyshakespeare.txt').write_text(content)
  monkeypatch.setattr(corpora, 'CORPORA', tmp_path)
  with pytest.raises(UserError, match=message):
    data.ensure_prepared(data_config(tmp_path / 'tfds'))
  assert not build.shipped_builder('sparseformer_text/tinyshakespeare', str(tmp_path / 'tfds')).is_prepared()


KILLED_BUILD = """
import os, signal, sys
from sparseformer.data.sparseformer_text import sparseformer_text_dataset_builder as corpora
generate = corpora.Builder._generate_examples
def generate_then_die(self, documents):
  for index, example in enumerate(generate(self, documents)):
    if index == 20:
      os.kill(os.getpid(), signal.SIGKILL)
    yield example
corpora.Builder._generate_examples = generate_then_die
from sparseformer import data
cfg = data.default_data_config()
cfg.data_dir = sys.argv[1]
data.ensure_prepared(cfg)
"""


def test_a_killed_build_is_not_taken_as_prepared(tmp_path, capsys):
  result = run_python('-c', KILLED_BUILD, str(tmp_path))
  assert result.returncode == -9, result.stderr
  config_dir = tmp_path / 'sparseformer_text' / 'tinyshakespeare'
  assert [p.name.startswith('incomplete.') for p in config_dir.iterdir()] == [True]
  cfg = data_config(tmp_path)
  builder = data.ensure_prepared(cfg)
  assert 'preparing dataset sparseformer_text/tinyshakespeare' in capsys.readouterr().out
  assert builder.is_prepared() and builder.info.splits['validation'].num_examples > 0
  data.ensure_prepared(cfg)
  assert capsys.readouterr().out == ''  # prepared once, reused after


def test_build_cli(data_dir, tmp_path):
  result = run_python('-m', 'sparseformer.cli.prepare_data', '--name=sparseformer_text/tinyshakespeare',
                      f'--data_dir={data_dir}')
  assert result.returncode == 0 and "'validation'" in result.stdout, result.stderr
  result = run_python('-m', 'sparseformer.cli.prepare_data', '--name=sparseformer_text/bookz', f'--data_dir={tmp_path}')
  assert result.returncode == 2 and result.stderr.count('\n') == 1
  assert "did you mean 'sparseformer_text/books'" in result.stderr


def test_user_dataset_prepared_elsewhere_is_read_by_name(tmp_path, data_dir):
  """Any TFDS dataset prepared as ArrayRecord is found by name (here a copy of ours);
  an unfinished copy (killed before TFDS's final rename) is not."""
  prepared = data_dir / 'sparseformer_text' / 'tinyshakespeare' / '1.0.0'
  shutil.copytree(prepared, tmp_path / 'my_text' / 'incomplete.ABC123_2.0.0')
  with pytest.raises(UserError, match='not prepared'):
    data.ensure_prepared(data_config(tmp_path, name='my_text'))
  shutil.copytree(prepared, tmp_path / 'my_text' / '1.0.0')
  batches = list(data.eval_batches(data_config(tmp_path, name='my_text'), split='validation', seq_len=256,
                                   batch_size=4))
  assert len(batches) > 5


# Packing


def pack(documents, seq_len):
  dataset = grain.MapDataset.source([np.asarray(d, np.int32) for d in documents]).to_iter_dataset()
  return list(PackedRows(dataset, seq_len, pad_id=0))


def row_pieces(rows):
  """[(row, start, end, tokens with the piece's last target appended)] in order."""
  pieces = []
  for index, row in enumerate(rows):
    for segment in range(1, row['segment_ids'].max() + 1):
      where = np.flatnonzero(row['segment_ids'] == segment)
      assert len(where) and (np.diff(where) == 1).all()
      pieces.append((index, where[0], where[-1] + 1, list(row['tokens'][where]) + [row['targets'][where[-1]]]))
  return pieces


def check_row_fields(row):
  used = row['loss_mask'] > 0
  assert row['loss_mask'].dtype == np.float32 and row['tokens'].dtype == np.int32
  assert ((row['segment_ids'] > 0) == used).all()
  for name in ('tokens', 'targets', 'positions'):
    assert (row[name][~used] == 0).all()
  assert used[:used.sum()].all()  # padding at the end only
  assert (np.diff(row['segment_ids'][used]) >= 0).all()  # segments in order
  for segment in range(1, row['segment_ids'].max() + 1):
    where = row['segment_ids'] == segment
    assert list(row['positions'][where]) == list(range(where.sum()))
    assert (row['tokens'][where][1:] == row['targets'][where][:-1]).all()  # targets are the next tokens


def check_packing(documents, seq_len):
  """Every rule of packing.py, from the rows of packing `documents`."""
  rows = pack(documents, seq_len)
  for row in rows:
    check_row_fields(row)
  pieces, index = row_pieces(rows), 0
  for doc in documents:
    row, start, end, tokens = pieces[index]
    index += 1
    if len(doc) - 1 <= seq_len:
      assert tokens == list(doc)  # never split
      continue
    assert end == seq_len  # a long document fills the row it starts in
    while len(tokens) < len(doc):
      row, start, end, more = pieces[index]
      index += 1
      assert start == 0 and (end == seq_len or len(tokens) + len(more) - 1 == len(doc))
      tokens += more[1:]
    assert tokens == list(doc)  # and reassembles exactly
  assert index == len(pieces)
  for (row, _, end, _), (next_row, _, _, next_tokens) in zip(pieces, pieces[1:]):
    if next_row != row and end < seq_len:  # a row closed early: the next document did not fit
      assert seq_len - end < len(next_tokens) - 1 <= seq_len
  return rows


def test_packing_rules_on_examples():
  rng = np.random.default_rng(0)
  documents = [list(rng.integers(3, 100, n)) for n in (5, 17, 3, 40, 9, 16, 17, 2, 33, 11, 2, 70)]
  check_packing(documents, seq_len=16)
  rows = pack([[3] * 11, [4] * 9], seq_len=16)  # 10 pairs, then 8 pairs: no room for 8 in 6
  assert list(rows[0]['segment_ids']) == [1] * 10 + [0] * 6
  rows = pack([[3] * 11, [4] * 30], seq_len=16)  # a 29-pair document fills the 6 free slots
  assert list(rows[0]['segment_ids']) == [1] * 10 + [2] * 6 and list(rows[0]['positions'][10:]) == list(range(6))


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(st.lists(st.integers(2, 60), min_size=1, max_size=12), st.integers(1, 24))
def test_packing_rules_hold_for_any_lengths(lengths, seq_len):
  documents = [list(range(3 + i, 3 + i + n)) for i, n in enumerate(lengths)]
  check_packing(documents, seq_len)


def test_packing_state_restores_the_following_rows_exactly():
  rng = np.random.default_rng(1)
  documents = [rng.integers(3, 100, n) for n in (7, 90, 12, 5, 41, 3, 64, 8)]
  dataset = PackedRows(grain.MapDataset.source(documents).to_iter_dataset(), seq_len=16, pad_id=0)
  iterator, states, rows = iter(dataset), [], []
  for _ in range(20):
    states.append(json.loads(json.dumps(iterator.get_state())))
    rows.append(next(iterator, None))
  assert rows[-1] is None and any(state['pairs_emitted'] > 0 for state in states)
  for index, state in enumerate(states):
    restored = iter(dataset)
    restored.set_state(state)
    for want in rows[index:]:
      got = next(restored, None)
      assert (got is None) == (want is None)
      if want is not None:
        for name in want:
          np.testing.assert_array_equal(got[name], want[name])


# The training iterator


def assert_batches_equal(want, got):
  assert len(want) == len(got)
  for a, b in zip(want, got):
    for name in a:
      np.testing.assert_array_equal(a[name], b[name])


def test_train_iterator_resumes_exactly_from_any_state(data_dir):
  cfg = data_config(data_dir)
  make = lambda: data.train_iterator(cfg, seq_len=512, global_batch_size=2, seed=3)
  reference, states, expected = make(), [], []
  for _ in range(12):  # 4 KB passages in rows of 512: states fall inside documents
    state = reference.get_state()
    assert len(json.dumps(state)) < 200
    states.append(json.loads(json.dumps(state)))
    expected.append(next(reference))
  assert expected[0]['tokens'].shape == (2, 512) and set(expected[0]) == {
      'tokens', 'targets', 'positions', 'segment_ids', 'loss_mask'}
  assert any(state['pairs_emitted'] > 0 for state in states)
  for index in (1, 5, 11):
    resumed = make()
    resumed.set_state(states[index])
    assert_batches_equal(expected[index:], [next(resumed) for _ in range(12 - index)])


def test_train_order_depends_on_the_seed(data_dir):
  cfg = data_config(data_dir)
  first = lambda seed: [next(iterator) for iterator in [data.train_iterator(
      cfg, seq_len=64, global_batch_size=4, seed=seed)] for _ in range(3)]
  assert_batches_equal(first(0), first(0))
  assert not np.array_equal(first(0)[0]['tokens'], first(1)[0]['tokens'])


def test_each_process_reads_its_shard_reshuffled_every_epoch(data_dir):
  """26 processes: process 4 owns documents 4, 30, 56, ...; rows longer than any
  passage hold whole documents, so the documents read can be told apart."""
  cfg = data_config(data_dir)
  texts = [text for _, text in read_split(data_dir, 'sparseformer_text/tinyshakespeare', 'train')]
  shard = texts[4::26]
  iterator = data.train_iterator(cfg, seq_len=corpora.PASSAGE_BYTES + 1, global_batch_size=26, seed=0,
                                 process_index=4, process_count=26)
  read = []
  while len(read) < 3 * len(shard):
    row = {name: values[0] for name, values in next(iterator).items()}
    for segment in range(1, row['segment_ids'].max() + 1):
      read.append(BYTES.decode(row['tokens'][row['segment_ids'] == segment]))
  epochs = [read[i * len(shard):(i + 1) * len(shard)] for i in range(3)]
  assert all(sorted(epoch) == sorted(shard) for epoch in epochs)
  assert epochs[0] != epochs[1] and epochs[1] != epochs[2]


# Evaluation


def test_eval_batches_cover_every_validation_token_once(data_dir):
  cfg = data_config(data_dir)
  texts = [text for _, text in read_split(data_dir, 'sparseformer_text/tinyshakespeare', 'validation')]
  expected = sum(len(BYTES.encode(text)) + 1 for text in texts)
  batches = list(data.eval_batches(cfg, split='validation', seq_len=300, batch_size=8))
  assert all(b['tokens'].shape == (8, 300) and b['loss_mask'].dtype == np.float32 for b in batches)
  assert sum(int(b['loss_mask'].sum()) for b in batches) == expected
  assert (batches[-1]['loss_mask'].sum(axis=1) == 0).any()  # the last batch is completed with padding
  assert_batches_equal(batches, list(data.eval_batches(cfg, split='validation', seq_len=300, batch_size=8)))
  assert len(list(data.eval_batches(cfg, split='validation', seq_len=300, batch_size=8, max_batches=2))) == 2
  # Two processes: the same number of batches each, the rows split between them.
  shares = [list(data.eval_batches(cfg, split='validation', seq_len=300, batch_size=4, process_index=p,
                                   process_count=2)) for p in (0, 1)]
  assert len(shares[0]) == len(shares[1])
  assert sum(int(b['loss_mask'].sum()) for share in shares for b in share) == expected


# Tokenizers


def test_byte_tokenizer_round_trip_and_bytes_per_token():
  tokenizer = make_tokenizer('byte')
  text = 'Où est la plume? ✓\n'
  ids = tokenizer.encode(text)
  assert ids.dtype == np.int32 and ids.min() >= 3
  assert tokenizer.decode(ids) == text and tokenizer.decode(tokenizer.encode(text.encode('utf-8'))) == text
  assert tokenizer.token_bytes[ids].sum() == len(text.encode('utf-8'))
  assert tokenizer.token_bytes.shape == (259,) and tokenizer.token_bytes[:3].sum() == 0
  assert (tokenizer.vocab_size, tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (259, 0, 1, 2)
  assert tokenizer.spec == 'byte'


def test_sentencepiece_trained_by_the_cli(tmp_path, data_dir):
  output = tmp_path / 'spm' / 'tiny.model'
  result = run_python('-m', 'sparseformer.cli.train_tokenizer', '--dataset=sparseformer_text/tinyshakespeare',
                      f'--data_dir={data_dir}', '--vocab_size=400', f'--output={output}')
  assert result.returncode == 0, result.stderr
  assert f'spm:{output}' in result.stdout
  tokenizer = make_tokenizer(f'spm:{output}')
  assert tokenizer.spec == f'spm:{output}' and tokenizer.vocab_size == 400
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
  assert tokenizer.token_bytes.shape == (400,) and tokenizer.token_bytes[:3].sum() == 0
  for _, text in read_split(data_dir, 'sparseformer_text/tinyshakespeare', 'validation')[:5]:
    ids = tokenizer.encode(text.encode('utf-8'))
    assert ids.dtype == np.int32 and len(ids) < len(text.encode('utf-8')) / 1.3
    decoded = tokenizer.decode(ids)
    assert decoded == text and tokenizer.token_bytes[ids].sum() == len(decoded.encode('utf-8'))
  odd = 'naïve — ✓ 日本\n'  # characters unseen in training go through byte fallback
  assert tokenizer.decode(tokenizer.encode(odd)) == odd
  assert tokenizer.token_bytes[tokenizer.encode(odd)].sum() == len(odd.encode('utf-8'))
  batch = next(data.train_iterator(data_config(data_dir, tokenizer=f'spm:{output}'), seq_len=64,
                                   global_batch_size=2, seed=0))
  assert batch['tokens'].max() < 400 and batch['tokens'][0, 0] == 1


def test_sentencepiece_vocabulary_too_small_is_a_user_error(tmp_path, data_dir):
  with pytest.raises(UserError, match='vocab_size=300 is too small.*need at least'):
    train_from_dataset(data_config(data_dir), str(tmp_path / 'small.model'), vocab_size=300)


# Staying free of TensorFlow, bad input


NO_TENSORFLOW = """
import sys
import sparseformer.data
assert 'grain' not in sys.modules and 'tensorflow_datasets' not in sys.modules  # a light import
from sparseformer import data
cfg = data.default_data_config()
cfg.data_dir = sys.argv[1]
data.ensure_prepared(cfg)
next(data.train_iterator(cfg, seq_len=64, global_batch_size=2, seed=0))
next(data.eval_batches(cfg, split='validation', seq_len=64, batch_size=2))
print(sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.')))
"""


def test_the_pipeline_runs_without_tensorflow(data_dir):
  result = run_python('-c', NO_TENSORFLOW, str(data_dir))
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == '[]'


@pytest.mark.parametrize('fields,message', [
    ({'name': 'sparseformer_text/bookz'}, "did you mean 'sparseformer_text/books'"),
    ({'name': 'sparseformer_text'}, 'known: sparseformer_text/tinyshakespeare, sparseformer_text/books'),
    ({'name': 'sparseformer_text1'}, "not prepared in .*; did you mean 'sparseformer_text'"),
    ({'name': 'pg19'}, 'not prepared in '),
    ({'data_dir': '/nonexistent/tfds', 'name': 'pg19'}, 'the data dir /nonexistent/tfds does not exist'),
    ({'text_key': 'book_text'}, r"available: \['doc_id', 'text'\]"),
    ({'train_split': 'training'}, r"split 'training' is not in .*available: \['train', 'validation'\]"),
    ({'tokenizer': 'spm:/nonexistent.model'}, 'no SentencePiece model'),
    ({'tokenizer': 'wordpiece'}, 'use byte, codes:N, spm:/path/to/model or hf:'),
])
def test_bad_data_settings_are_user_errors(data_dir, fields, message):
  with pytest.raises(UserError, match=message):
    data.train_iterator(data_config(**{'data_dir': data_dir, **fields}), seq_len=64, global_batch_size=2, seed=0)


def test_bad_eval_split_and_batch_sizes_are_user_errors(data_dir):
  cfg = data_config(data_dir)
  with pytest.raises(UserError, match=r"split 'test' is not in .*available: \['train', 'validation'\]"):
    data.eval_batches(cfg, split='test', seq_len=64, batch_size=2)  # raised at once, not on first batch
  with pytest.raises(UserError, match='not divisible by the 2 processes'):
    data.train_iterator(cfg, seq_len=64, global_batch_size=3, seed=0, process_count=2)


def test_data_dir_resolution(monkeypatch):
  monkeypatch.setenv('SPARSEFORMER_DATA_DIR', '/tmp/from_env')
  assert data.data_dir_of(data_config('/tmp/explicit')) == '/tmp/explicit'
  assert data.data_dir_of(data_config('')) == '/tmp/from_env'
  monkeypatch.delenv('SPARSEFORMER_DATA_DIR')
  assert data.data_dir_of(data_config('')) == os.path.expanduser('~/.cache/sparseformer/tensorflow_datasets')
