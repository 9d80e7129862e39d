"""The synthetic long-context task generators (sparseformer/evaluation/tasks): budget,
determinism, where needles and answers go, options and errors, for every task."""

import collections
import pathlib
import re
import sys
import time

import numpy as np
import pytest

from sparseformer.data import corpora_text
from sparseformer.data.tokenizers import ByteTokenizer
from sparseformer.errors import UserError
from sparseformer.evaluation import tasks
from sparseformer.evaluation.tasks import haystack

ROOT = pathlib.Path(__file__).resolve().parents[1]
BYTES = ByteTokenizer()
# The shipped generators (other test modules may register tasks of their own).
ALL = tuple(name for name in tasks.task_names()
            if tasks.base._TASKS[name].__module__.startswith('sparseformer.evaluation.tasks.'))
DEPTH_TASKS = ('passkey', 'niah_single', 'niah_multikey', 'niah_multivalue', 'niah_multiquery', 'variable_tracking')
# Byte tokens the filler may fall short of the budget by.
SLACK = 64


def test_every_family_registers():
  assert set(ALL) == set(DEPTH_TASKS) | {'common_words', 'mqar'}


def test_package_import_does_not_import_tfds():
  import subprocess
  code = ('import sys\n'
          'from sparseformer.data.tokenizers import ByteTokenizer\n'
          'from sparseformer.evaluation import tasks\n'
          'tasks.make_example("passkey", ByteTokenizer(), 2048)\n'
          'print("tensorflow_datasets" in sys.modules)')
  result = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60, cwd=ROOT)
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == 'False'


def make(spec, length, tokenizer=BYTES, **kwargs):
  example = tasks.make_example(spec, tokenizer, length, **kwargs)
  return example, tasks.encode(example, tokenizer)


def pieces_of(example, role):
  return [p.text for p in example.pieces if p.role == role]


def check_answers_in_context(example):
  """The answers are what the context says they are (per task)."""
  needles, answers = pieces_of(example, 'needle'), example.answers
  task = example.task
  assert answers
  if task == 'passkey':
    assert any(f'The pass key is {answers[0]}.' in n for n in needles)
  elif task.startswith('niah'):
    keys = [re.search(r' for (\S+) mentioned in', q).group(1) for q in example.questions if 'mentioned' in q]
    if task == 'niah_multiquery':
      assert len(keys) == len(answers) == len(needles)
    else:
      keys = keys[:1] * len(answers)
    for key, answer in zip(keys, answers):
      assert sum(n.endswith(f' for {key} is: {answer}. ') for n in needles) == 1, (key, answer)
    if task == 'niah_multivalue':  # all of the key's values, in context order
      assert list(answers) == [n.split(' is: ')[1][:-2] for n in needles]
  elif task == 'variable_tracking':
    value = re.search(r'assigned the value (\d+) in', example.question).group(1)
    chain = [f'VAR {answers[0]} = {value}. '] + [f'VAR {b} = VAR {a}. ' for a, b in zip(answers, answers[1:])]
    positions = [needles.index(statement) for statement in chain]
    assert positions == sorted(positions)
  elif task == 'mqar':
    pairs = dict(n.strip().split(':') for n in needles)
    asked = [q.strip().rstrip(':') for q in example.questions]
    assert len(pairs) == len(needles) and len(asked) == len(answers) and len(set(asked)) == len(asked)
    assert [pairs[k] for k in asked] == list(answers)
  elif task == 'common_words':
    words = [p.text.strip() for p in example.pieces if p.role == 'filler' and not p.text[0].isdigit()][1:]
    counts = collections.Counter(words)
    common = min(counts[a] for a in answers)
    assert all(counts[w] < common for w in counts if w not in answers)
    assert list(answers) == sorted(answers, key=words.index)
  else:
    raise AssertionError(f'no check for {task}')


