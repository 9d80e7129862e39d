"""What a prepared dataset was, recorded at preparation and checked on every use.

Preparation (the shipped builder and user_files.py) writes `sparseformer_files.json` into
the version folder before TFDS renames it into place: the size and sha256 of every
ArrayRecord file and, for a dataset made from your own files, of every source file.

On use (build.ensure_prepared, once per process and folder):
  - every ArrayRecord file must exist, have its recorded size, and hold the records
    dataset_info.json counts (a file cut short is refused here, in one line, before a
    run starts rather than at its final evaluation);
  - a source file that changed or vanished since preparation is one warning line; the
    prepared data stays valid and is used.
Reading (build.open_split wraps every split in CheckedSource): a record that cannot be
read is a UserError naming the file and the record index. `verify` reads every record.
Datasets prepared elsewhere (no sidecar) get every check but the recorded sizes.
"""

import hashlib
import json
import os
import sys

from sparseformer.errors import UserError

SIDECAR = 'sparseformer_files.json'
_CHUNK = 1 << 20
_checked = {}  # version folder -> the files' (size, mtime) when last found sound in this process
_sources_checked = set()


class DamagedRecord(UserError):
  """A record of a prepared dataset that cannot be read."""


def sha256_of(path):
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(_CHUNK), b''):
      digest.update(chunk)
  return digest.hexdigest()


def write_json(path, value):
  """Written whole or not at all (a temporary file renamed over the target)."""
  temporary = f'{path}.tmp{os.getpid()}'
  with open(temporary, 'w') as f:
    json.dump(value, f, indent=1, sort_keys=True)
    f.write('\n')
  os.replace(temporary, path)


def record_files(version_dir, **extra):
  """Writes the sidecar: size and sha256 of each ArrayRecord file, plus `extra` fields."""
  files = {name: {'bytes': os.path.getsize(os.path.join(version_dir, name)),
                  'sha256': sha256_of(os.path.join(version_dir, name))}
           for name in sorted(os.listdir(version_dir)) if '.array_record-' in name}
  write_json(os.path.join(version_dir, SIDECAR), {'files': files, **extra})


def read_sidecar(version_dir):
  """The recorded facts, or {} for a dataset prepared without them."""
  path = os.path.join(version_dir, SIDECAR)
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError:
    raise UserError(f'{path} is damaged (not JSON); prepare the dataset again with --overwrite') from None


def shard_files(builder):
  """[(split, path, records)] of every ArrayRecord file, from dataset_info.json."""
  shards = []
  for split in sorted(builder.info.splits.keys()):
    info = builder.info.splits[split]
    for name, records in zip(info.filenames, info.shard_lengths):
      shards.append((split, os.path.join(str(builder.data_dir), name), records))
  return shards


def count_records(path):
  """The records an ArrayRecord file's footer indexes (0 for a file cut short)."""
  from array_record.python import array_record_module
  reader = array_record_module.ArrayRecordReader(path)
  try:
    return reader.num_records()
  finally:
    reader.close()


def file_problem(path, records, recorded):
  """Why the file cannot be used as it is, or None."""
  if not os.path.isfile(path):
    return 'is missing'
  size = os.path.getsize(path)
  if recorded and recorded['bytes'] != size:
    return f'has {size} bytes, {recorded["bytes"]} when prepared (cut short or damaged)'
  try:
    found = count_records(path)
  except Exception as e:  # noqa: BLE001 (riegeli's errors have no common type)
    return f'cannot be opened ({one_line(e)}) (cut short or damaged)'
  if found != records:
    return f'indexes {found} records, dataset_info.json says {records} (cut short or damaged)'
  return None


def is_array_record(builder):
  file_format = builder.info.file_format
  return file_format is None or file_format.value == 'array_record'


def check_files(builder, name):
  """UserError naming the first ArrayRecord file that is missing, cut short or unreadable
  (other formats are refused when a split is opened: build.open_split)."""
  if not is_array_record(builder):
    return
  version_dir = str(builder.data_dir)
  shards = shard_files(builder)
  stamp = tuple(file_stamp(path) for _, path, _ in shards)
  if _checked.get(version_dir) == stamp:
    return
  recorded = read_sidecar(version_dir).get('files', {})
  for _, path, records in shards:
    problem = file_problem(path, records, recorded.get(os.path.basename(path)))
    if problem:
      raise UserError(f'{name}: {path} {problem}; {again(name)}')
  _checked[version_dir] = stamp


def file_stamp(path):
  try:
    stat = os.stat(path)
  except OSError:
    return None
  return stat.st_size, stat.st_mtime_ns


def again(name, verify=True):
  """How to get a sound copy (and how to list every damaged record)."""
  command = 'python -m sparseformer.cli.prepare_data'
  how = (f'`{command} --name {name} --overwrite`' if name.split('/', 1)[0] == 'sparseformer_text'
         else f'`{command} --name {name} --files ... --overwrite` with the files it was made from')
  return f'prepare it again ({how})' + (f'; `{command} --verify {name}` lists every damaged record' if verify else '')


