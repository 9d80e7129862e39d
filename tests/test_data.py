"""The data pipeline: corpora, tokenizers, packing rules, resumable iteration, eval passes."""

import json
import os
import subprocess
import sys

import grain
import numpy as np
import pytest

from sparseformer import data
from sparseformer.data.build import open_split
from sparseformer.data.packing import PackedRows
from sparseformer.data.sparseformer_text import sparseformer_text_dataset_builder as corpora
from sparseformer.data.tokenizers import ByteTokenizer, make_tokenizer
from sparseformer.errors import UserError
from train_helpers import ROOT


def data_config(data_dir, **fields):
  cfg = data.default_data_config()
  cfg.data_dir = str(data_dir)
  cfg.update(fields)
  return cfg


def all_texts(cfg, split):
  source = open_split(cfg, split)
  return [source[i]['text'].decode('utf-8') for i in range(len(source))]


def test_tinyshakespeare_splits_by_document(data_dir):
  cfg = data_config(data_dir)
  train, validation = all_texts(cfg, 'train'), all_texts(cfg, 'validation')
  assert len(train) == 234 and len(validation) == 26
  assert all(text.strip() for text in train + validation)
  assert not set(train) & set(validation)
  original = corpora.read_text(corpora.CORPORA / 'tinyshakespeare.txt')
  # Passages are cut at blank lines only: all of the text is kept.
  assert sum(len(t.split()) for t in train + validation) == len(original.split())


def test_books_are_whole_documents_without_gutenberg_boilerplate():
  documents = corpora.books_documents()
  assert len(documents) == 11
  assert sorted(d[0] for d in documents if d[2] == 'validation') == ['pg20249', 'pg9198']
  for doc_id, text, _ in documents:
    upper = text.upper()
    assert 'START OF' not in upper[:300] and not upper.startswith('*')
    assert 'END OF THE PROJECT GUTENBERG' not in upper and 'END OF THIS PROJECT GUTENBERG' not in upper
    assert len(text) > 40_000, doc_id


def pack(documents, seq_len):
  dataset = grain.MapDataset.source([np.asarray(d, np.int32) for d in documents]).to_iter_dataset()
  return list(PackedRows(dataset, seq_len, pad_id=0))


def pieces_of(rows):
  """[(tokens with the last target appended)] per segment, in order."""
  out = []
  for row in rows:
    for segment in range(1, row['segment_ids'].max() + 1):
      where = row['segment_ids'] == segment
      out.append(list(row['tokens'][where]) + [int(row['targets'][where][-1])])
  return out


def test_packing_never_splits_a_short_document_and_splits_long_ones_exactly():
  rng = np.random.default_rng(0)
  lengths = [5, 17, 3, 40, 9, 16, 17, 2, 33, 11]
  documents = [list(rng.integers(3, 100, n)) for n in lengths]
  rows = pack(documents, seq_len=16)
  pieces = pieces_of(rows)
  rebuilt, piece_index = [], 0
  for doc in documents:
    joined = list(pieces[piece_index])
    piece_index += 1
    while len(joined) < len(doc):  # a long document continues in the next pieces
      joined += pieces[piece_index][1:]
      piece_index += 1
    rebuilt.append(joined)
    if len(doc) - 1 <= 16:
      assert len(pieces_of_doc := [joined]) == 1 and joined == doc
  assert rebuilt == documents
  for row in rows:
    used = row['loss_mask'] > 0
    assert (row['segment_ids'][used] > 0).all() and (row['segment_ids'][~used] == 0).all()
    assert (row['tokens'][~used] == 0).all() and (row['positions'][~used] == 0).all()
    for segment in range(1, row['segment_ids'].max() + 1):
      where = np.flatnonzero(row['segment_ids'] == segment)
      assert (np.diff(where) == 1).all() and list(row['positions'][where]) == list(range(len(where)))
      assert (row['tokens'][where][1:] == row['targets'][where][:-1]).all()


def test_packing_fills_the_gap_with_a_long_document_but_not_a_short_one():
  rows = pack([[3] * 11, [4] * 9], seq_len=16)  # 10 pairs, then 8 pairs: no room for 8 in 6
  assert list(rows[0]['segment_ids']) == [1] * 10 + [0] * 6
  rows = pack([[3] * 11, [4] * 30], seq_len=16)  # a 29-pair document fills the 6 free slots
  assert list(rows[0]['segment_ids']) == [1] * 10 + [2] * 6


def batches(iterator, count):
  return [next(iterator) for _ in range(count)]


