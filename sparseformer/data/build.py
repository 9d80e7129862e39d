"""Preparing and opening TFDS datasets stored as ArrayRecord (read without TensorFlow).

The shipped `sparseformer_text/<config>` datasets are built from the package's corpora
on first use, or ahead of time with

    python -m sparseformer.cli.prepare_data --name=sparseformer_text/books [--data_dir=DIR]

Any other name must be a TFDS dataset already prepared as ArrayRecord in the data dir:
your own documents prepared with `prepare_data --files` (user_files.py), or one prepared
elsewhere (e.g. pg19); it is opened from its files only, never built or downloaded.

An interrupted build is never taken as prepared: TFDS writes into
`<config>/incomplete.XXXXXX_<version>/` and renames it to `<config>/<version>/` at the
end, and only a directory named as a version holding dataset_info.json counts. A build
that replaces a prepared dataset (--overwrite, and every `--files` build) runs in a hidden
folder of the data dir and is moved into place only once finished (build_and_swap).

Every use checks the prepared files (integrity.py): a file cut short or missing is a
UserError here, a changed source file a warning, and an unreadable record, when read, a
UserError naming the file and the record.
"""

import contextlib
import io
import logging
import os
import re
import shutil
import tempfile

from sparseformer.data import integrity
from sparseformer.errors import UserError, closest_match

SHIPPED = 'sparseformer_text'
DEFAULT_DATA_DIR = '~/.cache/sparseformer/tensorflow_datasets'
_VERSION_DIR = re.compile(r'^\d+\.\d+\.\d+$')


def data_dir_of(data_cfg):
  """data.data_dir, else $SPARSEFORMER_DATA_DIR, else ~/.cache/sparseformer/tensorflow_datasets."""
  chosen = data_cfg.data_dir or os.environ.get('SPARSEFORMER_DATA_DIR') or DEFAULT_DATA_DIR
  return os.path.abspath(os.path.expanduser(chosen))


def is_shipped(name):
  return name.split('/', 1)[0] == SHIPPED


def shipped_builder(name, data_dir):
  """The Builder of `sparseformer_text/<config>`; UserError naming the closest config."""
  from sparseformer.data.sparseformer_text import Builder
  config = name.split('/', 1)[1] if '/' in name else ''
  configs = [c.name for c in Builder.BUILDER_CONFIGS]
  if config not in configs:
    hint = closest_match(config, configs)
    suggestion = f" (did you mean '{SHIPPED}/{hint}'?)" if hint else ''
    known = ', '.join(f'{SHIPPED}/{c}' for c in configs)
    raise UserError(f'data.name={name!r}: no such shipped dataset{suggestion}; known: {known}')
  return Builder(config=config, data_dir=data_dir, file_format='array_record')


@contextlib.contextmanager
def quiet_tfds():
  """TFDS prints progress and logs routine warnings ('Variant folder ... has no
  dataset_info.json' before every first build); our one line says enough."""
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()
  absl_logger = logging.getLogger('absl')
  level = absl_logger.level
  absl_logger.setLevel(logging.ERROR)
  try:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
      yield
  finally:
    absl_logger.setLevel(level)


def build_shipped(name, data_dir, overwrite=False):
  """The prepared builder of a shipped dataset, building it first if needed (again with
  `overwrite`, the prepared copy replaced only once the new one is finished)."""
  builder = shipped_builder(name, data_dir)
  if overwrite:
    print(f'preparing dataset {name} again in {data_dir}', flush=True)
    build_and_swap(lambda folder: shipped_builder(name, folder), data_dir, name.split('/'), overwrite=True)
    return shipped_builder(name, data_dir)
  with quiet_tfds():
    if builder.is_prepared():
      return builder
  print(f'preparing dataset {name} in {data_dir}', flush=True)
  try:
    with quiet_tfds():
      builder.download_and_prepare(file_format='array_record')
  except OSError:
    # Another process (another host on a shared disk) may have renamed its finished
    # copy into place first; then ours is redundant.
    with quiet_tfds():
      if not shipped_builder(name, data_dir).is_prepared():
        raise
  return shipped_builder(name, data_dir)


def build_and_swap(make_builder, data_dir, parts, overwrite):
  """Builds `make_builder(folder)` in a hidden folder of data_dir, then moves its
  `<folder>/<parts...>` to `<data_dir>/<parts...>`, replacing what was there. A failed or
  interrupted build replaces nothing (a killed one leaves a `.preparing-*` folder, which
  is never read and may be deleted)."""
  os.makedirs(data_dir, exist_ok=True)
  folder = tempfile.mkdtemp(prefix='.preparing-', dir=data_dir)
  try:
    builder = make_builder(folder)
    with quiet_tfds():
      builder.download_and_prepare(file_format='array_record')
    final = os.path.join(data_dir, *parts)
    if prepared_versions(final) and not overwrite:
      raise UserError(f'{"/".join(parts)} was prepared in {data_dir} meanwhile; give --overwrite to replace it')
    swap_in(os.path.join(folder, *parts), final, os.path.join(folder, 'replaced'))
  finally:
    shutil.rmtree(folder, ignore_errors=True)


