"""Tokenizers: bytes (the default, no files) and SentencePiece models trained locally.

Both reserve ids 0, 1, 2 for pad, bos and eos, and know how many UTF-8 bytes each token
stands for (`token_bytes`), which turns NLL per token into bits per byte.

Train a SentencePiece model on a prepared dataset's train split:
    python -m sparseformer.cli.train_tokenizer --dataset=sparseformer_text/books --vocab_size=8192 --output=spm/books.model
"""

import os

import numpy as np

from sparseformer.errors import UserError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class ByteTokenizer:
  """UTF-8 bytes shifted past the three special ids: byte b is token b + 3."""
  spec = 'byte'
  vocab_size = 256 + 3
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

  def __init__(self):
    self.token_bytes = np.concatenate([np.zeros(3, np.int32), np.ones(256, np.int32)])

  def encode(self, text):
    raw = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    return np.frombuffer(raw, np.uint8).astype(np.int32) + 3

  def decode(self, ids):
    ids = np.asarray(ids)
    return (ids[ids >= 3] - 3).astype(np.uint8).tobytes().decode('utf-8', errors='replace')


class SentencePieceTokenizer:
  """A SentencePiece model trained with pad=0, bos=1, eos=2 (see `train_sentencepiece`)."""

  def __init__(self, model_path):
    import sentencepiece
    self.spec = f'spm:{model_path}'
    self.processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
    ids = (self.processor.pad_id(), self.processor.bos_id(), self.processor.eos_id())
    if ids != (PAD_ID, BOS_ID, EOS_ID):
      raise UserError(f'{model_path}: pad/bos/eos ids are {ids}, expected (0, 1, 2); '
                      'train it with python -m sparseformer.data.tokenizers')
    self.vocab_size = self.processor.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
    self.token_bytes = np.array([self._piece_bytes(i) for i in range(self.vocab_size)], np.int32)

  def _piece_bytes(self, token_id):
    p = self.processor
    if p.is_control(token_id) or p.is_unknown(token_id):
      return 0
    if p.is_byte(token_id):
      return 1
    return len(p.id_to_piece(token_id).replace('\u2581', ' ').encode('utf-8'))

  def encode(self, text):
    text = text.decode('utf-8', errors='replace') if isinstance(text, bytes) else text
    return np.asarray(self.processor.encode(text), np.int32)

  def decode(self, ids):
    return self.processor.decode([int(i) for i in ids if int(i) > EOS_ID])


def make_tokenizer(spec):
  """'byte' or 'spm:/path/to/model'."""
  if spec == 'byte':
    return ByteTokenizer()
  if spec.startswith('spm:'):
    path = os.path.expanduser(spec[len('spm:'):])
    if not os.path.isfile(path):
      raise UserError(f'data.tokenizer={spec!r}: no SentencePiece model at {path}')
    return SentencePieceTokenizer(path)
  raise UserError(f'data.tokenizer={spec!r}: use byte or spm:/path/to/model')


def train_sentencepiece(texts, output, vocab_size, model_type='bpe'):
  """Trains a model on an iterator of strings; writes OUTPUT (and OUTPUT.vocab)."""
  import sentencepiece
  prefix = output[:-len('.model')] if output.endswith('.model') else output
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=3, byte_fallback=True,
        character_coverage=1.0, max_sentence_length=1 << 16, split_digits=True, minloglevel=2,
        # Lossless: no normalisation, whitespace and newlines kept, so decode(encode(t)) == t.
        normalization_rule_name='identity', remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True)
  except RuntimeError as e:  # sentencepiece reports bad settings (vocab too small) this way
    raise UserError(f'SentencePiece training failed: {str(e).splitlines()[0]}') from e
  return prefix + '.model'
