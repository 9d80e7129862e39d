"""The shipped corpora as a TFDS dataset (ArrayRecord files, no TensorFlow needed).

Configs:
  tinyshakespeare  passages of at most ~4 KB, cut only at blank lines (speech
                   boundaries); passage i is validation when i % 10 == 9.
  books            Project Gutenberg books, one whole document each, licence header
                   and footer removed; pg9198 and pg20249 are validation.

Features: `text` (the document) and `doc_id` (`tinyshakespeare-0042`, `pg9198`), which
is also the example key. Examples are stored in corpus order (no TFDS shuffling): the
training pipeline shuffles on its own, and evaluation reads in a predictable order. The
version folder also holds sparseformer_files.json, each ArrayRecord file's size and
sha256, checked on use (integrity.py).
"""

import re

import tensorflow_datasets as tfds

from sparseformer.data import integrity
from sparseformer.data.corpora_text import CORPORA, VALIDATION_BOOKS, read_text, strip_gutenberg  # noqa: F401
from sparseformer.errors import UserError

SPLITS = ('train', 'validation')
PASSAGE_BYTES = 4096

# One or more blank (or whitespace-only) lines after the end of a line.
_BLANK_LINES = re.compile(r'\n(?:[ \t]*\n)+')


def passages(text, target_bytes=PASSAGE_BYTES):
  """Consecutive blank-line-separated blocks, grouped while a group stays within
  target_bytes (a single longer block is a passage of its own). Each passage ends with
  one newline; the blank lines between passages are dropped."""
  blocks = [block.strip('\n') for block in _BLANK_LINES.split(text) if block.strip()]
  group, size = [], 0
  for block in blocks:
    block_bytes = len(block.encode('utf-8')) + 2  # with the separating blank line
    if group and size + block_bytes > target_bytes:
      yield '\n\n'.join(group) + '\n'
      group, size = [], 0
    group.append(block)
    size += block_bytes
  if group:
    yield '\n\n'.join(group) + '\n'


def tinyshakespeare_documents(corpora=None):
  """[(doc_id, text, split)] of the tinyshakespeare config."""
  path = (corpora or CORPORA) / 'tinyshakespeare.txt'
  return [(f'{path.stem}-{index:04d}', text, 'validation' if index % 10 == 9 else 'train')
          for index, text in enumerate(passages(read_text(path)))]


def books_documents(corpora=None):
  """[(doc_id, text, split)] of the books config, one per book, in file name order."""
  folder = (corpora or CORPORA) / 'books'
  paths = sorted(folder.glob('*.txt'))
  if not paths:
    raise UserError(f'no books (*.txt) in {folder}')
  return [(path.stem, strip_gutenberg(read_text(path)), 'validation' if path.stem in VALIDATION_BOOKS else 'train')
          for path in paths]


DOCUMENTS = {'tinyshakespeare': tinyshakespeare_documents, 'books': books_documents}


def documents_by_split(config_name):
  """{split: [(doc_id, text)]} of a config; UserError if a split would be empty."""
  documents = DOCUMENTS[config_name](CORPORA)
  by_split = {split: [(doc_id, text) for doc_id, text, where in documents if where == split] for split in SPLITS}
  for split, members in by_split.items():
    if not members:
      raise UserError(f'sparseformer_text/{config_name}: the corpus in {CORPORA} gives no {split} documents')
  return by_split


class Builder(tfds.core.GeneratorBasedBuilder):
  """Shipped public-domain text, one example per document."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'tinyshakespeare passages and 11 Project Gutenberg books.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='tinyshakespeare', description='tinyshakespeare in passages of ~4 KB'),
      tfds.core.BuilderConfig(name='books', description='11 Project Gutenberg books, one document each'),
  ]

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(), 'doc_id': tfds.features.Text()}),
        supervised_keys=None,
        disable_shuffling=True,
        homepage='https://www.gutenberg.org',
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the corpora ship with the package: nothing to download
    by_split = documents_by_split(self.builder_config.name)
    return {split: self._generate_examples(members) for split, members in by_split.items()}

  def _generate_examples(self, documents):
    for doc_id, text in documents:
      yield doc_id, {'text': text, 'doc_id': doc_id}

  def _download_and_prepare(self, dl_manager, download_config):
    """Then records each file's size and sha256 (integrity.py), before TFDS renames the
    finished folder into place."""
    super()._download_and_prepare(dl_manager, download_config)
    integrity.record_files(str(self.data_dir))
