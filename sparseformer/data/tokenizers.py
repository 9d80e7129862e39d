"""Tokenizers: bytes (the default, no files), bytes plus task symbols (codes:N), and
SentencePiece models trained locally.

Both reserve ids 0, 1, 2 for pad, bos and eos, and know how many UTF-8 bytes each token
stands for (`token_bytes`), which turns NLL per token into bits per byte.

Train a SentencePiece model on a prepared dataset's train split:

    python -m sparseformer.cli.train_tokenizer --dataset=sparseformer_text/books \
        --vocab_size=8192 --output=spm/books.model [--data_dir=DIR] [--model_type=bpe|unigram]

It prints the spec to put in a config: --config.data.tokenizer=spm:spm/books.model
"""

import os
import re

import numpy as np

from sparseformer.errors import UserError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIALS = 3  # pad, bos, eos
# SentencePiece drops training sentences longer than this many bytes.
MAX_SENTENCE_BYTES = 1 << 16


class ByteTokenizer:
  """UTF-8 bytes shifted past the three special ids: byte b is token b + 3."""

  spec = 'byte'
  vocab_size = 256 + SPECIALS
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

  def __init__(self):
    self.token_bytes = np.concatenate([np.zeros(SPECIALS, np.int32), np.ones(256, np.int32)])

  def encode(self, text):
    raw = text.encode('utf-8') if isinstance(text, str) else bytes(text)
    return np.frombuffer(raw, np.uint8).astype(np.int32) + SPECIALS

  def decode(self, ids):
    ids = np.asarray(ids)
    raw = (ids[ids >= SPECIALS] - SPECIALS).astype(np.uint8).tobytes()
    return raw.decode('utf-8', errors='replace')


def code_width(count):
  """Letters of the base-26 codes of `count` symbols: 2 for up to 676, 3 for up to 17576."""
  width = 1
  while 26 ** width < count:
    width += 1
  return width


def code(index, width):
  """Symbol `index` as a lowercase base-26 code of `width` letters ('aa', 'ab', ...)."""
  letters = []
  for _ in range(width):
    index, digit = divmod(index, 26)
    letters.append(chr(ord('a') + digit))
  return ''.join(reversed(letters))


def code_index(word):
  index = 0
  for letter in word:
    index = index * 26 + ord(letter) - ord('a')
  return index


class CodeTokenizer(ByteTokenizer):
  """Bytes plus one token per task symbol (spec 'codes:N'): a lowercase word of exactly
  code_width(N) letters whose code is below N (the symbols of the MQAR task: 'ab:cd' is
  key 'ab', ':' and value 'cd') is token 259 + its index; everything else is bytes. With
  it a key is one token, as in Zoology's MQAR, where byte tokens make it several.
  decode(encode(t)) == t; a symbol token stands for its width in bytes."""

  def __init__(self, count):
    super().__init__()
    if count < 1:
      raise UserError(f'data.tokenizer=codes:{count}: use a positive number of symbols')
    self.count, self.width = count, code_width(count)
    self.spec = f'codes:{count}'
    self.vocab_size = ByteTokenizer.vocab_size + count
    self.token_bytes = np.concatenate([self.token_bytes, np.full(count, self.width, np.int32)])
    self.words = re.compile(f'(?<![a-z])[a-z]{{{self.width}}}(?![a-z])')

  def encode(self, text):
    text = text.decode('utf-8', errors='replace') if isinstance(text, bytes) else text
    pieces, start = [], 0
    for word in self.words.finditer(text):
      index = code_index(word.group())
      if index < self.count:
        pieces += [super().encode(text[start:word.start()]), [ByteTokenizer.vocab_size + index]]
        start = word.end()
    pieces.append(super().encode(text[start:]))
    return np.concatenate(pieces).astype(np.int32)

  def decode(self, ids):
    ids = np.asarray(ids)
    symbols = np.flatnonzero(ids >= ByteTokenizer.vocab_size)
    parts, start = [], 0
    for at in symbols:
      parts += [super().decode(ids[start:at]), code(int(ids[at]) - ByteTokenizer.vocab_size, self.width)]
      start = at + 1
    return ''.join(parts + [super().decode(ids[start:])])


