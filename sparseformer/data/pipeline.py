"""Batches for training and evaluation: TFDS ArrayRecord -> grain -> packed rows.

Every batch is a dict of NumPy arrays [rows, seq_len]: tokens, targets, positions,
segment_ids (int32) and loss_mask (float32); see packing.py for the packing rules.

Training: process p of P reads the documents whose index i has i % P == p (a strided
shard), shuffles them with a seeded shuffle that changes every epoch, repeats forever,
tokenizes, packs and batches. The iterator's `get_state()` is a small JSON-able dict
saved in checkpoints; `set_state()` on a fresh iterator resumes at exactly the next
batch an uninterrupted run would have read.

Task rows (data.tasks, data.task_fraction; task_rows.py): with 0 < task_fraction < 1 the
book rows and the task rows are interleaved by grain's IterDataset.mix, a deterministic
pattern (no random draws) in which a fraction task_fraction of the rows are task rows;
its state is {'parents': [book rows' state, task rows' state], 'index': rows mixed,
'stop': False}, still small and JSON-able. With task_fraction 1 every row is a task row
and the train split is not read.

data.workers > 0 makes the batches in that many worker processes (grain's mp_prefetch):
each worker runs the whole pipeline above on its slice of the documents and of the task
examples, and the batches come from the workers in turn. That lifts the one-core limit of
making task rows in Python threads. The batches are then a different (still
deterministic) sequence for each worker count, and the saved state holds one position per
worker, so a run resumes only with the worker count it had.

Evaluation: one ordered pass. Every process packs the whole split identically and
takes its slice of each global batch of rows, so all processes yield the same number
of batches (collectives stay in step) and every row is read exactly once.
"""

import itertools
import signal

import grain
import numpy as np

from sparseformer.data.build import open_split
from sparseformer.data.packing import FIELDS, PackedRows, empty_row
from sparseformer.data.task_rows import task_rows
from sparseformer.data.tokenizers import make_tokenizer
from sparseformer.errors import UserError

# Documents are tokenized ahead in a few threads; grain's default buffer (500) would
# hold hundreds of megabytes of tokens for book-length documents.
READ_OPTIONS = grain.ReadOptions(num_threads=4, prefetch_buffer_size=64)


def document_tokens(tokenizer, text_key):
  """example -> [bos] + encode(example[text_key]) + [eos] as int32 (text is bytes or str);
  no bos for a tokenizer without one (bos_id None: Qwen's)."""
  lead = [] if tokenizer.bos_id is None else [tokenizer.bos_id]

  def tokenize(example):
    ids = tokenizer.encode(example[text_key])
    return np.concatenate([np.asarray(lead, np.int32), ids, np.asarray([tokenizer.eos_id], np.int32)])
  return tokenize


def stack_rows(rows):
  return {name: np.stack([row[name] for row in rows]) for name in FIELDS}


def check_sizes(seq_len, batch_size, process_index, process_count):
  if seq_len <= 0 or batch_size <= 0:
    raise UserError(f'sequence length ({seq_len}) and batch size ({batch_size}) must be positive')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count})')


def local_batch_size(global_batch_size, process_count):
  if global_batch_size % process_count:
    raise UserError(f'batch size {global_batch_size} is not divisible by the {process_count} processes')
  return global_batch_size // process_count


def shuffle_seed(seed):
  """A 32-bit seed for grain's shuffle, mixed from the run's seed: grain shuffles epoch e
  with seed + e, so unmixed, run seed s + 1 would replay the orders of seed s one epoch on."""
  return int(np.random.SeedSequence(seed % 2**64).generate_state(1)[0])


def process_documents(source, split, process_index, process_count):
  """This process's strided shard of a split's documents, as a grain MapDataset."""
  if len(source) < process_count:
    raise UserError(f'split {split!r} has {len(source)} documents, fewer than the {process_count} processes')
  return grain.MapDataset.source(source)[process_index::process_count]


