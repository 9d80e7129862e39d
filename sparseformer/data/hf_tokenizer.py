"""Hugging Face tokenizers (`tokenizer.json`, the `tokenizers` library): the tokenizers of
imported Llama, Mistral and Qwen models, `data.tokenizer=hf:DIR` (DIR holds tokenizer.json,
and usually tokenizer_config.json and config.json). A directory with only a SentencePiece
`tokenizer.model` (older Llama 2 and Mistral releases) is read with sentencepiece, with
that model's own special ids.

Special tokens follow the source model: the BOS id is the one the tokenizer itself puts
before a text (Llama does, Qwen does not: then documents start without one, bos_id is
None); the EOS id is tokenizer_config.json's eos_token, else config.json's eos_token_id;
padding uses pad_token, else EOS (padding is never attended to or scored).
"""

import functools
import json
import os
import re

import numpy as np

from sparseformer.data.tokenizers import SentencePieceTokenizer
from sparseformer.errors import UserError

BYTE_PIECE = re.compile(r'^<0x[0-9A-Fa-f]{2}>$')  # SentencePiece byte fallback pieces


@functools.lru_cache(maxsize=1)
def byte_level_alphabet():
  """{character: byte} of the byte-level BPE alphabet (GPT-2's): the printable bytes stand
  for themselves, every other byte for the character 256 + n, in byte order."""
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  extra, mapping = 0, {}
  for byte in range(256):
    if byte in printable:
      mapping[chr(byte)] = byte
    else:
      mapping[chr(256 + extra)] = byte
      extra += 1
  return mapping


def read_json(path):
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def token_text(value):
  """A special token as tokenizer_config.json writes it: a string or {'content': ...}."""
  return value.get('content') if isinstance(value, dict) else value


def hf_tokenizer(directory):
  """The tokenizer of a Hugging Face directory: tokenizer.json, else tokenizer.model."""
  if os.path.isfile(os.path.join(directory, 'tokenizer.json')):
    return HFTokenizer(directory)
  if os.path.isfile(os.path.join(directory, 'tokenizer.model')):
    return SourceSentencePiece(directory)
  raise UserError(f'data.tokenizer=hf:{directory}: no tokenizer.json or tokenizer.model in {directory}')


class SourceSentencePiece(SentencePieceTokenizer):
  """A source model's SentencePiece tokenizer.model with its own ids (Llama 2: unk 0, bos
  1, eos 2, no pad); BOS as tokenizer_config.json's add_bos_token says (default: on)."""

  def __init__(self, directory):  # not the parent's: that one wants sparseformer's pad/bos/eos ids
    import sentencepiece
    self.spec = f'hf:{directory}'
    path = os.path.join(directory, 'tokenizer.model')
    self.processor = sentencepiece.SentencePieceProcessor()
    try:
      self.processor.Load(path)
    except (OSError, RuntimeError) as e:
      raise UserError(f'{path}: not a SentencePiece model ({e})') from None
    settings = read_json(os.path.join(directory, 'tokenizer_config.json'))
    p = self.processor
    self.vocab_size = p.get_piece_size()
    self.bos_id = p.bos_id() if settings.get('add_bos_token', True) and p.bos_id() >= 0 else None
    if p.eos_id() < 0:
      raise UserError(f'{path}: the model has no eos piece')
    self.eos_id = p.eos_id()
    self.pad_id = p.pad_id() if p.pad_id() >= 0 else self.eos_id
    self.token_bytes = np.array([self._piece_bytes(i) for i in range(self.vocab_size)], np.int32)


class HFTokenizer:

  def __init__(self, directory):
    from tokenizers import Tokenizer
    self.spec = f'hf:{directory}'
    path = os.path.join(directory, 'tokenizer.json')
    if not os.path.isfile(path):
      raise UserError(f'data.tokenizer={self.spec!r}: no tokenizer.json in {directory}')
    try:
      self.tokenizer = Tokenizer.from_file(path)
    except Exception as e:  # the library raises its own exception types for a bad file
      raise UserError(f'{path}: not a tokenizer the tokenizers library reads ({e})') from None
    description = read_json(path)
    settings = read_json(os.path.join(directory, 'tokenizer_config.json'))
    model_config = read_json(os.path.join(directory, 'config.json'))
    self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
    self.bos_id = self.leading_special_id()
    self.eos_id = self.special_id(settings.get('eos_token'), model_config.get('eos_token_id'), 'eos')
    pad = self.special_id(settings.get('pad_token'), model_config.get('pad_token_id'), 'pad', required=False)
    self.pad_id = self.eos_id if pad is None else pad
    self.byte_level = 'ByteLevel' in json.dumps(description.get('decoder') or {})
    self.token_bytes = np.array([self.piece_bytes(i) for i in range(self.vocab_size)], np.int32)

  def leading_special_id(self):
    """The id the tokenizer puts before every text (its BOS), or None."""
    plain = self.tokenizer.encode('a', add_special_tokens=False).ids
    full = self.tokenizer.encode('a', add_special_tokens=True).ids
    if len(full) == len(plain) + 1 and full[1:] == plain:
      return full[0]
    return None

  def special_id(self, text, fallback_id, what, required=True):
    text = token_text(text)
    if text:
      token_id = self.tokenizer.token_to_id(text)
      if token_id is None:
        raise UserError(f'{self.spec}: tokenizer_config.json names {what} token {text!r}, which is not in the vocabulary')
      return token_id
    if isinstance(fallback_id, list):
      fallback_id = fallback_id[0] if fallback_id else None
    if fallback_id is None and required:
      raise UserError(f'{self.spec}: no {what} token (tokenizer_config.json {what}_token or config.json '
                      f'{what}_token_id)')
    return fallback_id

  def piece_bytes(self, token_id):
    """The UTF-8 bytes token_id stands for (0 for special tokens): bits per byte."""
    piece = self.tokenizer.id_to_token(token_id)
    if piece is None or self.is_special(token_id):
      return 0
    if BYTE_PIECE.match(piece):
      return 1
    if self.byte_level:
      alphabet = byte_level_alphabet()
      return sum(1 for ch in piece if ch in alphabet)
    return len(piece.replace('\u2581', ' ').encode('utf-8'))

  def is_special(self, token_id):
    return token_id in self.special_ids

  @functools.cached_property
  def special_ids(self):
    decoder = self.tokenizer.get_added_tokens_decoder()
    return frozenset(i for i, token in decoder.items() if token.special)

  def encode(self, text):
    if isinstance(text, bytes):
      text = text.decode('utf-8', errors='replace')
    return np.asarray(self.tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids):
    return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)
