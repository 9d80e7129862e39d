"""Your own documents as a TFDS dataset (ArrayRecord, no TensorFlow), used by name after:

    python -m sparseformer.cli.prepare_data --name my_books --files 'books/*.txt' --files 'notes.jsonl.gz'
    python train.py ... --config.data.name=my_books

Formats, by file name (a trailing `.gz` is decompressed while reading):
  *.jsonl, *.ndjson  one document per line: the string under --text_key (default `text`);
                     blank lines are skipped; doc id `<file id>:<line number>`
  anything else      plain text, the whole file one document (a UTF-8 BOM is dropped and
                     line ends become \\n); doc id `<file id>`
A file id is its path from the last folder before the glob's first wildcard, that
folder's name included (`books/*.txt` -> `books/a.txt`; a glob without a wildcard: from
the file's own folder). Two files with one id are refused.

Split: with --validation_files, the files they match are the validation split (also when
--files matches them) and all others train. Otherwise a document is validation when the
first 8 bytes of sha256(doc id), read as a fraction of 2**64, are below --validation
(default 0.05): the same files always give the same split, and adding files moves no
document already there.

Every document is checked before anything is written, each problem one UserError line
naming the file (and line): an empty file, a binary file (a NUL byte), text that is not
UTF-8 (refused with its byte offset, never guessed: convert it, e.g. with iconv), a line
that is not JSON, not an object, lacks the key or holds no string under it, a document
that is empty or only whitespace (under one token), a glob matching no file, and a split
left empty.

Streaming: a document is read at a time (a text file whole, JSON Lines line by line):
once to check every document, hash the files and count each split, then once per split
to write it. TFDS's writer holds up to 1 GB of examples in memory before spilling to
disk. Progress (documents, bytes) goes to stderr.

The finished dataset lands in `<data_dir>/<name>/1.0.0/` (build.build_and_swap: built
aside, moved into place at the end) with features `text` and `doc_id`, documents in doc
id order, and sparseformer_files.json recording the size, sha256 and mtime of each
source file (a changed one is a warning on later use: integrity.py).
"""

import contextlib
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import os
import re
import sys
import time
import types
import zlib

import tensorflow_datasets as tfds

from sparseformer.data import build, integrity
from sparseformer.errors import UserError

SPLITS = ('train', 'validation')
DEFAULT_VALIDATION = 0.05
JSON_LINES = ('.jsonl', '.ndjson')
_NAME = re.compile(r'^[a-z][a-z0-9_]*$')
_WILDCARD = re.compile(r'[*?[]')
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Source:
  path: str    # as the glob matched it (messages)
  doc_id: str  # books/a.txt
  split: str   # 'train', 'validation', or '' (by the hash of each document's id)

  @property
  def gz(self):
    return self.path.endswith('.gz')

  @property
  def jsonl(self):
    return self.path.removesuffix('.gz').endswith(JSON_LINES)


# Names, globs and the split rule


def check_name(name):
  if build.is_shipped(name):
    raise UserError(f'--name {name}: names under {build.SHIPPED}/ are the shipped datasets; choose another name')
  if not _NAME.match(name or ''):
    raise UserError(f'--name {name!r}: use lower-case letters, digits and _, starting with a letter (e.g. my_books)')


def split_share(validation, validation_files):
  """The validation share of the hash split, or None with --validation_files."""
  if validation_files:
    if validation is not None:
      raise UserError('give either --validation SHARE or --validation_files GLOB, not both')
    return None
  share = DEFAULT_VALIDATION if validation is None else validation
  if not 0 < share < 1:
    raise UserError(f'--validation {share}: use a share of the documents in (0, 1), e.g. 0.05')
  return share


def glob_base(pattern):
  """The folder a glob's file ids start from: the last one before its first wildcard."""
  parts = pattern.split(os.sep)
  for index, part in enumerate(parts):
    if _WILDCARD.search(part):
      return os.sep.join(parts[:index]) or (os.sep if pattern.startswith(os.sep) else '.')
  return os.path.dirname(pattern) or '.'


def file_id(path, base):
  folder = os.path.basename(os.path.abspath(base))
  return os.path.join(folder, os.path.relpath(path, base)).replace(os.sep, '/')


