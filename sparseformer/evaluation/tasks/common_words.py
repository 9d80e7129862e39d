"""RULER's common words extraction (cwe): a numbered list of words in which `common`
words appear `freq_common` times each (default: RULER's 30, fewer at short lengths)
and as many other words as fit the budget `freq_rare` times each, shuffled; the
question asks for the common words.

  Below is a numbered list of words. ... 1. garden 2. lantern 3. meadow ...
  Question: What are the 10 most common words in the above list? Answer: The top 10
  words appearing most often in the list are: garden meadow ...

The words are distinct lowercase words of the split's books (RULER draws from a word
list; past the books' vocabulary, word pairs joined by '-' take over). The answers are
the common words in order of first appearance, one answer piece each, each after a ' '
question piece. No book filler and no depth (nan). The list's numbers and words are
pieces of their own, so the token count is exact for any tokenizer; the list falls short
of the budget by less than one (short) rare word's `freq_rare` items.
"""

import math

from sparseformer.errors import UserError
from sparseformer.evaluation.tasks import haystack
from sparseformer.evaluation.tasks.base import Example, Piece, register

PREAMBLE = ('Below is a numbered list of words. In these words, some appear more often than others. '
            'Memorize the ones that appear most often.\n')


class WordSource:
  """Distinct words in a seeded random order: the books' words, then pairs of them."""

  def __init__(self, rng, split):
    self.pool = haystack.book_words(split)
    self.order = rng.permutation(len(self.pool))

  def __getitem__(self, k):
    size = len(self.pool)
    if k < size:
      return self.pool[self.order[k]]
    j = k - size
    a, b = j % size, (j % size + 1 + j // size) % size
    if j // size >= size - 1:
      raise UserError('common_words: the list needs more distinct words than the books give')
    return f'{self.pool[self.order[a]]}-{self.pool[self.order[b]]}'


AUTO_FREQ_COMMON = 30  # RULER's freq_cw
MAX_MISSES = 20  # rare words tried after the list is full


@register('common_words')
def common_words(rng, tokenizer, length, depth, split, common=10, freq_common=0, freq_rare=3):
  """freq_common=0: RULER's 30, lowered where the common words would take more than half
  of the list (short lengths) down to freq_rare + 1."""
  del depth  # the list has no needle depth
  if common < 1:
    raise UserError(f'common_words: common={common}: use at least 1')
  if freq_rare < 1 or freq_common < 0 or (freq_common and freq_common <= freq_rare):
    raise UserError(f'common_words: freq_rare={freq_rare}, freq_common={freq_common}: '
                    'use 1 <= freq_rare < freq_common (or freq_common=0 for the default)')
  count = lambda text: haystack.token_count(tokenizer, text)  # noqa: E731
  words = WordSource(rng, split)
  chosen = [words[k] for k in range(common)]
  question = Piece(f'\nQuestion: What are the {common} most common words in the above list? Answer: '
                   f'The top {common} words appearing most often in the list are:', 'question')
  fixed = 1 + count(PREAMBLE) + count(question.text) + common * count(' ') + sum(count(w) for w in chosen)
  number_costs = [0]  # number_costs[n]: the tokens of the numbers '1. ' .. 'n. '

  def numbers(n):
    while len(number_costs) <= n:
      number_costs.append(number_costs[-1] + count(f'{len(number_costs)}. '))
    return number_costs[n]

  common_word_tokens = sum(count(w + ' ') for w in chosen)
  common_cost = lambda f: f * common_word_tokens + numbers(common * f)  # noqa: E731
  if freq_common:
    frequency = freq_common
  else:
    room = length - fixed
    frequency = next((f for f in range(AUTO_FREQ_COMMON, freq_rare, -1) if 2 * common_cost(f) <= room),
                     freq_rare + 1)
  total = fixed + common_cost(frequency)
  if total > length:
    raise haystack.too_short('common_words', length, total,
                             f'the {common} common words x {frequency}, question and answers')
  # Rare words while they fit; past the first that does not, shorter ones may still fit.
  items, rare, candidate, misses = common * frequency, [], common, 0
  while misses < MAX_MISSES:
    word = words[candidate]
    candidate += 1
    cost = freq_rare * count(word + ' ') + numbers(items + freq_rare) - numbers(items)
    if total + cost > length:
      misses += 1
      continue
    total += cost
    items += freq_rare
    rare.append(word)
  listed = [w for w in chosen for _ in range(frequency)] + [w for w in rare for _ in range(freq_rare)]
  listed = [listed[i] for i in rng.permutation(len(listed))]
  pieces = [Piece(PREAMBLE, 'filler')]
  for i, word in enumerate(listed, 1):
    pieces += [Piece(f'{i}. ', 'filler'), Piece(word + ' ', 'filler')]
  pieces.append(question)
  first = {}
  for i, word in enumerate(listed):
    first.setdefault(word, i)
  for word in sorted(chosen, key=first.__getitem__):
    pieces += [Piece(' ', 'question'), Piece(word, 'answer')]
  return Example('common_words', tuple(pieces), length, math.nan)