def source_changes(version_dir):
  """['<path> changed' | '<path> is gone'] for the recorded source files."""
  changes = []
  for source in read_sidecar(version_dir).get('sources', []):
    path = source['path']
    if not os.path.isfile(path):
      changes.append(f'{path} is gone')
    elif os.path.getsize(path) != source['bytes'] or (
        os.stat(path).st_mtime_ns != source['mtime_ns'] and sha256_of(path) != source['sha256']):
      changes.append(f'{path} changed')
  return changes


def warn_changed_sources(version_dir, name, stream=None, most=5):
  """One warning line per changed or vanished source (at most `most`, then a count), once
  per process and dataset."""
  if version_dir in _sources_checked:
    return
  _sources_checked.add(version_dir)
  stream = stream or sys.stderr
  changes = source_changes(version_dir)
  for change in changes[:most]:
    print(f'warning: {name}: source {change} since it was prepared; the prepared copy is used '
          f'(to use the new text, prepare {name} again with --overwrite)', file=stream, flush=True)
  if len(changes) > most:
    print(f'warning: {name}: {len(changes) - most} more sources changed or gone', file=stream, flush=True)


def one_line(error):
  """`Type: message`, first line only, at most 300 characters."""
  lines = str(error).strip().splitlines()
  text = f'{type(error).__name__}: {lines[0]}' if lines else type(error).__name__
  return text if len(text) <= 300 else text[:297] + '...'


def is_empty(example):
  """An empty record decodes to None features (a truncated file's reader returns b'')."""
  return isinstance(example, dict) and any(value is None for value in example.values())


class CheckedSource:
  """A split's data source (len, [i]) whose unreadable records raise DamagedRecord naming
  the file and the record's index in it. Picklable, for grain's worker processes."""

  def __init__(self, source, name, file_instructions):
    self.source = source
    self.name = name
    self.pieces = [(str(fi.filename), fi.skip, fi.take) for fi in file_instructions]

  def __len__(self):
    return len(self.source)

  def __getitem__(self, index):
    index = index.__index__()
    if not 0 <= index < len(self):
      return self.source[index]
    example, reason = self.read(index)
    if reason:
      path, position = self.locate(index)
      raise DamagedRecord(f'{self.name}: record {position} of {path} cannot be read ({reason}); {again(self.name)}')
    return example

  def read(self, index):
    """(example, None), or (None, why the record cannot be read)."""
    try:
      example = self.source[index]
    except Exception as e:  # noqa: BLE001  (riegeli's and the decoder's errors have no common type)
      return None, one_line(e)
    if is_empty(example):
      return None, 'the record is empty: the file is cut short'
    return example, None

  def locate(self, index):
    """(file, index of the record in that file) of the split's record `index`."""
    for path, skip, take in self.pieces:
      if index < take:
        return path, skip + index
      index -= take
    raise IndexError(index)

  def problems(self, batch=256):
    """[(file, record, reason)] of every unreadable record, read in batches."""
    found = []
    for start in range(0, len(self), batch):
      indices = range(start, min(start + batch, len(self)))
      try:
        if not any(is_empty(example) for example in self.source.__getitems__(list(indices))):
          continue
      except Exception:  # noqa: BLE001  (a damaged chunk: find its records one by one)
        pass
      for index in indices:
        _, reason = self.read(index)
        if reason:
          found.append((*self.locate(index), reason))
    return found


def checked_source(builder, split, name):
  return CheckedSource(builder.as_data_source(split=split), name, builder.info.splits[split].file_instructions)


def verify(builder, name):
  """Lines naming every problem (none when the dataset is sound): ArrayRecord files that are
  missing, resized or changed since preparation, and every record that cannot be read."""
  if not is_array_record(builder):
    raise UserError(f'{name} is prepared as {builder.info.file_format.value}; --verify reads array_record only')
  recorded = read_sidecar(str(builder.data_dir)).get('files', {})
  lines = []
  for _, path, records in shard_files(builder):
    entry = recorded.get(os.path.basename(path))
    problem = file_problem(path, records, entry)
    if not problem and entry and sha256_of(path) != entry['sha256']:
      problem = 'has another sha256 than when prepared (damaged)'
    if problem:
      lines.append(f'{path} {problem}')
  for split in sorted(builder.info.splits.keys()):
    lines += [f'{path}: {records} cannot be read ({reason})'
              for path, records, reason in runs(checked_source(builder, split, name).problems())]
  return lines


def runs(problems):
  """[(file, 'record 7' | 'records 7-9', reason)]: consecutive records with one reason merged."""
  merged = []
  for path, position, reason in problems:
    if merged and merged[-1][0] == path and merged[-1][2] == position - 1 and merged[-1][3] == reason:
      merged[-1][2] = position
    else:
      merged.append([path, position, position, reason])
  return [(path, f'record {first}' if first == last else f'records {first}-{last}', reason)
          for path, first, last, reason in merged]