def swap_in(new, final, aside):
  """Renames `new` to `final`, moving an existing `final` to `aside` first (and back if the
  second rename fails)."""
  os.makedirs(os.path.dirname(final), exist_ok=True)
  replaced = os.path.lexists(final)
  if replaced:
    os.rename(final, aside)
  try:
    os.rename(new, final)
  except OSError:
    if replaced:
      os.rename(aside, final)
    raise


def locate(name, data_dir):
  """The builder of a prepared dataset as it is: nothing built, nothing checked."""
  if is_shipped(name):
    builder = shipped_builder(name, data_dir)
    with quiet_tfds():
      if builder.is_prepared():
        return builder
    raise UserError(f'{name} is not prepared in {data_dir}')
  return prepared_builder(name, data_dir)


def ensure_prepared(data_cfg):
  """The TFDS builder of data.name, prepared in the data dir: shipped datasets are built
  if needed, any other one must already be there (UserError if not). Its files are
  checked (UserError for one cut short or missing; a warning per changed source file)."""
  name, data_dir = data_cfg.name, data_dir_of(data_cfg)
  builder = build_shipped(name, data_dir) if is_shipped(name) else prepared_builder(name, data_dir)
  integrity.check_files(builder, name)
  integrity.warn_changed_sources(str(builder.data_dir), name)
  return builder


def version_key(version):
  return tuple(int(part) for part in version.split('.'))


def prepared_versions(root):
  """Versions (newest last) under a dataset folder that hold a finished dataset."""
  if not os.path.isdir(root):
    return []
  versions = [v for v in os.listdir(root) if _VERSION_DIR.match(v)
              and os.path.isfile(os.path.join(root, v, 'dataset_info.json'))]
  return sorted(versions, key=version_key)


def prepared_builder(name, data_dir):
  """A user's prepared dataset, `name[/config][:version]`, read from its files only (no
  TFDS registry lookup: nothing is built, downloaded, or imported from TFDS's catalog)."""
  if not os.path.isdir(data_dir):
    raise UserError(f'data.name={name!r}: the data dir {data_dir} does not exist '
                    '(set data.data_dir or $SPARSEFORMER_DATA_DIR to where the dataset is prepared)')
  base, _, version = name.partition(':')
  root = os.path.join(data_dir, *base.split('/'))
  versions = prepared_versions(root)
  if version:
    versions = [v for v in versions if v == version]
  if not versions:
    present = sorted(entry for entry in os.listdir(data_dir) if not entry.startswith('.'))
    hint = closest_match(base.split('/')[0], present)
    raise UserError(f'data.name={name!r} is not prepared in {data_dir} (no {root}/<version>/dataset_info.json)'
                    + (f"; did you mean '{hint}'?" if hint else '')
                    + '; prepare it there as array_record or set data.data_dir (your own files: '
                    f'python -m sparseformer.cli.prepare_data --name {base} --files GLOB)')
  import tensorflow_datasets as tfds
  return tfds.builder_from_directory(os.path.join(root, versions[-1]))


def split_names(builder):
  return sorted(builder.info.splits.keys())


def check_split(data_cfg, builder, split):
  """UserError unless `split` (or the split of a slice such as 'train[:10%]') exists."""
  if split.split('[', 1)[0] not in split_names(builder):
    raise UserError(f'split {split!r} is not in {data_cfg.name}; available: {split_names(builder)}')


def check_text_key(data_cfg, builder):
  features = sorted(builder.info.features.keys())
  if data_cfg.text_key not in features:
    raise UserError(f'data.text_key={data_cfg.text_key!r} is not a feature of {data_cfg.name}; '
                    f'available: {features}')


def open_split(data_cfg, split):
  """A random-access source over one split (len, [i] -> dict of bytes/arrays), as
  tfds.data_source gives; UserError for a bad split, text key, format or an empty split,
  and, when read, for a record that cannot be read (integrity.CheckedSource)."""
  builder = ensure_prepared(data_cfg)
  check_split(data_cfg, builder, split)
  check_text_key(data_cfg, builder)
  file_format = builder.info.file_format
  if file_format is not None and file_format.value != 'array_record':
    raise UserError(f'{data_cfg.name} is prepared as {file_format.value}, which needs TensorFlow to read; '
                    'prepare it with file_format=array_record')
  source = integrity.checked_source(builder, split, data_cfg.name)
  if len(source) == 0:
    raise UserError(f'split {split!r} of {data_cfg.name} is empty')
  return source


def split_sizes(builder):
  return {split: builder.info.splits[split].num_examples for split in split_names(builder)}
