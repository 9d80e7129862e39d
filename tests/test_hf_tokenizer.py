"""data.tokenizer=hf:DIR (sparseformer/data/hf_tokenizer.py): tokenizer.json files made
here with the tokenizers library, in the two styles the imported families use: byte-level
BPE with a BOS template (Llama 3) or none (Qwen), and a SentencePiece-style BPE with byte
fallback (Llama 2, Mistral)."""

import json

import numpy as np
import pytest

from sparseformer import data
from sparseformer.data.pipeline import document_tokens
from sparseformer.errors import UserError
from sparseformer.evaluation.tasks import encode, make_example

TEXTS = ['hello world, the quick brown fox', 'jumps over the lazy dog', 'naïve café — ünïcode'] * 10


def byte_level(directory, *, bos):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=['<|begin|>', '<|end|>', '<|pad|>'],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(TEXTS, trainer)
  if bos:
    tok.post_processor = processors.TemplateProcessing(single='<|begin|> $A',
                                                       special_tokens=[('<|begin|>', tok.token_to_id('<|begin|>'))])
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / 'tokenizer.json'))
  (directory / 'tokenizer_config.json').write_text(json.dumps(
      {'eos_token': {'content': '<|end|>'}, 'pad_token': '<|pad|>' if bos else None}))
  return tok


def sentencepiece_style(directory):
  """Llama 2's layout: '▁' for spaces, 256 byte pieces <0x00>..<0xFF> for what the
  vocabulary lacks, a few merges."""
  from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
  specials = ['<unk>', '<s>', '</s>']
  vocab = {token: i for i, token in enumerate(specials + [f'<0x{b:02X}>' for b in range(256)])}
  for piece in ['\u2581', 't', 'h', 'e', 'f', 'o', 'x', 'th', 'the', '\u2581f', '\u2581fo', '\u2581fox']:
    vocab[piece] = len(vocab)
  merges = [('t', 'h'), ('th', 'e'), ('\u2581', 'f'), ('\u2581f', 'o'), ('\u2581fo', 'x')]
  tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, byte_fallback=True, unk_token='<unk>'))
  tok.add_special_tokens([AddedToken(token, special=True) for token in specials])
  tok.normalizer = normalizers.Replace(' ', '\u2581')
  tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement='\u2581', prepend_scheme='never', split=False)
  tok.decoder = decoders.Sequence([decoders.Replace('\u2581', ' '), decoders.ByteFallback(), decoders.Fuse()])
  tok.post_processor = processors.TemplateProcessing(single='<s> $A', special_tokens=[('<s>', 1)])
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / 'tokenizer.json'))
  (directory / 'config.json').write_text(json.dumps({'bos_token_id': 1, 'eos_token_id': 2}))
  return tok


@pytest.mark.parametrize('bos', [True, False], ids=['with_bos', 'without_bos'])
def test_byte_level_tokenizer_follows_the_source_special_tokens(tmp_path, bos):
  source = byte_level(tmp_path, bos=bos)
  tokenizer = data.make_tokenizer(f'hf:{tmp_path}')
  assert tokenizer.vocab_size == source.get_vocab_size()
  assert tokenizer.bos_id == (source.token_to_id('<|begin|>') if bos else None)
  assert tokenizer.eos_id == source.token_to_id('<|end|>')
  assert tokenizer.pad_id == (source.token_to_id('<|pad|>') if bos else tokenizer.eos_id)
  for text in TEXTS[:3] + ['unseen: 日本語 🙂']:
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and list(ids) == source.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text
    assert int(tokenizer.token_bytes[ids].sum()) == len(text.encode('utf-8'))  # bits per byte stay exact
  assert tokenizer.token_bytes[tokenizer.eos_id] == 0


def test_documents_and_task_examples_start_with_bos_only_when_the_source_does(tmp_path):
  for bos in (True, False):
    byte_level(tmp_path / str(bos), bos=bos)
    tokenizer = data.make_tokenizer(f'hf:{tmp_path / str(bos)}')
    tokens = document_tokens(tokenizer, "text")({'text': 'the lazy dog'})
    body = list(tokenizer.encode('the lazy dog')) + [tokenizer.eos_id]
    assert list(tokens) == ([tokenizer.bos_id] if bos else []) + body
    encoded = encode(make_example('mqar:pairs=2,vocab=16', tokenizer, 64), tokenizer)
    assert (encoded.tokens[0] == tokenizer.bos_id) == bos and len(encoded.tokens) <= 64
    for start, end in encoded.answer_spans:
      assert start >= 1 and end <= len(encoded.tokens)


def test_sentencepiece_style_tokenizer_counts_byte_pieces(tmp_path):
  source = sentencepiece_style(tmp_path)
  tokenizer = data.make_tokenizer(f'hf:{tmp_path}')
  assert (tokenizer.bos_id, tokenizer.eos_id) == (source.token_to_id('<s>'), source.token_to_id('</s>'))
  text = 'the fox ü'  # 'ü' is not a piece: two byte-fallback pieces
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert int(tokenizer.token_bytes[ids].sum()) == len(text.encode('utf-8'))


def test_bad_hf_tokenizer_paths_are_user_errors(tmp_path):
  with pytest.raises(UserError, match='is not a directory'):
    data.make_tokenizer(f'hf:{tmp_path / "missing"}')
  with pytest.raises(UserError, match='no tokenizer.json or tokenizer.model in'):
    data.make_tokenizer(f'hf:{tmp_path}')
  (tmp_path / 'tokenizer.json').write_text('{"not": "a tokenizer"}')
  with pytest.raises(UserError, match='not a tokenizer the tokenizers library reads'):
    data.make_tokenizer(f'hf:{tmp_path}')
  byte_level(tmp_path, bos=True)
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'eos_token': '<|nope|>'}))
  with pytest.raises(UserError, match="names eos token '<|nope|>', which is not in the vocabulary"):
    data.make_tokenizer(f'hf:{tmp_path}')
  (tmp_path / 'tokenizer_config.json').write_text('{}')
  with pytest.raises(UserError, match='no eos token'):
    data.make_tokenizer(f'hf:{tmp_path}')


def test_a_directory_with_only_a_sentencepiece_model_uses_its_own_ids(tmp_path):
  import sentencepiece
  sentencepiece.SentencePieceTrainer.train(  # Llama 2's special ids: unk 0, bos 1, eos 2, no pad
      sentence_iterator=iter(TEXTS * 5), model_prefix=str(tmp_path / 'tokenizer'), vocab_size=320,
      model_type='bpe', unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True, minloglevel=2)
  tokenizer = data.make_tokenizer(f'hf:{tmp_path}')
  assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (1, 2, 2)
  text = 'the lazy fox 日'
  ids = tokenizer.encode(text)
  assert tokenizer.decode(ids) == text
  assert int(tokenizer.token_bytes[ids].sum()) == len((' ' + text).encode('utf-8'))  # + the dummy prefix
  (tmp_path / 'tokenizer_config.json').write_text(json.dumps({'add_bos_token': False}))
  assert data.make_tokenizer(f'hf:{tmp_path}').bos_id is None
