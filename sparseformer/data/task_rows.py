"""Training rows of synthetic task examples (sparseformer/evaluation/tasks), endless,
deterministic and resumable; pipeline.train_iterator mixes them with the book rows.

Example k of process p (k = 0, 1, ...) is a pure function of k: its task spec is drawn
from data.tasks and its length from [data.task_min_len, seq_len] (seq_len when
task_min_len is 0) with a Generator seeded by (run seed, p, k), and the example itself is
make_example(spec, tokenizer, length, seed=<run seed mixed with p>, index=k,
split='train'). Its document is encode(example).tokens + [eos]: an example of L tokens
(bos included) gives L pairs, so an example made for length seq_len fills a row.

A spec may end in '@L' ('mqar:pairs=8@256'): its examples are always made for L tokens,
whatever task_min_len says. Several short examples then share a row, which is how a
curriculum of easy, short examples is mixed with long ones (Zoology trains MQAR on a mix
of lengths and pair counts). To repeat a spec weights it.

  - task_min_len == 0 and no '@L': row k is example k alone (made for seq_len tokens),
    padded if shorter. The rows are grain.MapDataset.range(...).map(row of k): the
    iterator state is {'next_index': k}.
  - otherwise: the documents of examples 0, 1, ... are packed by packing.PackedRows with
    the book rules (an example is never split across rows); its state is the document
    index and the pairs of it already emitted.

Loss mask (data.task_loss): 'answers' puts 1 only on the pairs that predict an answer
token: the answer token at index j of the tokens is the target of pair j - 1 (tokens[j - 1]
-> tokens[j]). 'all' puts 1 on every pair, as for books (the final eos included).
data.task_answer_weight w replaces the answer pairs' 1 by w. The step's loss is
sum(nll x loss_mask) / sum(loss_mask) over the batch, so among book rows an answer token
counts as w text tokens. With the default 1 and books in the mix the answers are a sliver
of the loss (170 answer tokens among 65k book tokens a step in the retrieval suite), and a
small model did not learn passkey until they carried most of it (docs/results.md, MQAR
run 12).
"""

import sys

import grain
import numpy as np

from sparseformer.data.packing import PackedRows, as_document, empty_row, write_piece
from sparseformer.errors import UserError

TASK_LOSSES = ('answers', 'all')
# Examples are made ahead in a few threads; each is at most a row, so the buffer is small.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=32)
ENDLESS = sys.maxsize  # rows / documents in the "endless" range (a process never reaches it)
DRAW_TAG = 0x7461736b  # separates the spec/length draws from the seeds make_example uses


def row_spec(spec):
  """'SPEC@L' -> ('SPEC', L); 'SPEC' -> ('SPEC', None). UserError for an L that is not a
  positive integer."""
  bare, at, length = spec.rpartition('@') if '@' in spec else (spec, '', '')
  if not at:
    return spec, None
  if not (length.isdigit() and int(length) > 0):
    raise UserError(f'task spec {spec!r}: after @ give the example length in tokens, e.g. {bare}@512')
  return bare, int(length)


def task_seed(seed, process_index):
  """The examples' seed for `process_index`: the run seed mixed with it, so processes
  make different examples and seeds s and s + 1 share none."""
  state = np.random.SeedSequence([seed % 2**64, process_index, DRAW_TAG]).generate_state(1, np.uint64)
  return int(state[0]) % 2**63