@pytest.mark.parametrize('length', [1024, 8192])
@pytest.mark.parametrize('task', ALL)
def test_budget_determinism_and_answers(task, length):
  example, encoded = make(task, length, seed=3, index=5, split='validation')
  again = tasks.make_example(task, BYTES, length, seed=3, index=5, split='validation')
  assert again == example
  other = tasks.make_example(task, BYTES, length, seed=3, index=6, split='validation')
  assert other != example and other.answers != example.answers
  # The budget: bos included, never over, and the filler fills it.
  assert example.length == length
  assert length - SLACK <= len(encoded.tokens) <= length
  assert encoded.tokens[0] == BYTES.bos_id and encoded.tokens.dtype == np.int32
  assert BYTES.decode(encoded.tokens) == ''.join(p.text for p in example.pieces)
  # Answers only after the context; needles inside it; spans are the pieces' tokens.
  assert all(p.role in ('filler', 'needle') for p in example.pieces[:next(
      i for i, p in enumerate(example.pieces) if p.role == 'question')])
  assert encoded.context_tokens == 1 + len(example.context.encode('utf-8'))
  assert all(start >= encoded.context_tokens for start, _ in encoded.answer_spans)
  assert all(end <= encoded.context_tokens for _, end in encoded.needle_spans)
  assert [BYTES.decode(encoded.tokens[s:e]) for s, e in encoded.answer_spans] == list(example.answers)
  check_answers_in_context(example)


@pytest.mark.parametrize('split', ['train', 'validation'])
def test_haystack_comes_from_the_split_books(split):
  books = {path.stem: ' '.join(corpora_text.strip_gutenberg(corpora_text.read_text(path)).split())
           for path in corpora_text.book_paths()}
  for index in range(3):
    example = tasks.make_example('passkey', BYTES, 2048, index=index, split=split)
    filler = [p.text.strip() for p in example.pieces if p.role == 'filler']
    assert len(filler) > 5 and all(0 < len(p) <= haystack.MAX_PIECE_CHARS for p in filler)
    sentence = max(filler, key=len)
    homes = [book for book, text in books.items() if sentence in text]
    assert homes and all(corpora_text.book_split(book) == split for book in homes), homes


def queried_needle(example, encoded):
  """(start, tokens) of the needle the first question asks about (None: any needle)."""
  needles = [(p.text, span) for p, span in zip([p for p in example.pieces if p.role == 'needle'],
                                                encoded.needle_spans)]
  first = example.answers[0]
  if example.task == 'variable_tracking':
    match = [span for text, span in needles if text.startswith(f'VAR {first} = ')]
  elif example.task == 'niah_multivalue':
    return None
  else:
    match = [span for text, span in needles if f' is {first}.' in text or f' is: {first}.' in text]
  assert len(match) == 1
  return match[0]


@pytest.mark.parametrize('length', [1024, 8192])
@pytest.mark.parametrize('depth', [0.0, 0.5, 1.0])
@pytest.mark.parametrize('task', DEPTH_TASKS)
def test_needle_depth(task, depth, length):
  example, encoded = make(task, length, index=2, depth=depth, split='validation')
  context = encoded.context_tokens
  piece = max(len(p.text.encode('utf-8')) for p in example.pieces if p.role == 'filler')
  assert piece <= haystack.MAX_PIECE_CHARS
  span = queried_needle(example, encoded)
  candidates = [span] if span else list(encoded.needle_spans)

  def close(span):
    start, end = span
    target = 1 + depth * (context - 1 - (end - start))
    # Within one filler piece of the target, and of depth as a fraction of the context.
    return abs(start - target) <= piece and abs(start / context - depth) <= (piece + end - start) / context

  assert any(close(s) for s in candidates), (candidates, context, piece)
  if span:
    assert example.depth == pytest.approx(span[0] / context)
  if depth == 1.0 and example.task in ('passkey', 'niah_single'):
    assert encoded.needle_spans[0][1] == context  # the needle ends the context
  if depth == 0.0 and example.task in ('passkey', 'niah_single'):
    assert encoded.needle_spans[0][0] == 1  # right after bos


