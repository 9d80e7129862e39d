"""Data: the shipped corpora as TFDS datasets, tokenizers, packing and the grain pipeline.

    cfg = default_data_config()               # name, data_dir, text_key, splits, tokenizer
    ensure_prepared(cfg)                      # builds sparseformer_text/* on first use
    batches = train_iterator(cfg, seq_len=256, global_batch_size=32, seed=0)

The submodules are imported on first use of a name, so `import sparseformer.data` stays
light (grain imports jax; TFDS is imported only where datasets are built or opened).
"""

import importlib

import ml_collections

_EXPORTS = {
    'data_dir_of': 'build',
    'ensure_prepared': 'build',
    'eval_batches': 'pipeline',
    'make_tokenizer': 'tokenizers',
    'train_iterator': 'pipeline',
}


def default_data_config():
  """The `data` fields of sparseformer.config.base_config() on their own: name, data_dir,
  text_key, train_split, eval_split, tokenizer (and seq_len)."""
  from sparseformer.config import base_config
  return ml_collections.ConfigDict(base_config().data.to_dict())


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f'{__name__}.{_EXPORTS[name]}'), name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


__all__ = ['data_dir_of', 'default_data_config', 'ensure_prepared', 'eval_batches', 'make_tokenizer',
           'train_iterator']
