"""What every synthetic task shares: the example, its tokenization, and the registry.

An example is a sequence of text pieces, each with a role: the context (haystack filler
and needles) comes first, then one or more (question, answer) turns. Pieces are encoded
one at a time and their tokens concatenated, so for any tokenizer the token count of an
example is the sum of its pieces' counts, and the token span of every needle and answer
is known exactly. Generators know nothing of models: they only need a tokenizer (to
count tokens) and a numpy random Generator (for determinism).
"""

import dataclasses
import functools
import hashlib
import math

import numpy as np

from sparseformer.errors import UserError, closest_match

ROLES = ('filler', 'needle', 'question', 'answer')


@dataclasses.dataclass(frozen=True)
class Piece:
  text: str
  role: str  # one of ROLES


@dataclasses.dataclass(frozen=True)
class Example:
  """One task instance. `length` is the token budget it was made for: its encoding,
  bos included, never exceeds it. `depth` is where the first needle starts, as a
  fraction of the context's tokens (nan for tasks without a needle depth)."""
  task: str
  pieces: tuple
  length: int
  depth: float = math.nan

  def _text(self, roles):
    return ''.join(p.text for p in self.pieces if p.role in roles)

  @property
  def context(self):
    """The text before the first question."""
    first = next((i for i, p in enumerate(self.pieces) if p.role == 'question'), len(self.pieces))
    return ''.join(p.text for p in self.pieces[:first])

  @property
  def questions(self):
    return tuple(p.text for p in self.pieces if p.role == 'question')

  @property
  def answers(self):
    return tuple(p.text for p in self.pieces if p.role == 'answer')

  @property
  def question(self):
    return self._text(('question',))

  @property
  def answer(self):
    return ' '.join(self.answers)


@dataclasses.dataclass(frozen=True)
class EncodedExample:
  """tokens: int32 [bos] (if the tokenizer has one) + every piece's tokens (no eos). Spans are [start, end) indices
  into tokens: the answer spans are the tokens the model must predict (scored), the
  needle spans where the retrieved information sits. context_tokens: tokens (bos
  included) before the first question."""
  tokens: np.ndarray
  answer_spans: tuple
  needle_spans: tuple
  context_tokens: int


def encode(example, tokenizer):
  lead = [] if tokenizer.bos_id is None else [tokenizer.bos_id]  # no bos for Qwen's tokenizer
  chunks, answer_spans, needle_spans = [np.array(lead, np.int32)], [], []
  position, context_tokens = len(lead), None
  for piece in example.pieces:
    ids = piece_tokens(tokenizer, piece.text)
    if piece.role == 'question' and context_tokens is None:
      context_tokens = position
    span = (position, position + len(ids))
    if piece.role == 'answer':
      answer_spans.append(span)
    elif piece.role == 'needle':
      needle_spans.append(span)
    chunks.append(ids)
    position += len(ids)
  return EncodedExample(np.concatenate(chunks), tuple(answer_spans), tuple(needle_spans),
                        position if context_tokens is None else context_tokens)


SHORT_PIECE = 64  # characters: short pieces (keys, questions, needles) repeat, so their tokens are cached


@functools.lru_cache(maxsize=1 << 16)
def _short_piece_tokens(tokenizer, text):
  tokens = np.asarray(tokenizer.encode(text), np.int32)
  tokens.flags.writeable = False
  return tokens


def piece_tokens(tokenizer, text):
  """The int32 tokens of one piece (read-only for short, cached pieces)."""
  if len(text) <= SHORT_PIECE:
    return _short_piece_tokens(tokenizer, text)
  return np.asarray(tokenizer.encode(text), np.int32)


def token_count(tokenizer, text):
  return len(piece_tokens(tokenizer, text))


# ---------------------------------------------------------------------------------------
# The registry: task specs `name` or `name:key=value,key=value`


_TASKS = {}


def register(name):
  """Decorator of a generator `fn(rng, tokenizer, length, depth, split, **options) -> Example`.
  split ('train' or 'validation') names the shipped books a haystack is cut from, so that
  evaluation examples never reuse training text. Options are keyword arguments with
  defaults (int, float or str); a spec may set them by name."""
  def wrap(fn):
    if name in _TASKS:
      raise ValueError(f'task {name!r} registered twice')
    _TASKS[name] = fn
    return fn
  return wrap


def generator(name):
  """The registered generator of task `name`."""
  return _TASKS[name]


def ensure_registered(name, fn):
  """Registers fn as `name` unless a generator is there: a spawned data worker gets the
  generators of its tasks this way, also those registered outside this package."""
  _TASKS.setdefault(name, fn)


def task_names():
  return tuple(sorted(_TASKS))


def parse_task_spec(spec):
  """'name:key=value,...' -> (name, {key: value}) with ints and floats parsed; UserError
  for an unknown task or option (naming the closest)."""
  import inspect
  name, _, rest = spec.partition(':')
  if name not in _TASKS:
    hint = closest_match(name, _TASKS)
    raise UserError(f'unknown task {name!r}' + (f' (did you mean {hint!r}?)' if hint else '')
                    + f'; known: {", ".join(task_names())}')
  parameters = inspect.signature(_TASKS[name]).parameters
  known = [p for p in parameters if p not in ('rng', 'tokenizer', 'length', 'depth', 'split')]
  options = {}
  for item in filter(None, rest.split(',')):
    key, eq, value = item.partition('=')
    if not eq:
      raise UserError(f'task spec {spec!r}: options are key=value, got {item!r}')
    if key not in known:
      hint = closest_match(key, known)
      raise UserError(f'task spec {spec!r}: {name} has no option {key!r}'
                      + (f' (did you mean {hint!r}?)' if hint else '') + f'; options: {", ".join(known)}')
    options[key] = parse_option(value, type(parameters[key].default))
  return name, options


def parse_option(text, kind):
  try:
    return kind(text) if kind in (int, float) else text
  except ValueError:
    raise UserError(f'task option value {text!r}: expected {kind.__name__}') from None


def example_rng(seed, spec, index):
  """The random Generator of example `index` of task `spec` under `seed`: independent of
  every other example, so examples can be made in any order (resumable data)."""
  spec_key = int.from_bytes(hashlib.sha256(spec.encode('utf-8')).digest()[:8], 'little')
  return np.random.default_rng([seed % 2**63, spec_key, index])


SPLITS = ('train', 'validation')


def make_example(spec, tokenizer, length, *, seed=0, index=0, depth=None, split='train'):
  """Example `index` of task `spec` at `length` tokens. depth in [0, 1] places the
  needle (tasks with one); None draws it at random. split: the books the haystack comes
  from (training rows use 'train', evaluation 'validation')."""
  name, options = parse_task_spec(spec)
  rng = example_rng(seed, spec, index)
  if depth is None:
    depth = float(rng.uniform())
  if not 0.0 <= depth <= 1.0:
    raise UserError(f'needle depth {depth} is outside [0, 1]')
  if split not in SPLITS:
    raise ValueError(f'split {split!r}: use one of {SPLITS}')
  return _TASKS[name](rng, tokenizer, length, depth, split, **options)
