"""Reading the shipped corpora (sparseformer/data/corpora) without TensorFlow Datasets:
the TFDS builder (sparseformer_text) and the synthetic tasks' haystacks both read the
books through here.

Books pg9198 and pg20249 are the validation books; the others are training books.
"""

import pathlib
import re

from sparseformer.errors import UserError

CORPORA = pathlib.Path(__file__).resolve().parent / 'corpora'
BOOKS = CORPORA / 'books'
VALIDATION_BOOKS = ('pg9198', 'pg20249')

# Some files wrap the title, so the closing *** of the START marker may be a line later.
_START = re.compile(r'^\*\*\* ?START OF (?:THE|THIS) PROJECT GUTENBERG[^*]{0,400}\*\*\*[^\n]*$',
                    re.MULTILINE | re.IGNORECASE)
# Older files put an "End of the Project Gutenberg EBook of ..." line before the marker.
_END = re.compile(r'^(?:\*\*\* ?END OF (?:THE|THIS) PROJECT GUTENBERG|End of (?:the )?Project Gutenberg)',
                  re.MULTILINE | re.IGNORECASE)


def read_text(path):
  """The file as str: UTF-8 when it decodes as such, else ISO-8859-1 (older Gutenberg
  files); a BOM is dropped and line ends are normalised to \\n."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise UserError(f'corpus file {path} is missing')
  raw = path.read_bytes()
  try:
    text = raw.decode('utf-8-sig')
  except UnicodeDecodeError:
    text = raw.decode('iso-8859-1')
  text = text.replace('\r\n', '\n').replace('\r', '\n')
  if not text.strip():
    raise UserError(f'corpus file {path} is empty')
  return text


def strip_gutenberg(text):
  """The book between the START and END marker lines; the whole text if a marker is missing."""
  start = _START.search(text)
  body_start = start.end() if start else 0
  end = _END.search(text, body_start)
  body = text[body_start:end.start() if end else len(text)]
  return body.strip() + '\n'


def book_split(book_id):
  """'validation' for the validation books, else 'train'."""
  return 'validation' if book_id in VALIDATION_BOOKS else 'train'


def book_paths(folder=None):
  """The books (*.txt) in file name order; UserError if there are none."""
  folder = pathlib.Path(folder) if folder is not None else BOOKS
  paths = sorted(folder.glob('*.txt'))
  if not paths:
    raise UserError(f'no books (*.txt) in {folder}')
  return paths
