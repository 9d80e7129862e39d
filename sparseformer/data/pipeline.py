"""Batches for training and evaluation: TFDS ArrayRecord -> grain -> packed rows.

Training: this process's documents (every process_count-th, from process_index), a
seeded shuffle that changes every epoch, repeated forever, tokenized, packed, batched.
The iterator's state (`get_state()`, a small JSON-able dict) is saved in checkpoints,
so a resumed run reads exactly the batches an uninterrupted one would.
"""

import grain
import numpy as np

from sparseformer.data.build import open_split
from sparseformer.data.packing import FIELDS, PackedRows, empty_row
from sparseformer.data.tokenizers import make_tokenizer
from sparseformer.errors import UserError


def document_tokens(tokenizer, text_key):
  def tokenize(example):
    ids = tokenizer.encode(example[text_key])
    return np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]]).astype(np.int32)
  return tokenize


def local_batch_size(global_batch_size, process_count):
  if global_batch_size % process_count:
    raise UserError(f'batch size {global_batch_size} is not divisible by the {process_count} processes')
  return global_batch_size // process_count


def documents(data_cfg, split, process_index, process_count):
  source = open_split(data_cfg, split)
  dataset = grain.MapDataset.source(source)
  if process_count > 1:
    if len(source) < process_count:
      raise UserError(f'split {split!r} has {len(source)} documents for {process_count} processes')
    dataset = dataset[process_index::process_count]
  return dataset


def stack(rows):
  return {name: np.stack([row[name] for row in rows]) for name in FIELDS}


def train_iterator(data_cfg, *, seq_len, global_batch_size, seed, process_index=0, process_count=1):
  """An endless, checkpointable iterator of {tokens, targets, positions, segment_ids,
  loss_mask}, each [global_batch_size // process_count, seq_len]."""
  batch = local_batch_size(global_batch_size, process_count)
  tokenizer = make_tokenizer(data_cfg.tokenizer)
  dataset = (documents(data_cfg, data_cfg.train_split, process_index, process_count)
             .shuffle(seed=seed).repeat().map(document_tokens(tokenizer, data_cfg.text_key)))
  rows = PackedRows(dataset.to_iter_dataset(), seq_len, tokenizer.pad_id)
  return iter(rows.batch(batch, batch_fn=stack))


def eval_batches(data_cfg, *, split, seq_len, batch_size, process_index=0, process_count=1, max_batches=0):
  """One ordered pass over a split; the last batch is completed with padding rows."""
  tokenizer = make_tokenizer(data_cfg.tokenizer)
  dataset = documents(data_cfg, split, process_index, process_count).map(
      document_tokens(tokenizer, data_cfg.text_key))
  rows = iter(PackedRows(dataset.to_iter_dataset(), seq_len, tokenizer.pad_id))
  produced = 0
  while not max_batches or produced < max_batches:
    chunk = [row for _, row in zip(range(batch_size), rows)]
    if not chunk:
      return
    chunk += [empty_row(seq_len, tokenizer.pad_id)] * (batch_size - len(chunk))
    yield stack(chunk)
    produced += 1