def glob_sources(pattern, split, flag):
  pattern = os.path.expanduser(pattern)
  paths = sorted(path for path in glob.glob(pattern, recursive=True) if os.path.isfile(path))
  if not paths:
    raise UserError(f'{flag} {pattern!r} matches no files')
  base = glob_base(pattern)
  return [Source(path, file_id(path, base), split) for path in paths]


def find_sources(files, validation_files, share):
  """The sources in doc id order. A file matched twice is read once: as validation when a
  --validation_files glob matches it, under the first of its doc ids in sorted order."""
  matched = [*(source for pattern in validation_files
               for source in glob_sources(pattern, 'validation', '--validation_files')),
             *(source for pattern in files for source in glob_sources(pattern, '' if share else 'train', '--files'))]
  chosen = {}
  for source in sorted(matched, key=lambda s: (s.split != 'validation', s.doc_id)):
    chosen.setdefault(os.path.abspath(source.path), source)
  by_id = {}
  for source in chosen.values():
    if source.doc_id in by_id:
      raise UserError(f'{by_id[source.doc_id].path} and {source.path} both get the doc id {source.doc_id!r}; '
                      'give them globs whose folders before the first wildcard differ in name')
    by_id[source.doc_id] = source
  return [by_id[doc_id] for doc_id in sorted(by_id)]


def hash_fraction(doc_id):
  return int.from_bytes(hashlib.sha256(doc_id.encode('utf-8')).digest()[:8], 'big') / 2**64


def split_of(source, doc_id, share):
  if source.split:
    return source.split
  return 'validation' if hash_fraction(doc_id) < share else 'train'


# Reading and checking documents


class Counted(io.RawIOBase):
  """A file's bytes as read, counted and hashed on the way."""

  def __init__(self, raw):
    super().__init__()
    self.raw = raw
    self.sha256 = hashlib.sha256()
    self.bytes = 0

  def readable(self):
    return True

  def readinto(self, buffer):
    count = self.raw.readinto(buffer)
    if count:
      self.sha256.update(memoryview(buffer)[:count])
      self.bytes += count
    return count

  def finish(self):
    """(size, sha256) of the whole file, reading what the decoder left."""
    while self.read(_CHUNK):
      pass
    return self.bytes, self.sha256.hexdigest()


@contextlib.contextmanager
def opened(source):
  """(stream of the source's text bytes, Counted over the file's own bytes)."""
  try:
    raw = open(source.path, 'rb')
  except OSError as e:
    raise UserError(f'{source.path} cannot be read ({e.strerror})') from None
  with raw:
    counted = Counted(raw)
    stream = io.BufferedReader(counted, _CHUNK)
    if source.gz:
      stream = gzip.GzipFile(fileobj=stream, mode='rb')
    try:
      yield stream, counted
    except (OSError, EOFError, zlib.error) as e:
      what = 'is not a readable gzip file' if source.gz else 'cannot be read'
      raise UserError(f'{source.path} {what} ({integrity.one_line(e)})') from None


def decode(raw, where, offset, gz):
  """str of UTF-8 bytes; UserError with the byte offset of a NUL byte or invalid UTF-8."""
  nul = raw.find(b'\0')
  if nul >= 0:
    raise UserError(f'{where} is binary, not text (a NUL byte at byte {offset + nul}{of_text(gz)})')
  try:
    return raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise UserError(f'{where} is not UTF-8 (byte {offset + e.start}{of_text(gz)} is {raw[e.start:e.start + 1].hex()}); '
                    'convert it, e.g. iconv -f ISO-8859-1 -t UTF-8') from None


def of_text(gz):
  return ' of the decompressed text' if gz else ''


def text_document(source, stream):
  raw = stream.read()
  if not raw:
    raise UserError(f'{source.path} is empty')
  text = decode(raw, source.path, 0, source.gz).removeprefix('\ufeff')
  if not text.strip():
    raise UserError(f'{source.path} has only whitespace, no text')
  return text.replace('\r\n', '\n').replace('\r', '\n')


def json_type(value):
  return {dict: 'object', list: 'array', str: 'string', bool: 'boolean', type(None): 'null'}.get(
      type(value), 'number')


