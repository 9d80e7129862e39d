"""Haystack filler: sentences of the shipped Project Gutenberg books.

The books of a split (`corpora_text.VALIDATION_BOOKS` for 'validation', the others for
'train') are cut once per process into sentence-sized pieces of at most
MAX_PIECE_CHARS characters, each ending with one space (whitespace runs, line ends
included, become single spaces). `fill` takes consecutive pieces from a seeded random
book and sentence (running on into the split's next book) until the token budget is
spent; the piece that does not fit is cut to the budget (at a word boundary when one is
close), so the filler falls short of the budget by less than one word. `place_needles`
then puts needle pieces between filler pieces at requested depths.

Depth: a needle of n tokens at depth d in a context of C tokens (bos included) should
start at token 1 + d * (C - 1 - n): depth 0 is the first token after bos, depth 1 puts
the needle's last token at the end of the context. Needles go between filler pieces,
so a needle lies within one filler piece of its target.
"""

import functools
import math
import re

import numpy as np

from sparseformer.data import corpora_text
from sparseformer.errors import UserError
from sparseformer.evaluation.tasks.base import Example, Piece, token_count

MAX_PIECE_CHARS = 300
# A cut piece backs off to the last word boundary when that loses at most this many characters.
WORD_BACKOFF_CHARS = 24

# A sentence ends at . ! or ? (maybe followed by a closing quote or bracket) and a space,
# except after Mr. Mrs. Dr. St.
_SENTENCE_END = re.compile(r'(?<!\bMr\.)(?<!\bMrs\.)(?<!\bDr\.)(?<!\bSt\.)'
                           r'(?:(?<=[.!?])|(?<=[.!?]["\'\u201d\u2019)\]_]))\s+')
_WHITESPACE = re.compile(r'\s+')


def split_sentences(text, max_chars=MAX_PIECE_CHARS):
  """The text's sentences, each with one trailing space; longer ones are cut at spaces
  into parts of at most max_chars characters (a single longer word is a part of its own)."""
  text = _WHITESPACE.sub(' ', text).strip()
  pieces = []
  for sentence in _SENTENCE_END.split(text):
    if not sentence:
      continue
    if len(sentence) < max_chars:
      pieces.append(sentence + ' ')
      continue
    part = ''
    for word in sentence.split(' '):
      if part and len(part) + len(word) + 1 > max_chars:
        pieces.append(part)
        part = ''
      part += word + ' '
    if part:
      pieces.append(part)
  return pieces


@functools.lru_cache(maxsize=None)
def book_sentences(split):
  """((book_id, (piece, ...)), ...) of the split's books, in file name order."""
  if split not in ('train', 'validation'):
    raise ValueError(f'split {split!r}: use train or validation')
  books = tuple((path.stem, tuple(split_sentences(corpora_text.strip_gutenberg(corpora_text.read_text(path)))))
                for path in corpora_text.book_paths() if corpora_text.book_split(path.stem) == split)
  if not books:
    raise UserError(f'no {split} books in {corpora_text.BOOKS}')
  return books


@functools.lru_cache(maxsize=None)
def book_words(split):
  """The distinct lowercase words (3 to 12 letters) of the split's books, sorted."""
  words = set()
  for _, sentences in book_sentences(split):
    for sentence in sentences:
      words.update(re.findall(r'\b[a-z]{3,12}\b', sentence))
  return tuple(sorted(words))


def longest_prefix(tokenizer, text, budget):
  """The longest prefix of text of at most `budget` tokens, backed off to a word boundary
  (ending with its space) when one is within WORD_BACKOFF_CHARS characters; '' if none."""
  low, high = 0, len(text)  # the prefix of `low` characters fits
  while low < high:
    middle = (low + high + 1) // 2
    if token_count(tokenizer, text[:middle]) <= budget:
      low = middle
    else:
      high = middle - 1
  space = text.rfind(' ', 0, low)
  if space >= 0 and low - (space + 1) <= WORD_BACKOFF_CHARS and low < len(text) and text[low] != ' ':
    backed = text[:space + 1]
    if token_count(tokenizer, backed) <= budget:
      return backed
  return text[:low]


