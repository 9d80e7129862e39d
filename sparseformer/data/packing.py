"""Packing documents into fixed-length rows, deterministically and resumably.

A document is the token list t = [bos] + encode(text) + [eos]; it gives the training
pairs (t[i], t[i+1]). A row holds `seq_len` pairs:
  - a document with at most seq_len pairs is never split: if it does not fit the space
    left in the row, the row is padded and the document starts the next one;
  - a longer document is split anyway: it fills the space left, then whole rows, and
    its tail continues like a new piece.
Each piece has its own segment id (1, 2, ... within the row; 0 is padding) and
positions restarting at 0. Padding: tokens = targets = pad, positions = segment_ids = 0,
loss_mask = 0.

A document may also be a pair (tokens, loss_weights) with one float weight per pair
(len(tokens) - 1 of them): the pairs' loss_mask is that weight instead of 1 (task rows
train on the answer tokens only this way). Pieces of a split document carry their slice.

The iterator state is {'parent': the parent's state before the document being consumed,
'pairs_emitted': how many of its pairs are already in rows}: no token buffers, so it is
small and JSON-serializable, and restoring it reproduces the following rows exactly.
"""

import grain
import numpy as np

FIELDS = ('tokens', 'targets', 'positions', 'segment_ids', 'loss_mask')


def empty_row(seq_len, pad_id):
  """A row of padding only."""
  row = {name: np.zeros(seq_len, np.int32) for name in FIELDS}
  row['tokens'][:] = pad_id
  row['targets'][:] = pad_id
  row['loss_mask'] = np.zeros(seq_len, np.float32)
  return row


def write_piece(row, start, tokens, segment_id, loss_weights=None):
  """Puts the pairs of `tokens` (len(tokens) - 1 of them) into row[start:], with loss_mask
  `loss_weights` (one per pair) or 1."""
  end = start + len(tokens) - 1
  row['tokens'][start:end] = tokens[:-1]
  row['targets'][start:end] = tokens[1:]
  row['positions'][start:end] = np.arange(end - start)
  row['segment_ids'][start:end] = segment_id
  row['loss_mask'][start:end] = 1.0 if loss_weights is None else loss_weights


def as_document(element):
  """A parent element -> (int32 tokens, float32 per-pair loss weights or None)."""
  if isinstance(element, tuple):
    tokens, weights = element
    tokens, weights = np.asarray(tokens, np.int32), np.asarray(weights, np.float32)
    if weights.shape != (max(len(tokens) - 1, 0),):
      raise ValueError(f'a document of {len(tokens)} tokens needs {len(tokens) - 1} pair weights, '
                       f'got shape {weights.shape}')
    return tokens, weights
  return np.asarray(element, np.int32), None


class PackedRows(grain.IterDataset):
  """Rows of `seq_len` pairs from a parent dataset of documents: token arrays, or
  (tokens, loss_weights) pairs (see the module docstring)."""

  def __init__(self, parent, seq_len, pad_id):
    super().__init__(parent)
    if seq_len <= 0:
      raise ValueError(f'seq_len must be positive, got {seq_len}')
    self.seq_len, self.pad_id = seq_len, pad_id

  def __iter__(self):
    return PackingIterator(iter(self._parent), self.seq_len, self.pad_id)

  def __str__(self):
    return f'PackedRows(seq_len={self.seq_len})'


class PackingIterator(grain.DatasetIterator):
  """Iterator of PackedRows; see the module docstring for its state."""

  def __init__(self, parent, seq_len, pad_id):
    super().__init__(parent)
    self._seq_len, self._pad_id = seq_len, pad_id
    self._document = None  # token array of the document being consumed
    self._weights = None  # its per-pair loss weights, or None (all 1)
    self._document_state = None  # the parent's state before that document
    # Pairs of the current document already in rows; while no document is loaded, the
    # pairs to skip in the next one (non-zero only just after set_state).
    self._pairs_emitted = 0

  def _load_document(self):
    """Makes sure a document with pairs left is loaded; False once the parent is exhausted."""
    while self._document is None:
      state = self._parent.get_state()
      try:
        tokens, weights = as_document(next(self._parent))
      except StopIteration:
        return False
      if len(tokens) - 1 > self._pairs_emitted:
        self._document, self._weights, self._document_state = tokens, weights, state
      else:
        self._pairs_emitted = 0
    return True

  def __next__(self):
    row, filled, segment_id = empty_row(self._seq_len, self._pad_id), 0, 0
    while filled < self._seq_len and self._load_document():
      pairs = len(self._document) - 1
      pairs_left, space = pairs - self._pairs_emitted, self._seq_len - filled
      if pairs_left > space and pairs <= self._seq_len:
        break  # a document that fits in a row is never split: it starts the next row
      count = min(pairs_left, space)
      segment_id += 1
      start = self._pairs_emitted
      weights = None if self._weights is None else self._weights[start:start + count]
      write_piece(row, filled, self._document[start:start + count + 1], segment_id, weights)
      filled += count
      self._pairs_emitted += count
      if self._pairs_emitted == pairs:
        self._document, self._weights, self._pairs_emitted = None, None, 0
    if filled == 0:
      raise StopIteration
    return row

  def get_state(self):
    parent_state = self._parent.get_state() if self._document is None else self._document_state
    return {'parent': parent_state, 'pairs_emitted': self._pairs_emitted}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._document, self._weights, self._document_state = None, None, None
    self._pairs_emitted = state['pairs_emitted']