class TaskDocuments:
  """index -> the document of example `index`: int32 tokens (task_loss 'all' at answer
  weight 1), or (tokens, per-pair loss weights) (task_loss 'answers', or another weight)."""

  def __init__(self, tasks, tokenizer, *, seq_len, min_len, task_loss, seed, answer_weight=1.0):
    from sparseformer.evaluation import tasks as _registered  # noqa: F401  (registers the generators)
    if not tasks:
      raise UserError('data.tasks is empty: task rows need at least one task spec')
    if task_loss not in TASK_LOSSES:
      raise UserError(f'data.task_loss={task_loss!r}: use {" or ".join(TASK_LOSSES)}')
    if not 0 <= min_len <= seq_len:
      raise UserError(f'data.task_min_len={min_len}: use 0 (examples of seq_len) or a length in [1, {seq_len}]')
    if not answer_weight > 0:
      raise UserError(f'data.task_answer_weight={answer_weight}: use a weight > 0')
    self.answer_weight = float(answer_weight)
    self.tasks, self.tokenizer, self.task_loss, self.seed = tuple(tasks), tokenizer, task_loss, seed
    self.seq_len, self.min_len = seq_len, min_len
    self.specs = tuple(row_spec(spec) for spec in self.tasks)  # (spec, fixed length or None)
    from sparseformer.evaluation.tasks.base import generator, parse_task_spec
    names = {parse_task_spec(spec)[0] for spec, _ in self.specs}
    self.generators = {name: generator(name) for name in names}  # travel to data worker processes
    for spec, (_, fixed) in zip(self.tasks, self.specs):
      if fixed is not None and fixed > seq_len:
        raise UserError(f'data.tasks: {spec!r}: @{fixed} is longer than the rows ({seq_len} tokens)')

  @property
  def packed(self):
    """Whether examples shorter than a row are packed (else each row holds one example)."""
    return bool(self.min_len) or any(fixed is not None for _, fixed in self.specs)

  def __setstate__(self, state):  # unpickled in a data worker process (data.workers)
    from sparseformer.evaluation.tasks.base import ensure_registered
    self.__dict__.update(state)
    for name, fn in self.generators.items():
      ensure_registered(name, fn)

  def spec_and_length(self, index):
    rng = np.random.default_rng([self.seed, index, DRAW_TAG])
    spec, fixed = self.specs[int(rng.integers(len(self.specs)))]
    length = int(rng.integers(self.min_len, self.seq_len + 1)) if self.min_len else self.seq_len
    return spec, fixed or length

  def make(self, spec, length, index):
    from sparseformer.evaluation.tasks.base import encode, make_example
    example = make_example(spec, self.tokenizer, length, seed=self.seed, index=index, split='train')
    encoded = encode(example, self.tokenizer)
    if len(encoded.tokens) > length:
      raise ValueError(f'task {spec!r} made an example of {len(encoded.tokens)} tokens for a budget of {length}')
    tokens = np.append(encoded.tokens, np.int32(self.tokenizer.eos_id)).astype(np.int32)
    if self.task_loss == 'all' and self.answer_weight == 1.0:
      return tokens
    weights = np.full(len(tokens) - 1, 1.0 if self.task_loss == 'all' else 0.0, np.float32)
    for start, end in encoded.answer_spans:
      weights[start - 1:end - 1] = self.answer_weight  # pair j - 1 predicts token j
    return tokens, weights

  def __call__(self, index):
    spec, length = self.spec_and_length(index)
    return self.make(spec, length, index)

  def check(self):
    """UserError now, not at some later row, when a task cannot make an example at the
    shortest length drawn (or its spec is bad): makes one example of each task there."""
    for given, (spec, fixed) in zip(self.tasks, self.specs):
      shortest, field = ((fixed, 'its length') if fixed else (self.min_len, 'data.task_min_len') if self.min_len
                         else (self.seq_len, 'sequence length'))
      try:
        self.make(spec, shortest, 0)
      except UserError as e:
        raise UserError(f'data.tasks: {given!r} at {field} {shortest}: {e}') from None


def single_example_row(document, seq_len, pad_id):
  """A row holding one document (at most seq_len pairs), padded."""
  tokens, weights = as_document(document)
  row = empty_row(seq_len, pad_id)
  write_piece(row, 0, tokens, 1, weights)
  return row


def task_rows(data_cfg, tokenizer, *, seq_len, seed, process_index=0):
  """The endless grain IterDataset of this process's task rows (packing.FIELDS, [seq_len] each)."""
  documents = TaskDocuments(data_cfg.tasks, tokenizer, seq_len=seq_len, min_len=data_cfg.task_min_len,
                            task_loss=data_cfg.task_loss, seed=task_seed(seed, process_index),
                            answer_weight=data_cfg.task_answer_weight)
  documents.check()
  indices = grain.MapDataset.range(ENDLESS)
  if not documents.packed:
    pad_id = tokenizer.pad_id
    return indices.map(lambda index: single_example_row(documents(index), seq_len, pad_id)).to_iter_dataset(
        READ_OPTIONS)
  return PackedRows(indices.map(documents).to_iter_dataset(READ_OPTIONS), seq_len, tokenizer.pad_id)