def json_document(source, number, line, offset, text_key):
  """The document of one JSON line; UserError naming file and line for any problem."""
  where = f'{source.path} line {number}'
  text = decode(line, where, offset, source.gz)
  try:
    value = json.loads(text.removeprefix('\ufeff') if number == 1 else text)
  except json.JSONDecodeError as e:
    raise UserError(f'{where} is not JSON ({e.msg} at column {e.colno})') from None
  if not isinstance(value, dict):
    raise UserError(f'{where} is a JSON {json_type(value)}, not an object with a {text_key!r} key')
  if text_key not in value:
    keys = ', '.join(repr(key) for key in list(value)[:8]) or 'none'
    raise UserError(f'{where} has no {text_key!r} key (its keys: {keys}); name the text key with --text_key')
  document = value[text_key]
  if not isinstance(document, str):
    raise UserError(f'{where}: {text_key!r} holds a JSON {json_type(document)}, not a string')
  if not document.strip():
    raise UserError(f'{where}: {text_key!r} is empty or only whitespace (a document needs at least one token)')
  try:
    document.encode('utf-8')
  except UnicodeEncodeError:
    raise UserError(f'{where}: {text_key!r} holds an unpaired surrogate escape (\\ud800-\\udfff)') from None
  return document


def documents(source, stream, text_key, wanted=None):
  """(doc_id, text) of the source's documents for which wanted(doc_id) holds (all without it)."""
  if not source.jsonl:
    if wanted is None or wanted(source.doc_id):
      yield source.doc_id, text_document(source, stream)
    return
  offset, found = 0, 0
  for number, line in enumerate(stream, 1):
    start, offset = offset, offset + len(line)
    if not line.strip():
      continue
    found += 1
    doc_id = f'{source.doc_id}:{number}'
    if wanted is None or wanted(doc_id):
      yield doc_id, json_document(source, number, line, start, text_key)
  if not found:
    raise UserError(f'{source.path} is empty' if not offset else f'{source.path} has only blank lines, no documents')


# Progress


def size_text(count):
  """'812 B', '1.4 kB', '23.0 MB', '4.1 GB'."""
  for unit, scale in (('GB', 1e9), ('MB', 1e6), ('kB', 1e3)):
    if count >= scale:
      return f'{count / scale:,.1f} {unit}'
  return f'{count} B'


class Progress:
  """One line on `stream`: redrawn in place on a terminal, else printed every 30 s; done() ends it."""

  def __init__(self, label, total_bytes, stream):
    self.label, self.total, self.stream = label, total_bytes, stream
    self.tty = hasattr(stream, 'isatty') and stream.isatty()
    self.every = 0.2 if self.tty else 30.0
    self.documents = self.bytes = 0
    self.shown = time.monotonic()

  def update(self, documents, position):
    self.documents += documents
    self.bytes = position
    if time.monotonic() - self.shown >= self.every:
      self.show()

  def show(self, end=''):
    self.shown = time.monotonic()
    text = f'{self.label}: {self.documents:,} documents, {size_text(self.bytes)} of {size_text(self.total)}'
    if self.tty:
      self.stream.write(f'\r{text}\x1b[K{end}')
    else:
      self.stream.write(text + '\n')
    self.stream.flush()

  def done(self):
    self.bytes = self.total
    self.show(end='\n')


# The plan: checked sources, counted splits


@dataclasses.dataclass
class Plan:
  sources: list
  text_key: str
  share: float  # None: the split is by file (--validation_files)
  counts: dict = dataclasses.field(default_factory=dict)
  facts: list = dataclasses.field(default_factory=list)  # per source: path, id, bytes, sha256, mtime_ns, ...

  def read_split(self, split, stream):
    """(doc_id, text) of one split, in doc id order, each source read only if it has some."""
    wanted = lambda source: lambda doc_id: split_of(source, doc_id, self.share) == split  # noqa: E731
    sources = [s for s in self.sources if s.jsonl or split_of(s, s.doc_id, self.share) == split]
    progress, done = Progress(f'writing {split}', sum(os.path.getsize(s.path) for s in sources), stream), 0
    for source in sources:
      with opened(source) as (text, counted):
        for doc_id, document in documents(source, text, self.text_key, wanted(source)):
          progress.update(1, done + counted.bytes)
          yield doc_id, document
      done += os.path.getsize(source.path)
    progress.done()


