"""Preparing and opening TFDS datasets (ArrayRecord, read with tfds.data_source).

The shipped `sparseformer_text/<config>` datasets are built on first use (or ahead of
time with `python -m sparseformer.cli.prepare_data`); any other name must already be
prepared as ArrayRecord in the data dir (e.g. pg19).
"""

import contextlib
import io
import os

from sparseformer.errors import UserError, closest_match

SHIPPED = 'sparseformer_text'


def data_dir_of(data_cfg):
  """data.data_dir, else $SPARSEFORMER_DATA_DIR, else ~/.cache/sparseformer/tensorflow_datasets."""
  return os.path.expanduser(data_cfg.data_dir or os.environ.get('SPARSEFORMER_DATA_DIR')
                            or '~/.cache/sparseformer/tensorflow_datasets')


def shipped_builder(name, data_dir):
  """The Builder of a `sparseformer_text/<config>` name, or UserError naming the closest config."""
  from sparseformer.data.sparseformer_text import Builder
  config = name.split('/', 1)[1] if '/' in name else ''
  configs = [c.name for c in Builder.BUILDER_CONFIGS]
  if config not in configs:
    hint = closest_match(config, configs)
    raise UserError(f'data.name={name!r}: no such shipped dataset'
                    + (f" (did you mean '{SHIPPED}/{hint}'?)" if hint else '') + f'; known: {configs}')
  return Builder(config=config, data_dir=data_dir, file_format='array_record')


def ensure_prepared(data_cfg):
  """The builder of data.name: shipped datasets are built if needed; any other dataset
  must already be prepared (as ArrayRecord) in the data dir."""
  name, data_dir = data_cfg.name, data_dir_of(data_cfg)
  if name.split('/')[0] == SHIPPED:
    builder = shipped_builder(name, data_dir)
    if not builder.is_prepared():
      print(f'preparing dataset {name} in {data_dir}', flush=True)
      import tensorflow_datasets as tfds
      tfds.disable_progress_bar()
      try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
          builder.download_and_prepare(file_format='array_record')
      except (FileNotFoundError, ValueError) as e:
        raise UserError(f'cannot prepare {name}: {e}') from e
    return builder
  return prepared_builder(name, data_dir)


def version_key(text):
  return tuple(int(p) if p.isdigit() else -1 for p in text.split('.'))


def prepared_builder(name, data_dir):
  """A user's prepared dataset, `name[/config][:version]`, read from its files only (no
  TFDS registry lookup, so nothing is created and no TensorFlow code is reached)."""
  import tensorflow_datasets as tfds
  base, _, version = name.partition(':')
  root = os.path.join(data_dir, *base.split('/'))
  versions = [version] if version else sorted(os.listdir(root) if os.path.isdir(root) else [], key=version_key)
  prepared = [v for v in versions if os.path.isfile(os.path.join(root, v, 'dataset_info.json'))]
  if not prepared:
    raise UserError(f'data.name={name!r} is not prepared in {data_dir} (no {root}/<version>/dataset_info.json); '
                    'prepare it as array_record there or set data.data_dir')
  return tfds.builder_from_directory(os.path.join(root, prepared[-1]))


def open_split(data_cfg, split):
  """A random-access source (len, [i] -> dict) over one split; UserError for bad names."""
  builder = ensure_prepared(data_cfg)
  info = builder.info
  splits = list(info.splits.keys())
  if split.split('[')[0] not in splits:
    raise UserError(f'split {split!r} not in {data_cfg.name}; available: {splits}')
  features = sorted(info.features.keys())
  if data_cfg.text_key not in features:
    raise UserError(f'data.text_key={data_cfg.text_key!r} not a feature of {data_cfg.name}; available: {features}')
  try:
    source = builder.as_data_source(split=split)
  except Exception as e:  # e.g. a dataset prepared as tfrecord only
    raise UserError(f'cannot read {data_cfg.name} split {split!r} as ArrayRecord: {e}') from e
  if len(source) == 0:
    raise UserError(f'split {split!r} of {data_cfg.name} is empty')
  return source