def test_train_iterator_resumes_exactly_from_any_state(data_dir):
  cfg = data_config(data_dir)
  reference = data.train_iterator(cfg, seq_len=512, global_batch_size=2, seed=3)
  states, expected = [], []
  for _ in range(12):  # 4 KB passages, 512-token rows: states fall inside documents
    states.append(json.loads(json.dumps(reference.get_state())))
    expected.append(next(reference))
  assert any(state['offset'] > 0 for state in states)
  for index in (1, 5, 11):
    resumed = data.train_iterator(cfg, seq_len=512, global_batch_size=2, seed=3)
    resumed.set_state(states[index])
    for want, got in zip(expected[index:], batches(resumed, 12 - index)):
      for key in want:
        np.testing.assert_array_equal(want[key], got[key])


def test_train_order_depends_on_the_seed_and_shards_split_the_documents(data_dir):
  cfg = data_config(data_dir)
  first = lambda seed: next(data.train_iterator(cfg, seq_len=64, global_batch_size=4, seed=seed))['tokens']
  np.testing.assert_array_equal(first(0), first(0))
  assert not np.array_equal(first(0), first(1))
  shard = lambda index: next(data.train_iterator(cfg, seq_len=64, global_batch_size=4, seed=0,
                                                 process_index=index, process_count=2))['tokens']
  assert shard(0).shape == (2, 64) and not np.array_equal(shard(0), shard(1))
  with pytest.raises(UserError, match='not divisible'):
    data.train_iterator(cfg, seq_len=64, global_batch_size=3, seed=0, process_count=2)


def test_eval_batches_cover_every_validation_token_once(data_dir):
  cfg = data_config(data_dir)
  tokenizer = ByteTokenizer()
  expected = sum(len(tokenizer.encode(t)) + 1 for t in all_texts(cfg, 'validation'))
  got = list(data.eval_batches(cfg, split='validation', seq_len=300, batch_size=8))
  assert all(b['tokens'].shape == (8, 300) for b in got)
  assert sum(int(b['loss_mask'].sum()) for b in got) == expected
  assert len(list(data.eval_batches(cfg, split='validation', seq_len=300, batch_size=8, max_batches=2))) == 2


def test_byte_tokenizer_round_trip_and_bytes_per_token():
  tokenizer = make_tokenizer('byte')
  text = 'Où est la plume? ✓'
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text and ids.min() >= 3
  assert tokenizer.token_bytes[ids].sum() == len(text.encode('utf-8'))
  assert tokenizer.token_bytes[:3].sum() == 0 and tokenizer.vocab_size == 259


def test_sentencepiece_trained_by_the_cli(tmp_path, data_dir):
  output = tmp_path / 'spm' / 'tiny.model'
  result = subprocess.run([sys.executable, '-m', 'sparseformer.cli.train_tokenizer', '--dataset=sparseformer_text/tinyshakespeare',
                           f'--data_dir={data_dir}', '--vocab_size=400', f'--output={output}'],
                          capture_output=True, text=True, cwd=ROOT)
  assert result.returncode == 0, result.stderr
  assert f'spm:{output}' in result.stdout
  tokenizer = make_tokenizer(f'spm:{output}')
  assert tokenizer.vocab_size == 400 and (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
  text = all_texts(data_config(data_dir), 'validation')[0]
  ids = tokenizer.encode(text)
  assert len(ids) < len(text.encode('utf-8')) / 1.5
  assert tokenizer.decode(ids) == text  # lossless, newlines included
  assert tokenizer.token_bytes[ids].sum() == len(text.encode('utf-8'))
  batch = next(data.train_iterator(data_config(data_dir, tokenizer=f'spm:{output}'), seq_len=64,
                                   global_batch_size=2, seed=0))
  assert batch['tokens'].max() < 400


@pytest.mark.parametrize('fields,message', [
    ({'name': 'sparseformer_text/bookz'}, "did you mean 'sparseformer_text/books'"),
    ({'name': 'my_corpus'}, 'not prepared'),
    ({'text_key': 'body'}, "available: ['doc_id', 'num_bytes', 'text']"),
    ({'tokenizer': 'spm:/nonexistent.model'}, 'no SentencePiece model'),
    ({'tokenizer': 'wordpiece'}, 'use byte or spm'),
])
def test_bad_data_settings_are_user_errors(data_dir, fields, message):
  with pytest.raises(UserError) as error:
    data.train_iterator(data_config(data_dir, **fields), seq_len=64, global_batch_size=2, seed=0)
  assert message in str(error.value)
  with pytest.raises(UserError, match="available: \\['train', 'validation'\\]"):
    list(data.eval_batches(data_config(data_dir), split='test', seq_len=64, batch_size=2))


def test_user_dataset_prepared_elsewhere_is_read_by_name(tmp_path, data_dir):
  """Any TFDS dataset prepared as ArrayRecord is found by name (here a copy of ours)."""
  import shutil
  shutil.copytree(os.path.join(data_dir, 'sparseformer_text', 'tinyshakespeare'), tmp_path / 'my_text')
  cfg = data_config(tmp_path, name='my_text')
  assert len(all_texts(cfg, 'validation')) == 26