def train_iterator(data_cfg, *, seq_len, global_batch_size, seed, process_index=0, process_count=1):
  """An endless, checkpointable iterator (a grain DatasetIterator) of batches of
  [global_batch_size // process_count, seq_len]."""
  batch_size = local_batch_size(global_batch_size, process_count)
  check_sizes(seq_len, batch_size, process_index, process_count)
  tokenizer = make_tokenizer(data_cfg.tokenizer)
  fraction = task_fraction(data_cfg)
  if fraction < 1:
    split = data_cfg.train_split
    documents = process_documents(open_split(data_cfg, split), split, process_index, process_count)
    tokens = documents.shuffle(seed=shuffle_seed(seed)).repeat().map(document_tokens(tokenizer, data_cfg.text_key))
    rows = book_rows = PackedRows(tokens.to_iter_dataset(READ_OPTIONS), seq_len, tokenizer.pad_id)
  if fraction > 0:
    rows = tasks = task_rows(data_cfg, tokenizer, seq_len=seq_len, seed=seed, process_index=process_index)
  if 0 < fraction < 1:
    rows = grain.IterDataset.mix([book_rows, tasks], [1 - fraction, fraction])
  batches = rows.batch(batch_size, batch_fn=stack_rows)
  workers = data_cfg.get('workers', 0)
  return WorkerBatches(batches, workers) if workers else iter(batches)


class WorkerBatches:
  """The iterator of `batches` made in `workers` spawned processes (2 batches ahead in
  each). Its state is {'workers': count, 'batches': grain's state}: a state saved with
  another worker count is refused (grain would take it and read other batches)."""

  def __init__(self, batches, workers):
    from absl import flags
    if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; our CLIs parse none
      flags.FLAGS.mark_as_parsed()
    self.workers = workers
    options = grain.MultiprocessingOptions(num_workers=workers, per_worker_buffer_size=2)
    self.iterator = iter(batches.mp_prefetch(options, worker_init_fn=ignore_sigint))

  def __iter__(self):
    return self

  def __next__(self):
    return next(self.iterator)

  def get_state(self):
    return {'workers': self.workers, 'batches': self.iterator.get_state()}

  def set_state(self, state):
    if state.get('workers') != self.workers:
      raise ValueError(f'the state was saved with data.workers={state.get("workers", 0)}, this pipeline has '
                       f'{self.workers}')
    self.iterator.set_state(state['batches'])

  def close(self):
    self.iterator.close()


def ignore_sigint(worker_index, worker_count):
  """In each worker: Ctrl-C reaches the whole process group, and the trainer (not the
  workers) answers it by saving and stopping; the workers end when it closes them."""
  del worker_index, worker_count
  signal.signal(signal.SIGINT, signal.SIG_IGN)


def task_fraction(data_cfg):
  """data.task_fraction, checked (config.validate_data says the same, for whole configs)."""
  fraction, tasks = data_cfg.get('task_fraction', 0.0), data_cfg.get('tasks', ())
  if not 0 <= fraction <= 1:
    raise UserError(f'data.task_fraction={fraction}: use a fraction in [0, 1]')
  if fraction > 0 and not tasks:
    raise UserError(f'data.task_fraction={fraction} needs task specs in data.tasks')
  return fraction


def eval_batches(data_cfg, *, split, seq_len, batch_size, process_index=0, process_count=1, max_batches=0):
  """An iterator over one ordered pass of `split` in batches of [batch_size, seq_len]
  (this process's share); the last batch is completed with padding rows (loss_mask 0).
  max_batches > 0 stops after that many batches. Bad settings raise here, not later."""
  check_sizes(seq_len, batch_size, process_index, process_count)
  tokenizer = make_tokenizer(data_cfg.tokenizer)
  source = open_split(data_cfg, split)
  tokens = grain.MapDataset.source(source).map(document_tokens(tokenizer, data_cfg.text_key))
  rows = iter(PackedRows(tokens.to_iter_dataset(READ_OPTIONS), seq_len, tokenizer.pad_id))
  padding = empty_row(seq_len, tokenizer.pad_id)
  return process_batches(rows, batch_size, process_index, process_count, max_batches, padding)


def process_batches(rows, batch_size, process_index, process_count, max_batches, padding):
  """Process p's rows [p * batch_size, (p + 1) * batch_size) of each global batch."""
  global_rows = batch_size * process_count
  for _ in itertools.count() if not max_batches else range(max_batches):
    group = list(itertools.islice(rows, global_rows))
    if not group:
      return
    mine = group[process_index * batch_size:(process_index + 1) * batch_size]
    yield stack_rows(mine + [padding] * (batch_size - len(mine)))
