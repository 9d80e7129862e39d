"""The long-context quality experiment of issue 5 in one command: pretrain dense at a
short length on the shipped books, fine-tune three copies of that checkpoint at a long
length (all dense, MASFormer, all window) with the same steps, seed and data order,
evaluate each on the validation books and tabulate NLL overall and by position.

    python benchmarks/long_context_quality.py --out runs/long_quality           # the real run (GPU)
    python benchmarks/long_context_quality.py --out /tmp/lq --quick             # CPU smoke run, < 1 minute

Each phase is the ordinary CLI, called in this process (one Python start, one JAX init):
    python -m sparseformer.cli.prepare_data --name=sparseformer_text/books
    python train.py --config configs/long_pretrain.py --workdir OUT/pretrain ...
    python train.py --config configs/long_finetune.py[:dense|:window] --workdir OUT/<variant> \\
        --config.init_from=OUT/pretrain ...
    python eval.py --workdir OUT/<variant> ...
The exact command lines (with every override) are printed and kept in OUT/results.json.
The fine-tunes rescale RoPE with YaRN from the pretraining length. A workdir that already
holds its final checkpoint is not retrained (train.py resumes), so a rerun only redoes
what is missing.

Writes OUT/results.json and OUT/results.md: validation NLL (nats per byte-token) overall
and per position bucket [0,1), [1,2), [2,4), ..., [L/2, L) of each variant, with the
ratios MASFormer/dense and window/dense, plus wall time and step time of every phase.
"""

import argparse
import json
import os
import sys
import time

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from sparseformer.cli.compare import step_times  # noqa: E402,F401  (books_quality imports it from here)
from sparseformer.cli.eval import eval_command  # noqa: E402
from sparseformer.cli.main import run_command  # noqa: E402
from sparseformer.cli.prepare_data import prepare_data_command  # noqa: E402
from sparseformer.cli.train import train_command  # noqa: E402

DATASET = 'sparseformer_text/books'
PRETRAIN_CONFIG = os.path.join(REPO, 'configs', 'long_pretrain.py')
FINETUNE_CONFIG = os.path.join(REPO, 'configs', 'long_finetune.py')
# (name, preset of long_finetune.py, label in the tables)
VARIANTS = (('dense', ':dense', 'dense'), ('masformer', '', 'MASFormer'), ('window', ':window', 'window'))

# The real run on one H100; see docs/results.md for how it was sized.
FULL = dict(pretrain_len=1024, finetune_len=8192, window=1024, pretrain_steps=600, finetune_steps=200,
            pretrain_batch=32, finetune_batch=8, eval_batches=0, log_every=10)
# A CPU smoke run: a 2-layer model, 128 -> 512 tokens, a 64-token window.
QUICK = dict(pretrain_len=128, finetune_len=512, window=64, pretrain_steps=8, finetune_steps=3,
             pretrain_batch=4, finetune_batch=2, eval_batches=3, log_every=2)
QUICK_MODEL = {'model.d_model': 64, 'model.num_layers': 2, 'model.num_heads': 2, 'model.num_kv_heads': 1,
               'model.attention.block_size': 64}
QUICK_MASFORMER = {'model.attention.alternate_layers': 'every:2'}  # the top layer of 2 dense


