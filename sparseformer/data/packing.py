"""Packing documents into fixed-length rows, deterministically and resumably.

A document is the token list t = [bos] + text + [eos]; it yields the training pairs
(t[i], t[i+1]). A row holds `seq_len` pairs:
  - a document with at most seq_len pairs is never split: if it does not fit the space
    left in the row, the row is padded and the document starts the next one;
  - a longer document is split anyway: it fills the space left, then whole rows, and
    its tail continues like a new piece.
Each piece has its own segment id (1, 2, ... within the row; 0 is padding) and
positions restarting at 0. The iterator state is the parent's state before the
partially consumed document plus how many of its pairs were emitted: no token buffers.
"""

import grain
import numpy as np

FIELDS = ('tokens', 'targets', 'positions', 'segment_ids', 'loss_mask')


def empty_row(seq_len, pad_id):
  row = {name: np.zeros(seq_len, np.int32) for name in FIELDS}
  row['tokens'][:] = pad_id
  row['targets'][:] = pad_id
  row['loss_mask'] = np.zeros(seq_len, np.float32)
  return row


class PackedRows(grain.IterDataset):
  """Rows of `seq_len` pairs from a parent dataset of token arrays (one per document)."""

  def __init__(self, parent, seq_len, pad_id):
    super().__init__(parent)
    self.seq_len, self.pad_id = seq_len, pad_id

  def __iter__(self):
    return PackingIterator(self._parent.__iter__(), self.seq_len, self.pad_id)


class PackingIterator(grain.DatasetIterator):

  def __init__(self, parent, seq_len, pad_id):
    super().__init__(parent)
    self.seq_len, self.pad_id = seq_len, pad_id
    self._doc = None  # tokens of the document being consumed
    self._doc_parent_state = None  # parent state before that document was read
    self._offset = 0  # pairs of it already emitted
    self._resume_offset = 0

  def _fetch_document(self):
    """Next document with at least one pair; False when the parent is exhausted."""
    while True:
      state = self._parent.get_state()
      try:
        tokens = next(self._parent)
      except StopIteration:
        return False
      offset, self._resume_offset = self._resume_offset, 0
      if len(tokens) - 1 > offset:
        self._doc, self._doc_parent_state, self._offset = np.asarray(tokens, np.int32), state, offset
        return True

  def __next__(self):
    L = self.seq_len
    row, filled, segment = empty_row(L, self.pad_id), 0, 0
    while filled < L:
      if self._doc is None and not self._fetch_document():
        if filled == 0:
          raise StopIteration
        break
      pairs_total = len(self._doc) - 1
      pairs_left, space = pairs_total - self._offset, L - filled
      if pairs_left > space and pairs_total <= L and self._offset == 0:
        break  # a short document is never split: it starts the next row
      count = min(pairs_left, space)
      segment += 1
      start = self._offset
      row['tokens'][filled:filled + count] = self._doc[start:start + count]
      row['targets'][filled:filled + count] = self._doc[start + 1:start + count + 1]
      row['positions'][filled:filled + count] = np.arange(count)
      row['segment_ids'][filled:filled + count] = segment
      row['loss_mask'][filled:filled + count] = 1.0
      filled += count
      self._offset += count
      if self._offset == pairs_total:
        self._doc = None
    return row

  def get_state(self):
    if self._doc is None:
      return {'parent': self._parent.get_state(), 'offset': self._resume_offset}
    return {'parent': self._doc_parent_state, 'offset': self._offset}

  def set_state(self, state):
    self._parent.set_state(state['parent'])
    self._doc, self._resume_offset = None, state['offset']
