"""The shipped corpora as a TFDS dataset (ArrayRecord files, no TensorFlow needed).

Configs:
  tinyshakespeare  passages of about 4 KB cut at blank lines (speech boundaries);
                   every 10th passage is validation.
  books            Project Gutenberg books, one document each, licence header and footer
                   removed; pg9198 and pg20249 are validation.
"""

import pathlib
import re

import numpy as np
import tensorflow_datasets as tfds

CORPORA = pathlib.Path(__file__).resolve().parent.parent / 'corpora'
PASSAGE_BYTES = 4096
VALIDATION_BOOKS = ('pg9198', 'pg20249')
_START = re.compile(r'^\*\*\* ?START OF (THE|THIS) PROJECT GUTENBERG[^*]*\*\*\*', re.MULTILINE)
_END = re.compile(r'^(\*\*\* ?END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg).*$',
                  re.MULTILINE | re.IGNORECASE)


def read_text(path):
  """UTF-8 if it decodes, else ISO-8859-1 (older Gutenberg files); line ends normalised."""
  raw = path.read_bytes()
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError:
    text = raw.decode('iso-8859-1')
  return text.replace('\r\n', '\n').lstrip('\ufeff')


def strip_gutenberg(text):
  """The book between the START and END marker lines (the whole text if they are missing)."""
  start, end = _START.search(text), _END.search(text)
  body = text[start.end() if start else 0:end.start() if end else len(text)]
  return body.strip() + '\n'


def passages(text, target_bytes=PASSAGE_BYTES):
  """Consecutive blank-line-separated blocks joined until a passage reaches target_bytes."""
  blocks = [b for b in re.split(r'\n\s*\n', text) if b.strip()]
  current, size = [], 0
  for block in blocks:
    current.append(block)
    size += len(block.encode('utf-8')) + 2
    if size >= target_bytes:
      yield '\n\n'.join(current) + '\n'
      current, size = [], 0
  if current:
    yield '\n\n'.join(current) + '\n'


def tinyshakespeare_documents():
  """[(doc_id, text, split)] of the tinyshakespeare config."""
  texts = list(passages(read_text(CORPORA / 'tinyshakespeare.txt')))
  return [(f'tinyshakespeare-{i:04d}', text, 'validation' if i % 10 == 9 else 'train') for i, text in enumerate(texts)]


def books_documents():
  """[(doc_id, text, split)] of the books config."""
  paths = sorted((CORPORA / 'books').glob('*.txt'))
  return [(path.stem, strip_gutenberg(read_text(path)), 'validation' if path.stem in VALIDATION_BOOKS else 'train')
          for path in paths]


DOCUMENTS = {'tinyshakespeare': tinyshakespeare_documents, 'books': books_documents}


class Builder(tfds.core.GeneratorBasedBuilder):
  """Shipped public-domain text, one example per document."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'tinyshakespeare passages and Project Gutenberg books.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='tinyshakespeare', description='tinyshakespeare in ~4 KB passages'),
      tfds.core.BuilderConfig(name='books', description='11 Project Gutenberg books, one document each'),
  ]

  def _info(self):
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(), 'doc_id': tfds.features.Text(),
                                             'num_bytes': np.int64}),
        supervised_keys=None,
        homepage='https://www.gutenberg.org',
    )

  def _split_generators(self, dl_manager):
    documents = [d for d in DOCUMENTS[self.builder_config.name]() if d[1].strip()]
    if not documents:
      raise ValueError(f'the {self.builder_config.name} corpus files in {CORPORA} hold no text')
    splits = sorted({split for _, _, split in documents})
    return {split: self._generate_examples([d for d in documents if d[2] == split]) for split in splits}

  def _generate_examples(self, documents):
    for doc_id, text, _ in documents:
      yield doc_id, {'text': text, 'doc_id': doc_id, 'num_bytes': len(text.encode('utf-8'))}
