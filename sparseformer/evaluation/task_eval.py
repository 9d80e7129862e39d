"""Scores a model on the synthetic long-context tasks (evaluation/tasks): exact match of
the greedy answer, RULER's string_match_all, answer log-likelihood, and heat maps.

Teacher forcing is greedy exact match. An answer piece (span of tokens a[0..n)) is what
greedy decoding would reproduce exactly when, and only when, every a[i] is the argmax of
the model's next-token distribution given the true prefix (prompt + a[0..i)): if all of
them are argmaxes, greedy decoding emits a[0], then (its prefix now being the true one)
a[1], and so on; at the first a[i] that is not the argmax, greedy decoding emits another
token there and departs from the answer for good. So ONE forward pass over the whole
example (prompt and answers) scores every answer: the logits at position t - 1 give the
probability of token t and whether it is the argmax; nothing is decoded or recomputed.

Conventions that follow from it:
- Each answer piece is scored given the true text before it, earlier answers included
  (as a multi-turn evaluation that feeds the reference answers back would).
- Exact match is at the token level: greedy output that spells the answer with another
  tokenization counts as a miss (impossible with the byte tokenizer), and what greedy
  decoding would emit after the answer (a stop, more text) is not scored.
- Ties in the argmax go to the lowest token id (jnp.argmax), as a greedy decoder would.

Per answer piece: exact (all its tokens argmax), log-likelihood (sum of its tokens' log
p) and token count. Per example: exact = every piece exact; score = the fraction of pieces
exact (RULER's string_match_all); answer_logprob = the sum over pieces; answer_tokens.

The model is kept apart from the scoring: `score_rows` takes any
`logprob_fn(batch) -> (target_logprob [B, A], is_argmax [B, A])`; `model_logprob_fn`
makes one from a model, unembedding only the queried positions (never [B, T, vocab]).
"""

import json
import math
import os
import re

import numpy as np

from sparseformer.evaluation import task_decode
from sparseformer.evaluation.tasks import base as tasks_base

MIN_ANSWER_SLOTS = 8  # answer slots per row are padded to a power of two >= this (fewer compiles)


# ---------------------------------------------------------------------------------------
# Rows and scoring


