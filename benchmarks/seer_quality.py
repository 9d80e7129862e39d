"""SeerAttention quality in one command (issue 6): a dense checkpoint on the shipped books
at a long length, gates distilled on it, and validation perplexity dense vs gated at
densities 0.5, 0.2 and 0.1.

    python benchmarks/seer_quality.py --out runs/seer_quality                  # the real run (GPU)
    python benchmarks/seer_quality.py --out runs/seer_quality \\
        --dense_workdir runs/long_quality/dense                                # gates on an existing dense run
    python benchmarks/seer_quality.py --out /tmp/sq --quick                    # CPU smoke run

Each phase is the ordinary CLI, called in this process (printed, and kept in results.json):
    python -m sparseformer.cli.prepare_data --name=sparseformer_text/books
    python train.py --config configs/long_pretrain.py --workdir OUT/dense ...   (unless --dense_workdir)
    python eval.py --workdir OUT/dense ...
    python train.py --config configs/seer_distill.py --workdir OUT/gates --config.init_from=DENSE ...
    python eval.py --workdir OUT/gates --config.model.attention.gate.density=D ...   (D = 0.5, 0.2, 0.1)
    python eval.py --workdir OUT/gates --config.model.attention.gate.eval_forward=dense ...
The dense run is pretrained directly at --seq_len (every layer dense, no RoPE scaling);
the distillation copies the model fields of the dense run's config.json, so any dense run
of the books fits. The `gates, dense forward` row evaluates the distilled model through
its dense attention: it matches the dense row up to kernel rounding (the base is frozen
bit-identical; on the GPU the dense run tiles by 128, the gated layers by --block).
A workdir that already holds its final checkpoint is not retrained.

Sizing for one H100 (an estimate from issue 5's measured run in docs/results.md: the same
model trains dense at 8 x 8192 tokens in 0.075 s a step, each training phase compiles for
55-60 s, an evaluation of the whole validation split takes ~16 s): pretraining 1200 steps
(~150 s), distillation 200 steps (~60 s compiling, ~0.1-0.2 s a step: a forward pass plus
the teacher, no backward through the model), five evaluations (~85 s): about 350 s, under
500 s. Not measured yet.

Writes OUT/results.json and OUT/results.md: NLL (nats per byte-token), perplexity and the
ratio to dense of each row, the target verdict (density 0.2 within 3% of dense
perplexity), wall and step times of every phase.
"""

import json
import math
import os
import sys

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from benchmarks.long_context_quality import (eval_phase, experiment_parser, parse_sized, run_phase,  # noqa: E402
                                             train_phase, write_report)
from sparseformer.cli.eval import load_run_config  # noqa: E402
from sparseformer.cli.prepare_data import prepare_data_command  # noqa: E402
from sparseformer.model.attention.gate import topk_blocks_per_row  # noqa: E402

DATASET = 'sparseformer_text/books'
PRETRAIN_CONFIG = os.path.join(REPO, 'configs', 'long_pretrain.py')
DISTILL_CONFIG = os.path.join(REPO, 'configs', 'seer_distill.py')
DENSITIES = (0.5, 0.2, 0.1)
TARGET_DENSITY, TARGET_RATIO = 0.2, 1.03
# Model fields the gated run takes from the dense run, so that init_from fits.
MODEL_FIELDS = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim',
                'tie_embeddings', 'norm_eps', 'rope.theta', 'rope.scaling', 'rope.factor', 'rope.original_seq_len')

FULL = dict(seq_len=8192, pretrain_steps=1200, pretrain_batch=8, distill_steps=200, distill_batch=8, block=64,
            eval_batches=0, log_every=20)
QUICK = dict(seq_len=256, pretrain_steps=6, pretrain_batch=4, distill_steps=4, distill_batch=2, block=64,
             eval_batches=2, log_every=2)
QUICK_MODEL = {'model.d_model': 64, 'model.num_layers': 2, 'model.num_heads': 2, 'model.num_kv_heads': 1}


def parse_args(argv):
  parser = experiment_parser(__doc__, FULL, QUICK)
  parser.add_argument('--dense_workdir', default='', help='an existing dense run to distill (default: pretrain one)')
  return parse_sized(parser, argv, FULL, QUICK)