def survey(sources, text_key, share, stream):
  """The plan: every document checked, each file hashed, each split counted (UserError if
  one would be empty)."""
  plan = Plan(sources, text_key, share, counts=dict.fromkeys(SPLITS, 0))
  progress, done = Progress('checking', sum(os.path.getsize(s.path) for s in sources), stream), 0
  for source in sources:
    found = dict.fromkeys(SPLITS, 0)
    with opened(source) as (text, counted):
      for doc_id, _ in documents(source, text, text_key):
        found[split_of(source, doc_id, share)] += 1
        progress.update(1, done + counted.bytes)
      size, sha256 = counted.finish()
    done += size
    plan.facts.append({'id': source.doc_id, 'path': os.path.abspath(source.path), 'bytes': size, 'sha256': sha256,
                       'mtime_ns': os.stat(source.path).st_mtime_ns, 'documents': found})
    for split in SPLITS:
      plan.counts[split] += found[split]
  progress.done()
  check_counts(plan.counts, share)
  return plan


def check_counts(counts, share):
  total = sum(counts.values())
  for split, count in counts.items():
    if count:
      continue
    if share is None:
      raise UserError(f'the {split} split would be empty: the --validation_files are all the files')
    raise UserError(f'--validation {share} leaves the {split} split of {total} documents empty; '
                    + ('choose a larger share, or name the validation files with --validation_files'
                       if split == 'validation' else 'choose a smaller share'))


# The builder


class UserFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Documents from the user's files; `name` is set per dataset (builder_for)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Documents of text and JSON Lines files (python -m sparseformer.cli.prepare_data --files).'}

  def __init__(self, *, plan, stream, **kwargs):
    self.plan, self.stream = plan, stream
    super().__init__(**kwargs)

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description='Documents of text and JSON Lines files, one example each.',
        features=tfds.features.FeaturesDict({'text': tfds.features.Text(), 'doc_id': tfds.features.Text()}),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the files are local
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split):
    """Keys spread evenly over TFDS's 128-bit key range in document order: order kept
    (no shuffling) and, past 1 GB, TFDS's disk buckets evenly filled."""
    count = self.plan.counts[split]
    step, ordinal = 2**128 // count, 0
    for ordinal, (doc_id, text) in enumerate(self.plan.read_split(split, self.stream), 1):
      if ordinal > count:
        break
      yield (ordinal - 1) * step, {'text': text, 'doc_id': doc_id}
    if ordinal != count:
      raise UserError(f'the files changed while {self.name} was prepared ({split}: {count} documents checked, '
                      f'{ordinal} read); prepare it again')

  def _download_and_prepare(self, dl_manager, download_config):
    super()._download_and_prepare(dl_manager, download_config)
    integrity.record_files(str(self.data_dir), sources=self.plan.facts, text_key=self.plan.text_key,
                           validation=self.plan.share)


def builder_for(name, data_dir, plan, stream):
  """A UserFiles builder named `name` (a subclass per name: TFDS takes the name from the class)."""
  cls = types.new_class(name, (UserFiles,), {'skip_registration': True},
                        lambda namespace: namespace.update(name=name, __module__=__name__))
  return cls(plan=plan, stream=stream, data_dir=data_dir, file_format='array_record')


def prepare(name, files, *, data_dir, validation=None, validation_files=(), text_key='text', overwrite=False,
            stream=None):
  """Prepares `name` in data_dir from the files the globs match; returns its builder.
  Everything is checked before a prepared dataset is replaced (only with overwrite)."""
  stream = stream or sys.stderr
  check_name(name)
  if not files:
    raise UserError('--files: give at least one glob of the training documents')
  if build.prepared_versions(os.path.join(data_dir, name)) and not overwrite:
    raise UserError(f'{name} is already prepared in {data_dir}; give --overwrite to replace it')
  share = split_share(validation, validation_files)
  plan = survey(find_sources(files, validation_files, share), text_key, share, stream)
  build.build_and_swap(lambda folder: builder_for(name, folder, plan, stream), data_dir, [name], overwrite)
  return build.prepared_builder(name, data_dir)
