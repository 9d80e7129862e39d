"""Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"): a random number
hidden at a given depth in book filler, asked for after the context.

  ... filler ... The pass key is 68451. Remember it. 68451 is the pass key. ... filler ...
  What is the pass key? The pass key is 68451
"""

from sparseformer.errors import UserError
from sparseformer.evaluation.tasks import haystack
from sparseformer.evaluation.tasks.base import Piece, register


@register('passkey')
def passkey(rng, tokenizer, length, depth, split, digits=5):
  if not 1 <= digits <= 18:
    raise UserError(f'passkey: digits={digits}: use 1 to 18')
  key = str(int(rng.integers(10 ** (digits - 1), 10 ** digits)))
  needle = [Piece(f'The pass key is {key}. Remember it. {key} is the pass key. ', 'needle')]
  turns = [Piece('\nWhat is the pass key? The pass key is ', 'question'), Piece(key, 'answer')]
  return haystack.haystack_example('passkey', rng, tokenizer, length, split, [needle], [depth], turns,
                                   what='the pass key, question and answer')
