"""RULER's needle-in-a-haystack variants (Hsieh et al. 2024, NVIDIA/RULER
scripts/synthetic.yaml) in book filler:

  niah_single      one needle, asked for.
  niah_multikey    the asked needle among `distractors` needles of other keys.
  niah_multivalue  `values` needles of one key; all values asked for (answers in context order).
  niah_multiquery  `queries` needles of different keys, each asked for in its own turn.

A needle: "One of the special magic numbers for quiet-harbor is: 4718205." The value
(option needle=) is a 7-digit number, a word of WORDS, or a uuid (8-4-4-4-12 lowercase
hex); a key is two distinct words of WORDS joined by '-'. The first needle goes at the
requested depth, the others at random depths; Example.depth is where the first
(queried) needle starts.
"""

from sparseformer.errors import UserError
from sparseformer.evaluation.tasks import haystack
from sparseformer.evaluation.tasks.base import Piece, register

# Common English nouns and adjectives (not taken from the books).
WORDS = tuple('''
able active actor airport album amber ancient angry animal answer apple arctic artist autumn
baker balance bamboo banana basket beach bicycle bitter blanket bold border bottle brave bread
breeze bridge bright broken bronze bucket butter cabin camera candle canyon carbon careful carpet
castle cellar chair cheerful cherry chimney circle clever cloud coastal coffee copper cotton
crimson crystal curious custom daily dancer delta desert diamond distant doctor dolphin dragon
dream eager early eastern elegant empty engine fabric falcon famous farmer fancy feather festive
field fierce forest fossil fragile fresh friendly frozen garden gentle giant ginger glacier glass
golden gravel green guitar hammer harbor harvest hidden hollow honest honey humble island ivory
jacket jungle kettle kind kitchen ladder lantern large lemon library little lively lonely lucky
magnet maple marble meadow melody mighty mirror modern morning mountain narrow needle noble
northern ocean olive orange orchard paper parrot patient pebble pepper pilot planet pleasant
pocket polite purple quiet rabbit radio rapid rocket rough royal rusty saddle salmon sandy
scarlet secret shadow sharp shelter silent silver simple smooth soft spring steady stone storm
strong summer sunny swift table tender thunder tidy timber tiny tower tranquil tulip valley
velvet violet vivid wagon walnut warm whisper wild willow window winter wise wooden yellow young
zebra zesty
'''.split())

TYPES = {'number': 'numbers', 'word': 'words', 'uuid': 'uuids'}


def make_value(rng, needle):
  if needle == 'number':
    return str(int(rng.integers(1_000_000, 10_000_000)))
  if needle == 'word':
    return WORDS[int(rng.integers(len(WORDS)))]
  digits = ''.join('0123456789abcdef'[i] for i in rng.integers(16, size=32))
  return '-'.join(digits[a:b] for a, b in ((0, 8), (8, 12), (12, 16), (16, 20), (20, 32)))


def distinct(rng, count, draw):
  """`count` distinct values of draw(rng)."""
  values = []
  while len(values) < count:
    value = draw(rng)
    if value not in values:
      values.append(value)
  return values


def make_key(rng):
  first, second = rng.choice(len(WORDS), size=2, replace=False)
  return f'{WORDS[first]}-{WORDS[second]}'


def check_options(task, needle, **counts):
  if needle not in TYPES:
    raise UserError(f'{task}: needle={needle!r}: use one of {", ".join(TYPES)}')
  for name, (value, low, high) in counts.items():
    if not low <= value <= high:
      raise UserError(f'{task}: {name}={value}: use {low} to {high}')


def needle_piece(needle, key, value):
  return [Piece(f'One of the special magic {TYPES[needle]} for {key} is: {value}. ', 'needle')]


def question(needle, key):
  kind = TYPES[needle][:-1]
  return Piece(f'\nWhat is the special magic {kind} for {key} mentioned in the provided text? '
               f'The special magic {kind} for {key} is: ', 'question')


def needle_depths(rng, depth, count):
  """The first at depth, the others at random depths."""
  return [depth] + [float(d) for d in rng.uniform(size=count - 1)]


@register('niah_single')
def niah_single(rng, tokenizer, length, depth, split, needle='number'):
  check_options('niah_single', needle)
  key, value = make_key(rng), make_value(rng, needle)
  turns = [question(needle, key), Piece(value, 'answer')]
  return haystack.haystack_example('niah_single', rng, tokenizer, length, split, [needle_piece(needle, key, value)],
                                   [depth], turns, what='the needle, question and answer')


@register('niah_multikey')
def niah_multikey(rng, tokenizer, length, depth, split, needle='number', distractors=3):
  check_options('niah_multikey', needle, distractors=(distractors, 0, 100))
  keys = distinct(rng, 1 + distractors, make_key)
  values = distinct(rng, len(keys), lambda r: make_value(r, needle))
  needles = [needle_piece(needle, k, v) for k, v in zip(keys, values)]
  turns = [question(needle, keys[0]), Piece(values[0], 'answer')]
  return haystack.haystack_example('niah_multikey', rng, tokenizer, length, split, needles,
                                   needle_depths(rng, depth, len(needles)), turns,
                                   what='the needles, question and answer')


@register('niah_multivalue')
def niah_multivalue(rng, tokenizer, length, depth, split, needle='number', values=4):
  check_options('niah_multivalue', needle, values=(values, 1, 100))
  key = make_key(rng)
  found = distinct(rng, values, lambda r: make_value(r, needle))
  depths = needle_depths(rng, depth, values)
  # The answers in context order (needles of equal depth keep their order).
  in_order = [found[j] for j in sorted(range(values), key=lambda j: (depths[j], j))]
  kind = TYPES[needle]
  turns = [Piece(f'\nWhat are all the special magic {kind} for {key} mentioned in the provided text? '
                 f'The special magic {kind} for {key} mentioned in the provided text are: ', 'question')]
  for i, value in enumerate(in_order):
    if i:
      turns.append(Piece(', ', 'question'))
    turns.append(Piece(value, 'answer'))
  return haystack.haystack_example('niah_multivalue', rng, tokenizer, length, split,
                                   [needle_piece(needle, key, v) for v in found], depths, turns,
                                   what='the needles, question and answers')


@register('niah_multiquery')
def niah_multiquery(rng, tokenizer, length, depth, split, needle='number', queries=4):
  check_options('niah_multiquery', needle, queries=(queries, 1, 100))
  keys = distinct(rng, queries, make_key)
  values = distinct(rng, len(keys), lambda r: make_value(r, needle))
  turns = []
  for key, value in zip(keys, values):
    turns += [question(needle, key), Piece(value, 'answer')]
  return haystack.haystack_example('niah_multiquery', rng, tokenizer, length, split,
                                   [needle_piece(needle, k, v) for k, v in zip(keys, values)],
                                   needle_depths(rng, depth, queries), turns,
                                   what='the needles, questions and answers')