def test_multi_needle_depths_spread():
  example, encoded = make('niah_multikey:distractors=6', 8192, index=1, depth=0.5)
  starts = [s / encoded.context_tokens for s, _ in encoded.needle_spans]
  assert len(starts) == 7 and max(starts) - min(starts) > 0.2
  example, encoded = make('variable_tracking:hops=3,chains=2', 8192, index=1, depth=0.25)
  assert len(encoded.needle_spans) == 8 and len(example.answers) == 4


def test_every_task_makes_a_64k_example():
  """Every task fills a 64k context to within SLACK tokens. (How fast they are made is
  benchmarked, not asserted: timings on a busy CI machine are noise.)"""
  for task in ALL:
    example = tasks.make_example(task, BYTES, 65536, index=1, depth=0.7, split='validation')
    assert 65536 - SLACK <= len(tasks.encode(example, BYTES).tokens) <= 65536, task
  example = tasks.make_example('passkey', BYTES, 65536, index=1, depth=0.7, split='train')
  assert 65536 - SLACK <= len(tasks.encode(example, BYTES).tokens) <= 65536


def test_options():
  example, encoded = make('mqar:pairs=16', 1024, index=0)
  assert len(example.answers) == 16 and len(encoded.needle_spans) == 16
  assert all(re.fullmatch('[a-z]{3}', a) for a in example.answers)
  example, _ = make('mqar:pairs=16,queries=5,vocab=600', 2048, index=0)
  assert len(example.answers) == 5 and all(re.fullmatch('[a-z]{2}', a) for a in example.answers)
  check_answers_in_context(example)
  example, _ = make('niah_single:needle=uuid', 2048)
  assert re.fullmatch('[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}', example.answer)
  example, _ = make('niah_single:needle=word', 2048)
  assert re.fullmatch('[a-z]+', example.answer) and 'magic words' in example.context
  example, _ = make('niah_single', 2048)
  assert re.fullmatch('[1-9][0-9]{6}', example.answer)
  example, _ = make('passkey:digits=9', 2048)
  assert re.fullmatch('[1-9][0-9]{8}', example.answer)
  example, _ = make('niah_multivalue:values=6', 4096)
  assert len(example.answers) == 6
  example, _ = make('niah_multiquery:queries=3', 4096)
  assert len(example.answers) == 3 and len(example.questions) == 3
  example, _ = make('common_words:common=5,freq_common=12,freq_rare=2', 4096)
  counts = collections.Counter(p.text.strip() for p in example.pieces if p.role == 'filler')
  assert len(example.answers) == 5 and all(counts[a] == 12 for a in example.answers)
  assert {counts[w] for w in counts if w not in example.answers and w[0].isalpha() and ' ' not in w} == {2}


@pytest.mark.parametrize('spec,message', [
    ('mqar:pair=16', "no option 'pair' .*did you mean 'pairs'"),
    ('niah_single:neddle=uuid', "did you mean 'needle'"),
    ('niah_single:needle=uuids', 'needle=.uuids.: use one of number, word, uuid'),
    ('passkey:digits=five', 'expected int'),
    ('paskey', "unknown task 'paskey' .did you mean 'passkey'"),
    ('common_words:freq_common=3,freq_rare=3', 'freq_rare < freq_common'),
    ('mqar:queries=65', 'queries=65'),
])
def test_bad_specs_are_user_errors(spec, message):
  with pytest.raises(UserError, match=message):
    tasks.make_example(spec, BYTES, 4096)


@pytest.mark.parametrize('task', ALL + ('mqar:pairs=16', 'common_words:freq_common=20'))
def test_too_short_names_the_minimum(task):
  with pytest.raises(UserError, match=r'too short.*at least (\d+)') as error:
    tasks.make_example(task, BYTES, 40)
  minimum = int(re.search(r'at least (\d+)', str(error.value)).group(1))
  example, encoded = make(task, minimum)  # the minimum is exact
  assert len(encoded.tokens) <= minimum
  check_answers_in_context(example)
  with pytest.raises(UserError, match=f'at least {minimum}'):
    tasks.make_example(task, BYTES, minimum - 1)