def data_overrides(args):
  fields = {'train.log_every': args.log_every, 'train.eval_batches': 1}
  if args.data_dir:
    fields['data.data_dir'] = args.data_dir
  return fields


def pretrain_overrides(args):
  fields = {**data_overrides(args), 'data.seq_len': args.seq_len, 'train.steps': args.pretrain_steps,
            'train.global_batch_size': args.pretrain_batch, 'train.warmup_steps': max(1, args.pretrain_steps // 10),
            'checkpoint.every_steps': args.pretrain_steps}
  if args.quick:
    fields.update(QUICK_MODEL)
  return fields


def dense_model_fields(dense_workdir):
  """{'model.x': value} of the dense run, for the fields init_from needs to match."""
  cfg = load_run_config(dense_workdir)
  fields = {}
  for name in MODEL_FIELDS:
    node = cfg.model
    for part in name.split('.'):
      node = node[part]
    fields[f'model.{name}'] = node
  fields['data.tokenizer'] = cfg.data.tokenizer
  return fields


def distill_overrides(args, dense_workdir):
  return {**data_overrides(args), **dense_model_fields(dense_workdir), 'init_from': dense_workdir,
          'data.seq_len': args.seq_len, 'train.steps': args.distill_steps,
          'train.global_batch_size': args.distill_batch, 'train.warmup_steps': max(1, args.distill_steps // 10),
          'checkpoint.every_steps': args.distill_steps, 'model.attention.block_size': args.block}


def eval_overrides(args, **gate):
  # The same batches for every row, whatever batch size each run trained with.
  fields = {'eval.max_batches': args.eval_batches, 'eval.seq_len': args.seq_len, 'eval.batch_size': args.distill_batch}
  fields.update({f'model.attention.gate.{key}': value for key, value in gate.items()})
  return fields


def row(label, density, evaluation, kept):
  return {'label': label, 'density': density, 'kept': kept, 'nll': evaluation['nll'],
          'perplexity': math.exp(evaluation['nll']), 'tokens': evaluation['tokens'], 'command': evaluation['command']}


def kept_fraction(density, seq_len, block):
  """The fraction of the causal blocks the top-k rule keeps on a one-document row: k per
  row, at least the diagonal and the first block, at most the row's blocks."""
  if density is None:
    return 1.0
  n = -(-seq_len // block)
  k = topk_blocks_per_row(density, n)
  kept = sum(min(max(k, 1 if i == 0 else 2), i + 1) for i in range(n))
  return kept / (n * (n + 1) // 2)


def final_gate_stats(workdir):
  """The last logged gate_recall and gate_density of the distillation, averaged over layers."""
  last = None
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if any(key.endswith('/gate_recall') for key in record):
        last = record
  if last is None:
    return {}

  def mean(name):
    values = [value for key, value in last.items() if key.endswith(name)]
    return sum(values) / len(values)
  return {'step': last['step'], 'gate_recall': mean('/gate_recall'), 'gate_density': mean('/gate_density'),
          'train_density': load_run_config(workdir).model.attention.gate.density}


def run_experiment(args, log=print):
  out = args.out
  os.makedirs(out, exist_ok=True)
  results = {'settings': {k: v for k, v in vars(args).items() if k != 'out'},
             'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}', 'phases': {}, 'rows': []}
  log(f'devices: {results["device"]}')
  phases = results['phases']
  prepare_argv = ['--name', DATASET] + (['--data_dir', args.data_dir] if args.data_dir else [])
  phases['prepare data'] = {'command': 'python -m sparseformer.cli.prepare_data ' + ' '.join(prepare_argv),
                            'wall_s': run_phase(prepare_data_command, prepare_argv, 'prepare data', log)}
  dense_dir = args.dense_workdir or os.path.join(out, 'dense')
  if not args.dense_workdir:
    phases['pretrain dense'] = train_phase(PRETRAIN_CONFIG, dense_dir, pretrain_overrides(args), 'pretrain dense', log)
  gates_dir = os.path.join(out, 'gates')
  phases['distill gates'] = train_phase(DISTILL_CONFIG, gates_dir, distill_overrides(args, dense_dir),
                                        'distill gates', log)
  results['distill_stats'] = final_gate_stats(gates_dir)
  evaluations = [('dense', None, dense_dir, eval_overrides(args)),
                 ('gates, dense forward', None, gates_dir, eval_overrides(args, eval_forward='dense'))]
  evaluations += [(f'gates, density {d}', d, gates_dir, eval_overrides(args, eval_forward='sparse', density=d))
                  for d in DENSITIES]
  for label, density, workdir, overrides in evaluations:
    evaluation = eval_phase(workdir, overrides, f'eval {label}', log)
    phases[f'eval {label}'] = evaluation
    results['rows'].append(row(label, density, evaluation, kept_fraction(density, args.seq_len, args.block)))
  add_ratios(results['rows'])
  results['target'] = target_line(results['rows'])
  write_report(out, results, report_markdown(results), log)
  log(json.dumps({'rows': results['rows'], 'target': results['target']}, indent=1))
  return results


def add_ratios(rows):
  dense = next(r['perplexity'] for r in rows if r['label'] == 'dense')
  for r in rows:
    r['vs_dense'] = r['perplexity'] / dense


def target_line(rows):
  at_target = [r for r in rows if r['density'] == TARGET_DENSITY and r['label'].startswith('gates, density')]
  if not at_target:
    return f'target perplexity at density {TARGET_DENSITY} <= {TARGET_RATIO:g} x dense: not measured'
  ratio = at_target[0]['vs_dense']
  verdict = 'met' if ratio <= TARGET_RATIO else 'missed'
  return f'target perplexity at density {TARGET_DENSITY} <= {TARGET_RATIO:g} x dense: {ratio:.4f}x, {verdict}'


def report_markdown(results):
  s = results['settings']
  source = s['dense_workdir'] or (f'pretrained here: {s["pretrain_steps"]} steps x {s["pretrain_batch"]} x '
                                  f'{s["seq_len"]}')
  lines = [f'On {results["device"]}: dense run {source}; gates distilled {s["distill_steps"]} steps x '
           f'{s["distill_batch"]} x {s["seq_len"]} tokens, block {s["block"]}; validation of the books at '
           f'{s["seq_len"]} tokens ({results["rows"][0]["tokens"]} tokens). Density = top-k fraction of the '
           'causal blocks; perplexity per byte-token.', '',
           '| attention | density | kept | NLL | perplexity | vs dense |', '| --- | --- | --- | --- | --- | --- |']
  for r in results['rows']:
    density = '1 (dense)' if r['density'] is None else f'{r["density"]:g}'
    lines.append(f'| {r["label"]} | {density} | {r["kept"]:.3f} | {r["nll"]:.4f} | {r["perplexity"]:.4f} | '
                 f'{r["vs_dense"]:.4f} |')
  lines += ['', 'kept: fraction of the causal blocks the top-k rule keeps on a one-document row (k per row, '
            'the diagonal and the first block always).', '', results['target'], '']
  stats = results.get('distill_stats')
  if stats:
    lines += [f'Distillation at step {stats["step"]}, gate.density {stats["train_density"]:g}: the chosen blocks hold '
              f'{stats["gate_recall"]:.3f} of the teacher\'s block mass on average over layers (chosen fraction of '
              f'the allowed blocks {stats["gate_density"]:.3f}).', '']
  lines += [
            '| phase | wall s | median step s | last train loss |', '| --- | --- | --- | --- |']
  for name, phase in results['phases'].items():
    step = phase.get('step_time_s')
    loss = phase.get('final_train_loss')
    lines.append(f'| {name} | {phase["wall_s"]:.1f} | {"n/a" if step is None else f"{step:.3f}"} | '
                 f'{"n/a" if loss is None else f"{loss:.4f}"} |')
  commands = '\n'.join(phase['command'] for phase in results['phases'].values())
  return '\n'.join(lines) + f'\n\nCommands:\n\n```\n{commands}\n```\n'


def main(argv=None):
  run_experiment(parse_args(sys.argv[1:] if argv is None else argv))


if __name__ == '__main__':
  main()
