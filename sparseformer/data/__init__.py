"""Data: the shipped corpora as TFDS datasets, tokenizers, packing and the grain pipeline."""

import ml_collections

from sparseformer.data.build import data_dir_of, ensure_prepared
from sparseformer.data.pipeline import eval_batches, train_iterator
from sparseformer.data.tokenizers import make_tokenizer


def default_data_config():
  """The data fields of sparseformer.config.base_config(), on their own."""
  from sparseformer.config import base_config
  return ml_collections.ConfigDict(base_config().data.to_dict())


__all__ = ['data_dir_of', 'default_data_config', 'ensure_prepared', 'eval_batches', 'make_tokenizer',
           'train_iterator']