def fill_counted(rng, tokenizer, budget_tokens, split):
  """(pieces, token counts) of filler of at most budget_tokens tokens (in all), short of
  it by less than a word: consecutive sentences from a random book and sentence."""
  books = book_sentences(split)
  book = int(rng.integers(len(books)))
  index = int(rng.integers(len(books[book][1])))
  pieces, counts, left = [], [], int(budget_tokens)
  while left > 0:
    sentences = books[book][1]
    if index >= len(sentences):
      book, index = (book + 1) % len(books), 0
      continue
    text = sentences[index]
    index += 1
    count = token_count(tokenizer, text)
    if count > left:
      text = longest_prefix(tokenizer, text, left)
      if not text:
        break
      count = token_count(tokenizer, text)
      left = 0  # the cut piece is the last
    else:
      left -= count
    pieces.append(Piece(text, 'filler'))
    counts.append(count)
  return pieces, counts


def fill(rng, tokenizer, budget_tokens, split):
  """Filler pieces (role 'filler') of at most budget_tokens tokens in all, short of it by
  less than a word."""
  return fill_counted(rng, tokenizer, budget_tokens, split)[0]


def needle_target(depth, context_tokens, needle_tokens):
  """The token where a needle of needle_tokens at `depth` should start (see the module doc)."""
  return 1 + depth * (context_tokens - 1 - needle_tokens)


def place_needles(fillers, filler_counts, needles, depths, *, prefix_tokens=1):
  """Context pieces: the fillers with each needle inserted at the filler boundary closest
  to its target start (see the module doc). needles: [(pieces, tokens)], each a list of
  pieces kept together; depths: one per needle. Needles keep their relative order where
  depths tie. prefix_tokens: the tokens before the first piece (bos).
  Returns (pieces, starts): starts[j] is needle j's first token (bos counted)."""
  if len(needles) != len(depths):
    raise ValueError('one depth per needle')
  boundaries = np.concatenate([[0], np.cumsum(np.asarray(filler_counts, np.int64))])
  context = prefix_tokens + int(boundaries[-1]) + sum(tokens for _, tokens in needles)
  order = sorted(range(len(needles)), key=lambda j: (depths[j], j))
  at = {}  # filler boundary -> needle indices inserted there, in order
  starts = [0] * len(needles)
  floor, placed = 0, 0
  for j in order:
    tokens = needles[j][1]
    wanted = needle_target(depths[j], context, tokens) - prefix_tokens - placed  # in filler tokens
    k = int(np.searchsorted(boundaries, wanted))
    candidates = [c for c in (k - 1, k) if floor <= c < len(boundaries)] or [max(floor, min(k, len(boundaries) - 1))]
    k = min(candidates, key=lambda c: abs(boundaries[c] - wanted))
    at.setdefault(k, []).append(j)
    starts[j] = prefix_tokens + int(boundaries[k]) + placed
    floor, placed = k, placed + tokens
  pieces = []
  for k in range(len(fillers) + 1):
    for j in at.get(k, ()):
      pieces.extend(needles[j][0])
    if k < len(fillers):
      pieces.append(fillers[k])
  return pieces, starts


def count_pieces(tokenizer, pieces):
  return sum(token_count(tokenizer, piece.text) for piece in pieces)


def too_short(task, length, minimum, what):
  return UserError(f'{task}: length {length} is too short: {what} need {minimum} tokens (bos included); '
                   f'use a length of at least {minimum}')


def haystack_example(task, rng, tokenizer, length, split, needles, depths, turns, *, queried=0,
                     what='the needles, questions and answers'):
  """The Example of `needles` (lists of pieces) at `depths` in book filler, followed by
  `turns` (the pieces after the context: questions and answers). Its depth is where
  needle `queried` starts, as a fraction of the context's tokens. UserError when the
  fixed parts alone exceed `length`."""
  needle_counts = [(pieces, count_pieces(tokenizer, pieces)) for pieces in needles]
  fixed = 1 + sum(count for _, count in needle_counts) + count_pieces(tokenizer, turns)
  if fixed > length:
    raise too_short(task, length, fixed, what)
  fillers, counts = fill_counted(rng, tokenizer, length - fixed, split)
  context, starts = place_needles(fillers, counts, needle_counts, depths)
  context_tokens = fixed - count_pieces(tokenizer, turns) + sum(counts)
  depth = starts[queried] / context_tokens if needles else math.nan
  return Example(task, tuple(context) + tuple(turns), length, depth)