class SentencePieceTokenizer:
  """A SentencePiece model with pad=0, bos=1, eos=2 (as `train_sentencepiece` makes)."""

  def __init__(self, model_path):
    import sentencepiece
    self.spec = f'spm:{model_path}'
    self.processor = sentencepiece.SentencePieceProcessor(model_file=model_path)
    ids = (self.processor.pad_id(), self.processor.bos_id(), self.processor.eos_id())
    if ids != (PAD_ID, BOS_ID, EOS_ID):
      raise UserError(f'{model_path}: pad/bos/eos ids are {ids}, expected (0, 1, 2); '
                      'train it with python -m sparseformer.cli.train_tokenizer')
    self.vocab_size = self.processor.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = PAD_ID, BOS_ID, EOS_ID
    self.token_bytes = np.array([self._piece_bytes(i) for i in range(self.vocab_size)], np.int32)

  def _piece_bytes(self, token_id):
    processor = self.processor
    if processor.is_control(token_id) or processor.is_unknown(token_id):
      return 0
    if processor.is_byte(token_id):  # <0xAB> pieces of byte fallback
      return 1
    return len(processor.id_to_piece(token_id).replace('\u2581', ' ').encode('utf-8'))

  def encode(self, text):
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    return np.asarray(self.processor.encode(text), np.int32)

  def decode(self, ids):
    return self.processor.decode([int(i) for i in ids if int(i) >= SPECIALS])


def make_tokenizer(spec):
  """'byte', 'codes:N' (bytes and N task symbols), 'spm:/path/to/model' or 'hf:/path/to/dir'
  (tokenizer.json)."""
  if spec == 'byte':
    return ByteTokenizer()
  if spec.startswith('codes:'):
    count = spec[len('codes:'):]
    if not count.isdigit():
      raise UserError(f'data.tokenizer={spec!r}: use codes:N with N the number of task symbols, e.g. codes:676')
    return CodeTokenizer(int(count))
  if spec.startswith('hf:'):
    from sparseformer.data.hf_tokenizer import hf_tokenizer
    path = os.path.expanduser(spec[len('hf:'):])
    if not os.path.isdir(path):
      raise UserError(f'data.tokenizer={spec!r}: {path} is not a directory (give the folder of tokenizer.json)')
    return hf_tokenizer(path)
  if spec.startswith('spm:'):
    path = os.path.expanduser(spec[len('spm:'):])
    if not os.path.isfile(path):
      raise UserError(f'data.tokenizer={spec!r}: no SentencePiece model at {path}')
    return SentencePieceTokenizer(path)
  raise UserError(f'data.tokenizer={spec!r}: use byte, codes:N, spm:/path/to/model or hf:/path/to/dir')


def train_sentencepiece(texts, output, vocab_size, model_type='bpe', max_sentences=1_000_000):
  """Trains a lossless model (decode(encode(t)) == t) on an iterator of strings; writes
  OUTPUT (and OUTPUT.vocab) and returns the .model path."""
  import sentencepiece
  prefix = output[:-len('.model')] if output.endswith('.model') else output
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  try:
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=prefix, vocab_size=vocab_size, model_type=model_type,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, byte_fallback=True,
        character_coverage=1.0, max_sentence_length=MAX_SENTENCE_BYTES, split_digits=True, minloglevel=2,
        # A random sample of this many sentences bounds memory on large datasets.
        input_sentence_size=max_sentences, shuffle_input_sentence=True,
        # No normalisation; spaces and newlines kept as they are.
        normalization_rule_name='identity', remove_extra_whitespaces=False, add_dummy_prefix=False,
        allow_whitespace_only_pieces=True)
  except RuntimeError as e:  # how sentencepiece reports bad settings
    raise UserError(training_error_message(str(e), vocab_size)) from e
  return prefix + '.model'


def training_error_message(error, vocab_size):
  too_small = re.search(r'smaller than required_chars\. \d+ vs (\d+)', error)
  if too_small:
    return (f'vocab_size={vocab_size} is too small: the 256 byte pieces, 4 special pieces and the characters '
            f'of this corpus need at least {too_small.group(1)}')
  return f'SentencePiece training failed: {error.splitlines()[0]}'


def cut_to_bytes(text, max_bytes):
  """The longest prefix of text with at most max_bytes UTF-8 bytes."""
  return text.encode('utf-8')[:max_bytes].decode('utf-8', errors='ignore')


def training_paragraphs(source, text_key):
  """Blank-line-separated paragraphs of every document, newlines inside kept:
  SentencePiece trains on 'sentences' of bounded length."""
  for index in range(len(source)):
    text = source[index][text_key]
    text = text.decode('utf-8', errors='replace') if isinstance(text, bytes) else text
    for paragraph in text.split('\n\n'):
      if paragraph.strip():
        yield cut_to_bytes(paragraph + '\n\n', MAX_SENTENCE_BYTES - 1)


def train_from_dataset(data_cfg, output, vocab_size, model_type='bpe'):
  """Trains on the train split of data_cfg's dataset; returns the tokenizer spec."""
  from sparseformer.data.build import open_split
  source = open_split(data_cfg, data_cfg.train_split)
  return 'spm:' + train_sentencepiece(training_paragraphs(source, data_cfg.text_key), output, vocab_size, model_type)
