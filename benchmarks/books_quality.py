"""Sparse mechanisms against dense and all-local on the shipped books at 8192 tokens (issues 7
and 8): models trained from scratch with the same steps, seed and data order, evaluated on
the validation books, NLL overall and by position.

    python benchmarks/books_quality.py --out runs/books_quality              # the real run (GPU)
    python benchmarks/books_quality.py --out runs/books_quality --variants dense,local,dma
    python benchmarks/books_quality.py --out /tmp/bq --quick                 # CPU smoke run

Variants: each trains a shipped config (the model of configs/long_pretrain.py: 8 layers,
d_model 512, 8 heads, 2 kv heads, byte tokens; the settings of configs/books_8192.py):
  dense       configs/books_8192.py: every layer dense;
  local       configs/routing_books.py:local: every layer window:--window;
  routing     configs/routing_books.py: the paper's mix: at the layers --routing_layers
              names, routing:--clusters with --local_heads local heads (window --window)
              and the other heads routed (shared QK, the causal selection);
              window:--window at the other layers;
  dma         configs/dma_books.py: every layer dynamic_mask:--window: each query attends
              to the --window keys of its past with the largest learned scores, plus the
              learned key bias (issue 7's same keep budget as `local`);
  dma_budget  configs/dma_books.py:budget: the same with block_smooth=budget: whole key
              blocks per query block (docs/dynamic_mask.md);
  sse_h       configs/books_8192.py with the attention of configs/sse_hybrid.py:varlen
              (issue 9): sse:4 (top 2 of 4 state partitions per token beside a shared
              state, varlen mode) in three of every four layers, dense at layers 3 and 7;
              about 6% more parameters than dense;
  gla         configs/books_8192.py with the attention of configs/sse_hybrid.py:gla: plain
              gated linear attention (sse:1, no shared branch, one state per head, no
              routing) at the same layers, the same dense layers 3 and 7.
The script overrides only what its flags size (steps, batch, length, window, clusters,
routing layout, --quick's model), and only where that differs from the config.
Each phase is the ordinary CLI in this process, as in benchmarks/long_context_quality.py
(whose phase runner this script reuses):
    python -m sparseformer.cli.prepare_data --name=sparseformer_text/books
    python train.py --config configs/routing_books.py --workdir OUT/routing ...
    python eval.py --workdir OUT/<variant> ...
A workdir that already holds its final checkpoint is not retrained (train.py resumes),
so `--variants` may split the work over several calls; results.json and results.md
tabulate every variant whose evaluation is in OUT.
"""

import json
import os
import sys

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.long_context_quality import (DATASET, eval_phase, fmt, latest_eval, experiment_parser,  # noqa: E402
                                             parse_sized, ratio, run_phase, step_times, train_phase, write_report)
from sparseformer import config as config_lib  # noqa: E402
from sparseformer.cli.prepare_data import prepare_data_command  # noqa: E402

VARIANTS = ('dense', 'local', 'routing', 'dma', 'dma_budget', 'sse_h', 'gla')
CONFIGS = os.path.join(REPO, 'configs')
# The shipped config each variant trains, and where its attention comes from when that
# config is another's (no books config of SSE ships: sse_hybrid.py's model is smaller).
VARIANT_CONFIGS = {'dense': 'books_8192.py', 'local': 'routing_books.py:local', 'routing': 'routing_books.py',
                   'dma': 'dma_books.py', 'dma_budget': 'dma_books.py:budget', 'sse_h': 'books_8192.py',
                   'gla': 'books_8192.py'}
ATTENTION_FROM = {'sse_h': 'sse_hybrid.py:varlen', 'gla': 'sse_hybrid.py:gla'}
# The size argument of these mechanisms, by flag.
SIZED_KINDS = {'window': 'window', 'dynamic_mask': 'window', 'routing': 'clusters'}
LABELS = {'dense': 'dense', 'local': 'all local', 'routing': 'routing', 'dma': 'DMA', 'dma_budget': 'DMA budget', 'sse_h': 'SSE-H',
          'gla': 'GLA-H (N=1)'}