def test_code_tokenizer_makes_each_mqar_symbol_one_token():
  """codes:N: a task symbol (a word of code_width(N) letters below N) is one token, the
  rest bytes; decoding gives the text back, and token_bytes counts the symbol's letters."""
  from sparseformer.data.tokenizers import make_tokenizer
  codes = make_tokenizer('codes:676')
  text = 'ab:cd zz:qa abc:de. xy, hello ab\n'
  ids = codes.encode(text)
  assert codes.decode(ids) == text and codes.vocab_size == 259 + 676
  assert int(codes.token_bytes[ids].sum()) == len(text.encode())
  # ab cd zz qa de xy ab; not abc or hello
  assert [int(i) - 259 for i in ids if i >= 259] == [1, 2 * 26 + 3, 675, 16 * 26, 3 * 26 + 4, 23 * 26 + 24, 1]
  example, encoded = make('mqar:pairs=16,vocab=676', 512, tokenizer=codes, index=0)
  check_answers_in_context(example)
  assert len(encoded.tokens) == 512
  for span in encoded.answer_spans:
    assert span[1] - span[0] == 1  # every answer one token
  with pytest.raises(UserError, match='codes:N'):
    make_tokenizer('codes:many')


def test_sentencepiece_tokenizer(tmp_path):
  pytest.importorskip('sentencepiece')
  from sparseformer.data.tokenizers import SentencePieceTokenizer, train_sentencepiece
  text = corpora_text.strip_gutenberg(corpora_text.read_text(corpora_text.BOOKS / 'pg20249.txt'))
  paragraphs = [p for p in text.split('\n\n') if p.strip()][:400]
  started = time.perf_counter()
  model = train_sentencepiece(paragraphs, str(tmp_path / 'spm.model'), vocab_size=400)
  if time.perf_counter() - started > 10:
    pytest.skip('SentencePiece training took more than 10 s')
  tokenizer = SentencePieceTokenizer(model)
  for task in ALL:
    for length in (1024, 4096):
      example = tasks.make_example(task, tokenizer, length, index=1, depth=0.5, split='validation')
      assert example == tasks.make_example(task, tokenizer, length, index=1, depth=0.5, split='validation')
      encoded = tasks.encode(example, tokenizer)
      assert length - SLACK <= len(encoded.tokens) <= length, (task, length, len(encoded.tokens))
      assert all(start >= encoded.context_tokens for start, _ in encoded.answer_spans)
      assert [tokenizer.decode(encoded.tokens[s:e]) for s, e in encoded.answer_spans] == list(example.answers)
      check_answers_in_context(example)
      if task in DEPTH_TASKS and task != 'niah_multivalue':
        start, end = queried_needle(example, encoded)
        piece = max(len(tokenizer.encode(p.text)) for p in example.pieces if p.role == 'filler')
        assert abs(start - (1 + 0.5 * (encoded.context_tokens - 1 - (end - start)))) <= piece


@pytest.mark.parametrize('task', DEPTH_TASKS)
def test_depth_moves_the_same_draw(task):
  """Example i at another depth is the same needles and haystack, moved (docs/tasks.md)."""
  examples = [tasks.make_example(task, BYTES, 4096, seed=1, index=4, depth=d, split='validation')
              for d in (0.0, 0.6, 1.0)]
  assert len({''.join(pieces_of(e, 'filler')) for e in examples}) == 1
  for role in ('needle', 'question', 'answer'):  # multi-needle tasks: another order
    assert len({tuple(sorted(pieces_of(e, role))) for e in examples}) == 1, role
  assert len({e.context for e in examples}) == 3