def round_up(value, multiple):
  return -(-value // multiple) * multiple


def answer_slots(encoded_examples):
  """A: the padded count of answer tokens per row (a power of two, at least MIN_ANSWER_SLOTS)."""
  most = max([sum(end - start for start, end in e.answer_spans) for e in encoded_examples] + [1])
  return max(MIN_ANSWER_SLOTS, 1 << (most - 1).bit_length())


def make_batch(encoded_examples, row_len, slots, pad_id=0, rows=None):
  """The batch of `encoded_examples` (one per row, then `rows - len` padding rows):
  tokens, positions, segment_ids [rows, row_len] (segment 1 for the example, 0 for
  padding; positions 0..n-1), query_positions, query_targets [rows, slots] (the positions
  whose next token is an answer token, and that token) and query_mask [rows, slots]."""
  rows = len(encoded_examples) if rows is None else rows
  batch = {
      'tokens': np.full((rows, row_len), pad_id, np.int32),
      'positions': np.zeros((rows, row_len), np.int32),
      'segment_ids': np.zeros((rows, row_len), np.int32),
      'query_positions': np.zeros((rows, slots), np.int32),
      'query_targets': np.full((rows, slots), pad_id, np.int32),
      'query_mask': np.zeros((rows, slots), bool),
  }
  for row, example in enumerate(encoded_examples):
    n = len(example.tokens)
    if n > row_len:
      raise ValueError(f'an example of {n} tokens does not fit rows of {row_len}')
    batch['tokens'][row, :n] = example.tokens
    batch['positions'][row, :n] = np.arange(n)
    batch['segment_ids'][row, :n] = 1
    answer_positions = np.concatenate([np.arange(start, end) for start, end in example.answer_spans]
                                      + [np.zeros(0, np.int64)])
    if len(answer_positions) > slots:
      raise ValueError(f'{len(answer_positions)} answer tokens do not fit {slots} slots')
    if len(answer_positions) and answer_positions.min() < 1:
      raise ValueError('an answer token at index 0 has no position to be predicted from')
    count = len(answer_positions)
    batch['query_positions'][row, :count] = answer_positions - 1
    batch['query_targets'][row, :count] = example.tokens[answer_positions]
    batch['query_mask'][row, :count] = True
  return batch


def score_rows(logprob_fn, encoded_examples, row_len, batch_size, pad_id=0):
  """Scores every example (EncodedExample) with `logprob_fn` (see the module docstring),
  `batch_size` rows of `row_len` tokens per call (the last batch filled with padding rows,
  which are not scored). Returns one dict per example, in order: exact, score,
  answer_logprob, answer_tokens, and pieces [{exact, logprob, tokens}]."""
  if batch_size <= 0:
    raise ValueError(f'batch_size={batch_size}: use a positive count')
  results = []
  for first in range(0, len(encoded_examples), batch_size):
    chunk = encoded_examples[first:first + batch_size]
    batch = make_batch(chunk, row_len, answer_slots(chunk), pad_id, rows=batch_size)
    query_mask = batch.pop('query_mask')
    target_logprob, is_argmax = logprob_fn(batch)
    target_logprob = np.asarray(target_logprob, np.float64)
    is_argmax = np.asarray(is_argmax, bool)
    for row, example in enumerate(chunk):
      results.append(score_example(example, target_logprob[row], is_argmax[row], query_mask[row]))
  return results


def score_example(example, target_logprob, is_argmax, query_mask):
  """One example's scores from its row of the logprob_fn output (answer tokens in span
  order occupy the first slots; query_mask marks them)."""
  pieces, slot = [], 0
  for start, end in example.answer_spans:
    count = end - start
    assert query_mask[slot:slot + count].all()
    pieces.append({'exact': bool(is_argmax[slot:slot + count].all()),
                   'logprob': float(target_logprob[slot:slot + count].sum()), 'tokens': int(count)})
    slot += count
  assert not query_mask[slot:].any()
  exact = [p['exact'] for p in pieces]
  return {
      'exact': bool(all(exact)) if pieces else False,
      'score': float(np.mean(exact)) if pieces else 0.0,
      'answer_logprob': float(sum(p['logprob'] for p in pieces)),
      'answer_tokens': int(slot),
      'pieces': pieces,
  }


# ---------------------------------------------------------------------------------------
# The model's logprob_fn


def model_logprob_fn(graphdef, model_arrays, mesh, rules, batch_sharding=None):
  """logprob_fn of a model: one jitted forward pass (`model.hidden`) per batch, traced
  under the activation placement of the mesh; the hidden states at query_positions are
  unembedded (only those: [B, A, vocab]), log_softmax in float32. Batches (host arrays,
  the same on every process) are placed with `batch_sharding` (default: the mesh's batch
  sharding), each process passing its own contiguous share of the rows; the outputs are
  replicated and returned as numpy arrays."""
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from jax.sharding import NamedSharding, PartitionSpec

  from sparseformer import sharding

  if batch_sharding is None:
    batch_sharding = sharding.batch_sharding(mesh, rules)
  batch_axes = tuple(batch_sharding.spec)[0] if len(batch_sharding.spec) else None
  query_sharding = NamedSharding(batch_sharding.mesh, PartitionSpec(batch_axes, None))

  def compute(params, mechanism_state, batch):
    model = nnx.merge(graphdef, params, mechanism_state)
    hidden, _ = model.hidden(batch['tokens'], batch['positions'], batch['segment_ids'], training=False)
    queried = jnp.take_along_axis(hidden, batch['query_positions'][..., None], axis=1)  # [B, A, d]
    logits = model.logits(queried).astype(jnp.float32)  # [B, A, vocab]
    logprobs = jax.nn.log_softmax(logits, axis=-1)
    targets = batch['query_targets']
    target_logprob = jnp.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
    return target_logprob, jnp.argmax(logits, axis=-1) == targets

  replicated = NamedSharding(batch_sharding.mesh, PartitionSpec())
  jitted = jax.jit(sharding.with_activation_placement(compute, mesh, rules), out_shardings=(replicated, replicated))
  process_index, process_count = jax.process_index(), jax.process_count()

  def logprob_fn(batch):
    rows = len(batch['tokens'])
    if rows % process_count:
      raise ValueError(f'{rows} rows do not split over {process_count} processes')
    share = rows // process_count
    local = slice(process_index * share, (process_index + 1) * share)
    device_batch = {}
    for key in ('tokens', 'positions', 'segment_ids', 'query_positions', 'query_targets'):
      value = np.asarray(batch[key], np.int32)
      placement = query_sharding if key.startswith('query_') else batch_sharding
      device_batch[key] = jax.make_array_from_process_local_data(placement, value[local], value.shape)
    target_logprob, is_argmax = jitted(model_arrays['params'], model_arrays['mechanism_state'], device_batch)
    return np.asarray(jax.device_get(target_logprob)), np.asarray(jax.device_get(is_argmax))

  return logprob_fn


# ---------------------------------------------------------------------------------------
# The grid of tasks x lengths x depths


def task_settings(cfg, row_multiple=None):
  """The settings `evaluate_tasks` uses, with the defaults resolved."""
  from sparseformer import config as config_lib
  e = cfg.eval
  lengths = tuple(int(n) for n in e.task_lengths) or (int(cfg.data.seq_len),)
  batch_size = e.task_batch_size or config_lib.eval_settings(cfg)[2]
  return {
      'tasks': list(e.tasks),
      'lengths': list(lengths),
      'depths': [float(d) for d in np.linspace(0.0, 1.0, e.task_depths)],
      'samples': int(e.task_samples),
      'seed': int(e.task_seed),
      'batch_size': int(batch_size),
      'row_multiple': int(row_multiple or cfg.model.attention.block_size),
  }


def row_length(length, row_multiple):
  return round_up(length, row_multiple)


def evaluate_tasks(cfg, logprob_fn, tokenizer, *, row_multiple=None, log=None, decode_fn=None):
  """Scores `eval.task_samples` validation examples of every task spec in `eval.tasks` at
  every length of `eval.task_lengths` (or data.seq_len) and every needle depth of
  linspace(0, 1, eval.task_depths) (one depth column for tasks whose examples have no
  depth). Rows of one length are batched together (all tasks), `row_multiple` (default:
  model.attention.block_size) dividing the row length. Returns the JSON-able results:
  {'settings': ..., 'accuracy_by_length': {'<length>': accuracy over all tasks},
   'tasks': {spec: {'accuracy', 'score', 'depths' (fractions, or [None]),
                    'grid' ([length][depth] accuracy),
                    'lengths': {'<length>': {'examples', 'accuracy', 'score',
                                             'answer_logprob_per_token', 'accuracy_by_depth',
                                             'mean_actual_depth'}}}}}
  With `decode_fn` (task_decode.decoded_exact's `generate`), every answer is also decoded
  and the results gain 'decoded_accuracy' beside 'accuracy' (task_decode.py)."""
  settings = task_settings(cfg, row_multiple)
  if not settings['tasks']:
    raise ValueError('no tasks to evaluate (eval.tasks is empty)')
  log = log or (lambda message: None)
  # cells[(spec, length, depth_index)] = list of per-example results
  cells, depth_columns = {}, {}
  for length in settings['lengths']:
    row_len = row_length(length, settings['row_multiple'])
    keys, encoded = [], []
    for spec in settings['tasks']:
      for depth_index, depth in enumerate(settings['depths']):
        if depth_columns.get(spec) == 'none' and depth_index > 0:
          break
        for index in range(settings['samples']):
          example = tasks_base.make_example(spec, tokenizer, length, seed=settings['seed'], index=index,
                                            depth=depth, split='validation')
          if depth_columns.get(spec) is None:
            depth_columns[spec] = 'none' if math.isnan(example.depth) else 'depths'
          keys.append((spec, length, depth_index, example.depth))
          encoded.append(tasks_base.encode(example, tokenizer))
    log(f'length {length}: {len(encoded)} examples in rows of {row_len} tokens')
    scored = score_rows(logprob_fn, encoded, row_len, settings['batch_size'], tokenizer.pad_id)
    if decode_fn is not None:
      add_decoded(scored, task_decode.decoded_exact(decode_fn, encoded, settings['batch_size']))
    for (spec, length_, depth_index, actual_depth), result in zip(keys, scored):
      cells.setdefault((spec, length_, depth_index), []).append({**result, 'depth': actual_depth})
  return summarize_tasks(settings, cells, depth_columns)


def add_decoded(scored, decoded):
  for result, pieces in zip(scored, decoded, strict=True):
    result['decoded_exact'] = bool(pieces) and all(pieces)


def _mean(values):
  values = list(values)
  return float(np.mean(values)) if values else None


def add_decoded_accuracy(entry, results):
  """entry['decoded_accuracy'] of results that were decoded (eval.task_decode)."""
  if any('decoded_exact' in r for r in results):
    entry['decoded_accuracy'] = _mean(r['decoded_exact'] for r in results)


def summarize_tasks(settings, cells, depth_columns):
  tasks = {}
  for spec in settings['tasks']:
    depthless = depth_columns.get(spec) == 'none'
    depths = [None] if depthless else settings['depths']
    by_length, grid, everything = {}, [], []
    for length in settings['lengths']:
      row, length_results = [], []
      for depth_index in range(len(depths)):
        results = cells.get((spec, length, depth_index), [])
        length_results += results
        row.append(_mean(r['exact'] for r in results))
      tokens = sum(r['answer_tokens'] for r in length_results)
      by_length[str(length)] = {
          'examples': len(length_results),
          'accuracy': _mean(r['exact'] for r in length_results),
          'score': _mean(r['score'] for r in length_results),
          'answer_logprob_per_token': (float(sum(r['answer_logprob'] for r in length_results) / tokens)
                                       if tokens else None),
          'accuracy_by_depth': row,
          'mean_actual_depth': None if depthless else [
              _mean(r['depth'] for r in cells.get((spec, length, i), [])) for i in range(len(depths))],
      }
      add_decoded_accuracy(by_length[str(length)], length_results)
      grid.append(row)
      everything += length_results
    tasks[spec] = {
        'depths': depths,
        'grid': grid,  # [length][depth] accuracy, lengths in the order of settings['lengths']
        'accuracy': _mean(r['exact'] for r in everything),
        'score': _mean(r['score'] for r in everything),
        'lengths': by_length,
    }
    add_decoded_accuracy(tasks[spec], everything)
  accuracy_by_length = {}
  for length in settings['lengths']:
    results = [r for (spec, length_, _), rs in cells.items() if length_ == length for r in rs]
    accuracy_by_length[str(length)] = _mean(r['exact'] for r in results)
  return {'settings': settings, 'tasks': tasks, 'accuracy_by_length': accuracy_by_length}


# ---------------------------------------------------------------------------------------
# Output


def format_table(results):
  """Task x length accuracy, each task's overall accuracy and its score (the fraction of
  answers exact: the meaningful figure for many-answer tasks such as MQAR) as text lines."""
  lengths = results['settings']['lengths']
  width = max([len('task')] + [len(spec) for spec in results['tasks']])
  lines = ['task'.ljust(width) + ''.join(f'{length:>9}' for length in lengths) + '      all    score']

  def cell(value):
    return f'{"-" if value is None else f"{value:.3f}":>9}'
  for spec, task in results['tasks'].items():
    lines.append(spec.ljust(width) + ''.join(cell(task['lengths'][str(n)]['accuracy']) for n in lengths)
                 + cell(task['accuracy']) + cell(task['score']))
    if 'decoded_accuracy' in task:
      lines.append('  decoded'.ljust(width) + ''.join(cell(task['lengths'][str(n)]['decoded_accuracy'])
                                                      for n in lengths) + cell(task['decoded_accuracy']))
  lines.append('all'.ljust(width) + ''.join(cell(results['accuracy_by_length'][str(n)]) for n in lengths))
  return lines


def file_safe(spec):
  """A task spec as a file name part: 'mqar:pairs=64' -> 'mqar_pairs=64'."""
  return re.sub(r'[^A-Za-z0-9_.=-]+', '_', spec)


def write_task_results(results, out_dir, name):
  """Writes NAME.json and NAME_<task>.png (one heat map per task); returns the paths."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, f'{name}.json')
  with open(json_path, 'w') as f:
    json.dump(results, f, indent=2)
  return [json_path] + plot_task_heatmaps(results, out_dir, prefix=name)


def plot_task_heatmaps(results, out_dir, prefix='tasks'):
  """One PNG per task, out_dir/<prefix>_<task>.png: accuracy (0 red .. 1 green, each cell
  annotated) with the length on x and the needle depth (percent) on y; a one-row map for
  tasks without a depth. Returns the paths."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for spec, task in results['tasks'].items():
    grid = np.array([[np.nan if v is None else v for v in row] for row in task['grid']], np.float64).T  # [depth, length]
    depths, lengths = task['depths'], [int(n) for n in task['lengths']]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.1 * len(lengths) + 2), max(1.8, 0.5 * len(depths) + 1.4)))
    image = ax.imshow(np.ma.masked_invalid(grid), cmap='RdYlGn', vmin=0.0, vmax=1.0, aspect='auto')
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel('length (tokens)')
    if depths == [None]:
      ax.set_yticks([0], ['all'])
      ax.set_ylabel('')
    else:
      ax.set_yticks(range(len(depths)), [f'{100 * d:.0f}%' for d in depths])
      ax.set_ylabel('needle depth')
    for (y, x), value in np.ndenumerate(grid):
      ax.text(x, y, '-' if np.isnan(value) else f'{value:.2f}', ha='center', va='center', fontsize=8)
    fig.colorbar(image, ax=ax, label='accuracy')
    overall = task['accuracy']
    ax.set_title(f'{spec}: accuracy {overall:.3f}' if overall is not None else spec)
    fig.tight_layout()
    path = os.path.join(out_dir, f'{prefix}_{file_safe(spec)}.png')
    fig.savefig(path, dpi=100)
    plt.close(fig)
    paths.append(path)
  return paths