# Sized for one H100: two or three variants fit in one 10-minute call (each ~2.5 minutes estimated).
FULL = dict(seq_len=8192, window=1024, clusters=16, local_heads=4, steps=400, batch=8, eval_batches=0,
            log_every=10)
FULL_ROUTING_LAYERS = 'every:2'
# A CPU smoke run: 2 layers of d_model 64 (4 heads, 2 kv heads), 256 tokens.
QUICK = dict(seq_len=256, window=64, clusters=4, local_heads=2, steps=3, batch=2, eval_batches=2, log_every=1)
QUICK_MODEL = {'model.d_model': 64, 'model.num_layers': 2, 'model.num_heads': 4, 'model.num_kv_heads': 2,
               'model.attention.block_size': 64}


def parse_args(argv):
  parser = experiment_parser(__doc__, FULL, QUICK)
  parser.add_argument('--variants', default=','.join(VARIANTS), help='a comma-separated subset to train now')
  parser.add_argument('--routing_layers', default=FULL_ROUTING_LAYERS,
                      help='layers with routing heads (model.attention.alternate_layers syntax)')
  args = parse_sized(parser, argv, FULL, QUICK)
  args.variants = [v for v in args.variants.split(',') if v]
  unknown = set(args.variants) - set(VARIANTS)
  if unknown:
    parser.error(f'unknown variants {sorted(unknown)}; known: {", ".join(VARIANTS)}')
  return args


def config_path(variant):
  return os.path.join(CONFIGS, VARIANT_CONFIGS[variant])


def load_config(name):
  return config_lib.load_config_file(os.path.join(CONFIGS, name))


def train_overrides(args, variant):
  """Overrides of the variant's shipped config: the flags' sizes where they differ from it."""
  cfg = load_config(VARIANT_CONFIGS[variant])
  fields = attention_overrides(cfg, ATTENTION_FROM[variant]) if variant in ATTENTION_FROM else {}
  fields.update(run_overrides(args))
  fields.update(mechanism_overrides(cfg, args))
  return {key: value for key, value in fields.items() if value != field_value(cfg, key)}


def train_config(args, variant):
  """The config the variant trains: its shipped config with train_overrides applied."""
  cfg = load_config(VARIANT_CONFIGS[variant])
  overrides = train_overrides(args, variant)
  return config_lib.apply_overrides(cfg, {key: str(value) for key, value in overrides.items()})


def field_value(cfg, key):
  node = cfg
  for part in key.split('.'):
    node = node[part]
  return node


def attention_overrides(cfg, source):
  """{'model.attention.x': value} of the shipped config `source` where it differs from cfg."""
  theirs, ours = config_lib.flatten(load_config(source)), config_lib.flatten(cfg)
  return {key: value for key, value in theirs.items() if key.startswith('model.attention.') and ours[key] != value}


