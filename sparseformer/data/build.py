"""Preparing and opening TFDS datasets stored as ArrayRecord (read without TensorFlow).

The shipped `sparseformer_text/<config>` datasets are built from the package's corpora
on first use, or ahead of time with

    python -m sparseformer.cli.prepare_data --name=sparseformer_text/books [--data_dir=DIR]

Any other name must be a TFDS dataset already prepared as ArrayRecord in the data dir
(e.g. pg19); it is opened from its files only, never built or downloaded.

An interrupted build is never taken as prepared: TFDS writes into
`<config>/incomplete.XXXXXX_<version>/` and renames it to `<config>/<version>/` at the
end, and only a directory named as a version holding dataset_info.json counts.
"""

import contextlib
import io
import logging
import os
import re

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


def build_shipped(name, data_dir):
  """The prepared builder of a shipped dataset, building it first if needed."""
  builder = shipped_builder(name, data_dir)
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


def ensure_prepared(data_cfg):
  """The TFDS builder of data.name, prepared in the data dir: shipped datasets are built
  if needed, any other one must already be there (UserError if not)."""
  name, data_dir = data_cfg.name, data_dir_of(data_cfg)
  if is_shipped(name):
    return build_shipped(name, data_dir)
  return prepared_builder(name, data_dir)


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
                    + '; prepare it there as array_record or set data.data_dir')
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
  tfds.data_source gives; UserError for a bad split, text key, format or an empty split."""
  builder = ensure_prepared(data_cfg)
  check_split(data_cfg, builder, split)
  check_text_key(data_cfg, builder)
  file_format = builder.info.file_format
  if file_format is not None and file_format.value != 'array_record':
    raise UserError(f'{data_cfg.name} is prepared as {file_format.value}, which needs TensorFlow to read; '
                    'prepare it with file_format=array_record')
  source = builder.as_data_source(split=split)
  if len(source) == 0:
    raise UserError(f'split {split!r} of {data_cfg.name} is empty')
  return source


def split_sizes(builder):
  return {split: builder.info.splits[split].num_examples for split in split_names(builder)}
