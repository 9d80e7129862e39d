"""Token-weighted NLL, perplexity, bits per byte and NLL by position on a data split."""

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np

from sparseformer.training.loss import DEFAULT_LOSS_CHUNK
from sparseformer.training.step import forward


def make_eval_batch_fn(graphdef, seq_len, loss_chunk=DEFAULT_LOSS_CHUNK):
  """Device-side sums for one batch; the host adds them up in float64. loss_chunk:
  positions unembedded at a time (0: all at once), as in training."""

  def eval_batch(params, mechanism_state, batch, token_bytes):
    nll, _, _, _ = forward(graphdef, params, mechanism_state, batch, training=False, loss_chunk=loss_chunk)
    mask = batch['loss_mask']
    positions = jnp.clip(batch['positions'], 0, seq_len - 1)
    return {
        'nll_sum': nll.sum(),
        'tokens': mask.sum(),
        'bytes': (token_bytes[batch['targets']] * mask).sum(),
        'position_nll': jnp.zeros(seq_len, jnp.float32).at[positions].add(nll),
        'position_tokens': jnp.zeros(seq_len, jnp.float32).at[positions].add(mask),
    }
  return jax.jit(eval_batch)


def evaluate(eval_batch_fn, model_arrays, batches, token_bytes, batch_sharding):
  """Runs every batch of an iterable and returns the summary dict (see `summarize`)."""
  token_bytes = jnp.asarray(token_bytes, jnp.float32)
  totals = None
  for batch in batches:
    device_batch = {k: jax.make_array_from_process_local_data(batch_sharding, v) for k, v in batch.items()}
    sums = jax.device_get(eval_batch_fn(model_arrays['params'], model_arrays['mechanism_state'],
                                        device_batch, token_bytes))
    sums = {k: np.asarray(v, np.float64) for k, v in sums.items()}
    totals = sums if totals is None else {k: totals[k] + sums[k] for k in totals}
  if totals is None or totals['tokens'] == 0:
    raise ValueError('the evaluation split produced no tokens')
  return summarize(totals)


def summarize(totals):
  nll = totals['nll_sum'] / totals['tokens']
  nats_per_byte = totals['nll_sum'] / totals['bytes'] if totals['bytes'] else float('nan')
  return {
      'tokens': int(totals['tokens']),
      'bytes': int(totals['bytes']),
      'nll': float(nll),
      'perplexity': float(math.exp(nll)),
      'nats_per_byte': float(nats_per_byte),
      'bits_per_byte': float(nats_per_byte / math.log(2)),
      'position_buckets': position_buckets(totals['position_nll'], totals['position_tokens']),
      'position_nll': [float(s / c) if c else None for s, c in zip(totals['position_nll'], totals['position_tokens'])],
  }


def position_buckets(nll_by_position, tokens_by_position):
  """Mean NLL over positions [0,1), [1,2), [2,4), [4,8), ...: how loss falls with context."""
  buckets, start = [], 0
  length = len(nll_by_position)
  while start < length:
    end = min(max(1, 2 * start), length)
    tokens = float(tokens_by_position[start:end].sum())
    nll = float(nll_by_position[start:end].sum() / tokens) if tokens else None
    buckets.append({'start': start, 'end': end, 'tokens': int(tokens), 'nll': nll})
    start = end
  return buckets


def format_summary(split, results):
  return (f'{split}: nll {results["nll"]:.4f} nats/token, perplexity {results["perplexity"]:.3f}, '
          f'{results["nats_per_byte"]:.4f} nats/byte = {results["bits_per_byte"]:.4f} bits/byte '
          f'({results["tokens"]} tokens)')


def result_name(dataset, split, step, seq_len):
  """`<dataset>_<split>_step<K>_len<N>`, characters other than letters, digits, '.', '_'
  and '-' written as '-' (sparseformer_text/books -> sparseformer_text-books)."""
  return f'{file_safe(dataset)}_{file_safe(split)}_step{step}_len{seq_len}'


def file_safe(text):
  return re.sub(r'[^A-Za-z0-9._-]+', '-', text).strip('-') or '-'


def unused_result_name(out_dir, name, settings, log=print):
  """`name`, or `name-2`, `name-3`, ...: the first whose JSON is absent or holds an
  evaluation with these `settings` (the same evaluation again: its file is replaced).
  An evaluation with other settings, or a file that cannot be read, is never overwritten."""
  candidate, number = name, 1
  while os.path.exists(os.path.join(out_dir, f'{candidate}.json')):
    existing = saved_settings(os.path.join(out_dir, f'{candidate}.json'))
    if existing == settings:
      break
    number += 1
    candidate = f'{name}-{number}'
  if candidate != name:
    differences = setting_differences(saved_settings(os.path.join(out_dir, f'{name}.json')), settings)
    log(f'note: {name}.json holds an evaluation with other settings ({differences}): writing {candidate}.json')
  return candidate


def saved_settings(path):
  """The `settings` a result JSON was written with; None if it has none or cannot be read."""
  try:
    with open(path) as f:
      return json.load(f).get('settings')
  except (OSError, ValueError, AttributeError):
    return None


def setting_differences(old, new, shown=3):
  """'key: old -> new; ...' for the first `shown` differing settings (model fields as model.x)."""
  if old is None:
    return 'written before settings were recorded, or unreadable'
  flat = lambda d: {**{k: v for k, v in d.items() if k != 'model'},  # noqa: E731
                    **{f'model.{k}': v for k, v in (d.get('model') or {}).items()}}
  old, new = flat(old), flat(new)
  keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
  text = '; '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in keys[:shown])
  return text + (f'; and {len(keys) - shown} more' if len(keys) > shown else '')


def write_results(results, out_dir, name):
  """Writes NAME.json and NAME.png (NLL against position in the document)."""
  os.makedirs(out_dir, exist_ok=True)
  json_path = os.path.join(out_dir, f'{name}.json')
  with open(json_path, 'w') as f:
    json.dump(results, f, indent=2)
  png_path = os.path.join(out_dir, f'{name}.png')
  plot_position_nll(results, png_path, title=name)
  return json_path, png_path


def plot_position_nll(results, path, title):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  per_position = [(i + 1, v) for i, v in enumerate(results['position_nll']) if v is not None]
  buckets = [b for b in results['position_buckets'] if b['nll'] is not None]
  fig, ax = plt.subplots(figsize=(7, 4))
  ax.plot(*zip(*per_position), lw=0.8, alpha=0.5, label='per position')
  ax.step([b['end'] for b in buckets], [b['nll'] for b in buckets], where='pre', lw=2, label='bucket mean')
  ax.set_xscale('log')
  ax.set_xlabel('position in its packed segment (tokens of context + 1)')
  ax.set_ylabel('NLL (nats/token)')
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