def run_overrides(args):
  """Steps, batch and length of every run (the model of --quick too)."""
  fields = {'data.seq_len': args.seq_len, 'train.steps': args.steps, 'train.global_batch_size': args.batch,
            'train.warmup_steps': max(1, args.steps // 10), 'train.log_every': args.log_every,
            'train.eval_batches': 1, 'checkpoint.every_steps': args.steps}
  if args.data_dir:
    fields['data.data_dir'] = args.data_dir
  if args.quick:
    fields.update(QUICK_MODEL)
  return fields


def mechanism_overrides(cfg, args):
  """--window and --clusters as the size of the config's window, dynamic_mask and routing
  layers; --routing_layers and --local_heads where it has routing layers."""
  a, fields = cfg.model.attention, {}
  for field in ('kind', 'alternate_kind'):
    name = a[field].partition(':')[0]
    if name in SIZED_KINDS:
      fields[f'model.attention.{field}'] = f'{name}:{getattr(args, SIZED_KINDS[name])}'
  if a.alternate_kind.startswith('routing:'):
    fields.update({'model.attention.alternate_layers': args.routing_layers,
                   'model.attention.routing.local_heads': args.local_heads,
                   'model.attention.routing.local_window': args.window})
  return fields


def eval_overrides(args):
  return {'eval.max_batches': args.eval_batches}


def routing_stats(workdir):
  """The last logged routing statistics (commitment losses are in aux_loss)."""
  stats = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      stats.update({key: value for key, value in record.items() if 'routing_' in key})
  return stats


def collected_results(args):
  """{variant: {'train', 'eval'}} of every variant with an evaluation in OUT."""
  found = {}
  for name in VARIANTS:
    workdir = os.path.join(args.out, name)
    if os.path.isdir(os.path.join(workdir, 'eval')):
      found[name] = {'train': step_times(workdir), 'eval': latest_eval(workdir)}
      if name == 'routing':
        found[name]['routing_stats'] = routing_stats(workdir)
  return found


def comparison_rows(variants):
  """[(label, {variant: nll})]: overall first, then the position buckets."""
  names = [n for n in VARIANTS if n in variants]
  evals = {name: variants[name]['eval'] for name in names}
  rows = [('overall', {name: evals[name]['nll'] for name in names})]
  for index, bucket in enumerate(evals[names[0]]['position_buckets']):
    rows.append((f'[{bucket["start"]}, {bucket["end"]})',
                 {name: evals[name]['position_buckets'][index]['nll'] for name in names}))
  return rows


def markdown_table(variants):
  names = [n for n in VARIANTS if n in variants]
  ratios = [n for n in names if n != 'dense'] if 'dense' in names else []
  header = ('| positions | ' + ' | '.join(LABELS[n] for n in names) + ' | '
            + ''.join(f'{LABELS[n]}/dense | ' for n in ratios))
  lines = [header.rstrip(), '| --- ' * (1 + len(names) + len(ratios)) + '|']
  for label, nll in comparison_rows(variants):
    cells = [fmt(nll[n]) for n in names] + [fmt(ratio(nll[n], nll['dense'])) for n in ratios]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  lines += ['', '| variant | median step s | tokens/s | last train loss |', '| --- | --- | --- | --- |']
  for name in names:
    t = variants[name]['train']
    lines.append(f'| {LABELS[name]} | {fmt(t["step_time_s"], ".3f")} | {fmt(t["tokens_per_s"], ".0f")} | '
                 f'{fmt(t["final_train_loss"])} |')
  return '\n'.join(lines)


def report_markdown(results):
  s = results['settings']
  summary = (f'On {results["device"]}: {s["steps"]} steps x {s["batch"]} x {s["seq_len"]} tokens from scratch; '
             f'window {s["window"]} (local; DMA keeps {s["window"]} keys per query); routing:{s["clusters"]} at '
             f'layers {s["routing_layers"]} with {s["local_heads"]} local heads; '
             'validation NLL in nats per byte-token:')
  commands = '\n'.join(results['commands'])
  return f'{summary}\n\n{markdown_table(results["variants"])}\n\nCommands:\n\n```\n{commands}\n```\n'


def run_experiment(args, log=print):
  os.makedirs(args.out, exist_ok=True)
  device = f'{jax.device_count()} x {jax.devices()[0].device_kind}'
  log(f'devices: {device}')
  prepare_argv = ['--name', DATASET] + (['--data_dir', args.data_dir] if args.data_dir else [])
  run_phase(prepare_data_command, prepare_argv, 'prepare data', log)
  commands = ['python -m sparseformer.cli.prepare_data ' + ' '.join(prepare_argv)]
  for name in args.variants:
    workdir = os.path.join(args.out, name)
    phase = train_phase(config_path(name), workdir, train_overrides(args, name), f'train {name}', log)
    commands.append(phase['command'])
    commands.append(eval_phase(workdir, eval_overrides(args), f'eval {name}', log)['command'])
  settings = {k: v for k, v in vars(args).items() if k not in ('out', 'variants')}
  results = {'settings': settings, 'device': device, 'commands': commands, 'variants': collected_results(args)}
  write_report(args.out, results, report_markdown(results), log)
  return results


def main(argv=None):
  run_experiment(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == '__main__':
  main()
