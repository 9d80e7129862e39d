"""Multi-query associative recall (Arora, Eyuboglu et al. 2023, "Zoology",
HazyResearch/zoology zoology/data/multiquery_ar.py) rendered as text:

  bos  kfa:mqz dxe:rtb ... (the pairs)  .... dxe:rtb ...... kfa:mqz ..........

`pairs` keys drawn without replacement from symbols 1 .. vocab/2 - 1 and values from
vocab/2 .. vocab - 1 (as Zoology; symbol 0 is unused), each symbol written as a
fixed-width lowercase base-26 code (3 letters for vocab 8192), so any tokenizer works.
The context is the pairs ('key:value', one needle piece each, separated by spaces).
Then `queries` keys (0: every key once), in random order, each a question piece
' key:' and an answer piece 'value'. As in Zoology the query region is cut into slots
of one query's size, the queries take slots drawn without replacement with
probability ~ slot ** (alpha - 1) (a power law: mostly early, some far), and empty slots
are '.' filler, so the example fills `length` (the filler after the last query included).
No depth (nan).
"""

import functools
import math

import numpy as np

from sparseformer.data.tokenizers import code, code_width
from sparseformer.errors import UserError
from sparseformer.evaluation.tasks import haystack
from sparseformer.evaluation.tasks.base import Example, Piece, register

MAX_DOTS = 256  # characters of '.' in one filler piece


@functools.lru_cache(maxsize=8)
def symbol_table(vocab):
  """The code of every symbol i < vocab (tokenizers.code: the codes:N tokenizer's words)."""
  width = code_width(vocab)
  return tuple(code(i, width) for i in range(vocab))


@functools.lru_cache(maxsize=16)
def _dot_costs(tokenizer):
  return tuple([0] + [haystack.token_count(tokenizer, '.' * k) for k in range(1, MAX_DOTS + 1)])


def dot_costs(tokenizer):
  """costs[k]: the tokens of '.' * k, k <= MAX_DOTS."""
  try:
    return _dot_costs(tokenizer)
  except TypeError:  # an unhashable tokenizer
    return _dot_costs.__wrapped__(tokenizer)


@functools.lru_cache(maxsize=16)
def _longest_runs(costs):
  """longest[t]: the longest '.' run costing at most t > 0 tokens (0 if none), t <= max cost."""
  longest = [0] * (max(costs) + 1)
  for k in range(1, len(costs)):
    if costs[k] > 0:
      for t in range(costs[k], len(longest)):
        longest[t] = max(longest[t], k)
  return tuple(longest)


def dots(tokenizer, tokens):
  """Filler pieces of '.' of at most `tokens` tokens in all, as close to it as '.' runs allow."""
  costs = dot_costs(tokenizer)
  longest = _longest_runs(costs)
  pieces, left = [], tokens
  while left > 0:
    k = longest[min(left, len(longest) - 1)]
    if not k:
      break
    pieces.append(Piece('.' * k, 'filler'))
    left -= costs[k]
  return pieces, tokens - left


@register('mqar')
def mqar(rng, tokenizer, length, depth, split, pairs=64, vocab=8192, queries=0, alpha=0.1):
  del depth, split  # no needle depth, no book text
  if vocab < 4 or vocab % 2:
    raise UserError(f'mqar: vocab={vocab}: use an even number of at least 4')
  if not 1 <= pairs <= vocab // 2 - 1:
    raise UserError(f'mqar: pairs={pairs}: use 1 to vocab / 2 - 1 = {vocab // 2 - 1}')
  if not 0 <= queries <= pairs:
    raise UserError(f'mqar: queries={queries}: use 0 (every key) to pairs={pairs}')
  if not alpha > 0:
    raise UserError(f'mqar: alpha={alpha}: use a positive exponent (1 is uniform)')
  width, half = code_width(vocab), vocab // 2
  keys = rng.choice(np.arange(1, half), size=pairs, replace=False)
  values = rng.choice(np.arange(half, vocab), size=pairs, replace=False)
  codes = symbol_table(vocab)
  keys = [codes[k] for k in keys]
  values = [codes[v] for v in values]
  context = [Piece(('' if i == 0 else ' ') + f'{k}:{v}', 'needle') for i, (k, v) in enumerate(zip(keys, values))]
  asked = rng.permutation(pairs)[:queries or pairs]
  turns = [(Piece(f' {keys[i]}:', 'question'), Piece(values[i], 'answer')) for i in asked]
  count = lambda piece: haystack.token_count(tokenizer, piece.text)  # noqa: E731
  turn_tokens = [count(q) + count(a) for q, a in turns]
  fixed = 1 + sum(count(p) for p in context) + sum(turn_tokens)
  if fixed > length:
    raise haystack.too_short('mqar', length, fixed, f'{pairs} pairs and {len(turns)} queries')
  # Zoology's slots: the query region (gaps and queries) in units of one query turn.
  gap_tokens = length - fixed
  slot = max(1, round(sum(turn_tokens) / len(turns)))
  space = len(turns) + gap_tokens // slot
  p = alpha * np.arange(1, space + 1, dtype=np.float64) ** (alpha - 1)
  taken = np.sort(rng.choice(space, size=len(turns), replace=False, p=p / p.sum()))
  pieces, used, previous = list(context), 0, -1
  for position, (question, answer) in zip(taken, turns):
    gap, spent = dots(tokenizer, (int(position) - previous - 1) * slot)
    pieces += gap + [question, answer]
    used, previous = used + spent, int(position)
  tail, _ = dots(tokenizer, gap_tokens - used)
  pieces += tail
  return Example('mqar', tuple(pieces), length, math.nan)