def experiment_parser(doc, full, quick):
  """The flags every experiment script shares: --out, --quick, --data_dir, and one integer
  flag per sizing field (its default from `full`, or `quick` with --quick)."""
  parser = argparse.ArgumentParser(description=doc.split('\n\n')[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='folder for the runs, results.json and results.md')
  parser.add_argument('--quick', action='store_true', help='tiny CPU smoke run (defaults from QUICK)')
  parser.add_argument('--data_dir', default='', help='TFDS data dir ($SPARSEFORMER_DATA_DIR or the default cache)')
  for name, value in full.items():
    parser.add_argument(f'--{name}', type=int, default=None, help=f'default {value} ({quick[name]} with --quick)')
  return parser


def parse_sized(parser, argv, full, quick):
  """Parsed arguments with each sizing field not given filled from `full` or `quick`."""
  args = parser.parse_args(argv)
  for name, value in (quick if args.quick else full).items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  return args


def parse_args(argv):
  parser = experiment_parser(__doc__, FULL, QUICK)
  args = parse_sized(parser, argv, FULL, QUICK)
  if args.finetune_len % args.pretrain_len:
    parser.error('--finetune_len must be a multiple of --pretrain_len (the YaRN factor)')
  return args


def shared_overrides(args):
  """Overrides every run of the experiment gets (model fields must match across them)."""
  fields = {'train.log_every': args.log_every, 'train.eval_batches': 1}
  if args.data_dir:
    fields['data.data_dir'] = args.data_dir
  if args.quick:
    fields.update(QUICK_MODEL)
  return fields


def pretrain_overrides(args):
  return {**shared_overrides(args), 'data.seq_len': args.pretrain_len, 'train.steps': args.pretrain_steps,
          'train.global_batch_size': args.pretrain_batch, 'train.warmup_steps': max(1, args.pretrain_steps // 12),
          'checkpoint.every_steps': args.pretrain_steps}


def finetune_overrides(args, variant, pretrain_dir):
  fields = {**shared_overrides(args), 'init_from': pretrain_dir, 'data.seq_len': args.finetune_len,
            'model.rope.original_seq_len': args.pretrain_len,
            'model.rope.factor': float(args.finetune_len // args.pretrain_len),
            'train.steps': args.finetune_steps, 'train.global_batch_size': args.finetune_batch,
            'train.warmup_steps': max(1, args.finetune_steps // 10), 'checkpoint.every_steps': args.finetune_steps,
            # long_finetune.py rematerialises; at this model size the activations of 8 x 8192
            # tokens fit one H100 without it, and steps are faster
            'model.remat': 'none'}
  if variant != 'dense':
    fields['model.attention.kind'] = f'window:{args.window}'
  if variant == 'masformer' and args.quick:
    fields.update(QUICK_MASFORMER)
  return fields


def eval_overrides(args):
  return {'eval.max_batches': args.eval_batches}


def command_line(script, config, workdir, overrides):
  parts = [script] + (['--config', config] if config else []) + ['--workdir', workdir]
  return parts + [f'--config.{key}={value}' for key, value in overrides.items()]


def run_phase(command, argv, label, log):
  """Runs one CLI command in this process; (wall seconds). Exits on failure."""
  shown = ' '.join(os.path.relpath(a, REPO) if a.startswith(REPO) else a for a in argv)
  log(f'\n=== {label}: {shown}')
  start = time.perf_counter()
  code = run_command(command, argv)
  wall = time.perf_counter() - start
  if code:
    raise SystemExit(f'{label} failed (exit code {code}); see the output above')
  log(f'=== {label}: {wall:.1f} s')
  return wall


def train_phase(config, workdir, overrides, label, log):
  argv = command_line('train.py', config, workdir, overrides)
  wall = run_phase(train_command, argv[1:], label, log)
  return {'command': 'python ' + ' '.join(rel(a) for a in argv), 'wall_s': wall, **step_times(workdir)}


def eval_phase(workdir, overrides, label, log):
  argv = command_line('eval.py', '', workdir, overrides)
  wall = run_phase(eval_command, argv[1:], label, log)
  return {'command': 'python ' + ' '.join(rel(a) for a in argv), 'wall_s': wall, **latest_eval(workdir)}


def rel(path):
  return os.path.relpath(path, REPO) if os.path.isabs(path) and path.startswith(REPO) else path


def latest_eval(workdir):
  """The newest eval/*.json of a run (eval.py's output)."""
  folder = os.path.join(workdir, 'eval')
  paths = [os.path.join(folder, n) for n in os.listdir(folder) if n.endswith('.json')]
  with open(max(paths, key=os.path.getmtime)) as f:
    report = json.load(f)
  return {key: report[key] for key in ('nll', 'bits_per_byte', 'tokens', 'seq_len', 'step', 'position_buckets')}


# ---------------------------------------------------------------------------------------
# The tables


def ratio(value, reference):
  return value / reference if value is not None and reference else None


def comparison_rows(results):
  """[(label, {variant: nll}, masformer/dense, window/dense)]: overall first, then buckets."""
  evals = {name: results['variants'][name]['eval'] for name, _, _ in VARIANTS}
  rows = [('overall', {name: evals[name]['nll'] for name in evals})]
  for index, bucket in enumerate(evals['dense']['position_buckets']):
    label = f'[{bucket["start"]}, {bucket["end"]})'
    rows.append((label, {name: evals[name]['position_buckets'][index]['nll'] for name in evals}))
  return [(label, nll, ratio(nll['masformer'], nll['dense']), ratio(nll['window'], nll['dense']))
          for label, nll in rows]


def fmt(value, spec='.4f'):
  return 'n/a' if value is None else format(value, spec)


def markdown_table(results):
  header = '| positions | ' + ' | '.join(label for _, _, label in VARIANTS) + ' | MASFormer/dense | window/dense |'
  lines = [header, '| --- ' * (len(VARIANTS) + 3) + '|']
  for label, nll, masformer_ratio, window_ratio in comparison_rows(results):
    cells = [fmt(nll[name]) for name, _, _ in VARIANTS] + [fmt(masformer_ratio), fmt(window_ratio)]
    lines.append(f'| {label} | ' + ' | '.join(cells) + ' |')
  return '\n'.join(lines)


def phase_table(results):
  lines = ['| phase | wall s | median step s | tokens/s | last train loss |', '| --- | --- | --- | --- | --- |']
  for name, phase in phases(results):
    lines.append(f'| {name} | {phase["wall_s"]:.1f} | {fmt(phase.get("step_time_s"), ".3f")} | '
                 f'{fmt(phase.get("tokens_per_s"), ".0f")} | {fmt(phase.get("final_train_loss"))} |')
  return '\n'.join(lines)


def phases(results):
  yield 'prepare data', results['prepare']
  yield 'pretrain', results['pretrain']
  for name, _, _ in VARIANTS:
    yield f'fine-tune {name}', results['variants'][name]['train']
    yield f'eval {name}', results['variants'][name]['eval']


def report_markdown(results):
  s = results['settings']
  summary = (f'On {results["device"]}: pretrain {s["pretrain_steps"]} steps x {s["pretrain_batch"]} x {s["pretrain_len"]} tokens (dense), '
             f'fine-tune {s["finetune_steps"]} steps x {s["finetune_batch"]} x {s["finetune_len"]} tokens, '
             f'window {s["window"]}; eval on {results["variants"]["dense"]["eval"]["tokens"]} validation tokens. '
             'Validation NLL in nats per byte-token:')
  commands = '\n'.join(phase['command'] for _, phase in phases(results) if 'command' in phase)
  return (f'{summary}\n\n{markdown_table(results)}\n\n{phase_table(results)}\n\n'
          f'Commands:\n\n```\n{commands}\n```\n')


# ---------------------------------------------------------------------------------------


def run_experiment(args, log=print):
  out = args.out
  os.makedirs(out, exist_ok=True)
  results = {'settings': {k: v for k, v in vars(args).items() if k != 'out'}, 'variants': {},
             'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}'}
  log(f'devices: {results["device"]}')
  prepare_argv = ['--name', DATASET] + (['--data_dir', args.data_dir] if args.data_dir else [])
  results['prepare'] = {'command': 'python -m sparseformer.cli.prepare_data ' + ' '.join(prepare_argv),
                        'wall_s': run_phase(prepare_data_command, prepare_argv, 'prepare data', log)}
  pretrain_dir = os.path.join(out, 'pretrain')
  results['pretrain'] = train_phase(PRETRAIN_CONFIG, pretrain_dir, pretrain_overrides(args), 'pretrain', log)
  for name, preset, _ in VARIANTS:
    workdir = os.path.join(out, name)
    train = train_phase(FINETUNE_CONFIG + preset, workdir, finetune_overrides(args, name, pretrain_dir),
                        f'fine-tune {name}', log)
    evaluation = eval_phase(workdir, eval_overrides(args), f'eval {name}', log)
    results['variants'][name] = {'train': train, 'eval': evaluation}
  nll = {name: variant['eval']['nll'] for name, variant in results['variants'].items()}
  results['ratios'] = {'masformer/dense': ratio(nll['masformer'], nll['dense']),
                       'window/dense': ratio(nll['window'], nll['dense'])}
  write_report(out, results, report_markdown(results), log)
  return results


def write_report(out, results, markdown, log):
  """OUT/results.json and OUT/results.md, and the markdown to the log."""
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(markdown)
  log('\n' + markdown)


def main(argv=None):
  run_experiment(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == '__main__':
  main()
