"""python -m sparseformer.cli.compare --config configs/compare/SUITE.py[:PRESET] --workdir DIR
       [--arms a,b,...] [--seeds 0,1,2] [--from-arms EARLIER_DIR]
       [--config.run.a.b=v ...] [--config.param_tolerance=0.05]

Trains every arm of a comparison suite on an equal budget, evaluates each, and writes one
table and one frontier plot:

  DIR/<arm>/          the arm's ordinary workdir (train.py / eval.py / eval_tasks work on it)
  DIR/<arm>.seed<S>/  the same arm trained with run seed S (--seeds), when S is not the run's seed
  DIR/results.json    every figure below, raw
  DIR/results.md      the table
  DIR/frontier.png    quality against attention FLOPs per token, and against step time

Equal footing: every arm starts from the suite's `run` config and may change only
`model.*` fields, so the data, its order (same seed), the steps, batch and optimizer are
the same; parameter counts must stay within `param_tolerance` of the first arm's (they
are reported). Each arm is evaluated on:
  - validation NLL overall and by position (eval.py at data.seq_len),
  - task accuracy by length (eval_tasks with the run's eval.tasks, if any),
  - the measured median train step time without input stalls (after the compiling
    step, from metrics.jsonl: step_time - data_time; both are reported),
  - nominal attention FLOPs per token (each mechanism's `attention_flops`, all layers).
--from-arms EARLIER_DIR starts every arm from the parameters of the arm of the same name
(and seed) in an earlier comparison's workdir, e.g. the same suite at a shorter length
(`mqar.py:2k` before `mqar.py:8k`): progressive-length training, each arm continuing its
own model. An arm missing there is an error before anything trains; one whose parameters
do not fit the earlier arm's is an error when it starts.
An interrupted comparison resumes: a finished arm is not retrained (train.py resumes
from its workdir), and an arm whose results are saved for its last step is not
re-evaluated. --arms picks a subset to run now; the table holds every arm with results.
--seeds trains each arm once per seed (the seed sets the initialisation and the data order,
the same for every arm); the table then gives each score as the mean over the arm's seeds
with results and their standard deviation, and results.json every seed's figures.

A suite file defines get_config(arg) returning a ConfigDict with
  run              a run config (sparseformer.config.base_config's schema)
  arms             ((name, {model.field: value, ...}), ...), the first is the reference
  param_tolerance  the largest allowed relative parameter difference to the first arm
  match_params     True: an arm more than 1% off the first arm's parameter count gets the
                   model.mlp_dim that brings it closest (mechanism parameters such as
                   gates and routers are paid for with MLP width); reported per arm
  score_nll        False: leave out the validation NLL (task-only suites, where the run's
                   dataset is not what the arms learned)
  notes            Markdown shown under the table (where a paper's setting was changed)
and optionally
  base             a run config trained first, once, in DIR/base/ (and scored like an arm):
                   every arm then starts from its parameters (init_from), as converting a
                   dense checkpoint to each mechanism does; new parameters (gates, NSA's
                   compression) start fresh. Needs match_params False (an arm's shapes
                   must fit the base's). --config.base.FIELD=VALUE overrides its fields.
"""

import copy
import json
import os
import re
import sys

import ml_collections

from sparseformer import config as config_lib, renamed_fields
from sparseformer.cli.args import parse_args
from sparseformer.cli.main import configure_jax, run_command
from sparseformer.errors import UserError, closest_match

SUITE_FIELDS = ('run', 'arms', 'param_tolerance', 'match_params', 'score_nll', 'notes')
BASE = 'base'  # the optional suite field, and the workdir and table row of the run it names
ARM_NAME = re.compile(r'^[a-z0-9][a-z0-9_-]*$')


# ---------------------------------------------------------------------------------------
# The suite and its arms


def load_suite(spec, overrides):
  """The suite ConfigDict of `path.py[:preset]` with --config.* overrides applied."""
  suite = config_lib.call_get_config(spec, 'suite')
  path = spec.partition(':')[0]
  check_suite(suite, path)
  sections = ('run', BASE) if BASE in suite else ('run',)
  for key, value in overrides.items():
    if key.split('.')[0] in sections:
      continue
    if key != 'param_tolerance':
      hint = closest_match(key, ['param_tolerance'] + ['run.' + k for k in config_lib.flatten(suite.run)])
      base_hint = ', the base\'s --config.base.FIELD' if BASE in suite else ''
      raise UserError(f'--config.{key}: not a suite field' + (f' (did you mean {hint!r}?)' if hint else '')
                      + '; run fields are --config.run.FIELD' + base_hint)
    suite.param_tolerance = config_lib.parse_value(key, value, float(suite.param_tolerance))
  for section in sections:
    prefix = section + '.'
    section_overrides = {k[len(prefix):]: v for k, v in overrides.items() if k.startswith(prefix)}
    config_lib.apply_overrides(suite[section], section_overrides)
  if BASE in suite:
    config_lib.validate(suite[BASE])
  return suite


def check_suite(suite, origin):
  missing = [f for f in SUITE_FIELDS if f not in suite]
  unknown = [f for f in suite if f not in SUITE_FIELDS + (BASE,)]
  if missing or unknown:
    raise UserError(f'{origin}: a suite has the fields {", ".join(SUITE_FIELDS)}'
                    + (f'; missing {missing}' if missing else '') + (f'; unknown {unknown}' if unknown else ''))
  config_lib.check_schema(suite.run, f'{origin} (run)')
  if BASE in suite:
    config_lib.check_schema(suite[BASE], f'{origin} (base)')
    if suite.match_params:
      raise UserError(f'{origin}: a suite with a base run needs match_params False: every arm starts from the '
                      'base\'s parameters, so its MLP cannot be resized')
  names = [arm[0] for arm in suite.arms]
  if not names:
    raise UserError(f'{origin}: the suite has no arms')
  if BASE in names:
    raise UserError(f'{origin}: {BASE!r} is the base run\'s name; call the arm something else')
  for arm in suite.arms:
    if not (isinstance(arm, (tuple, list)) and len(arm) == 2 and isinstance(arm[1], dict)):
      raise UserError(f'{origin}: arm {arm!r} is not (name, {{field: value}})')
    if not ARM_NAME.match(arm[0]):
      raise UserError(f'{origin}: arm name {arm[0]!r}: use lowercase letters, digits, _ and -')
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    raise UserError(f'{origin}: arm {repeated[0]!r} appears twice')
  if not 0 <= suite.param_tolerance < 1:
    raise UserError(f'{origin}: param_tolerance={suite.param_tolerance}: use a fraction in [0, 1)')


def arm_config(run, name, changes):
  """The run config of one arm: `run` with the arm's model fields set (typed as the schema)."""
  cfg = copy.deepcopy(run)
  fields = config_lib.flatten(cfg)
  for key, value in changes.items():
    key = renamed_fields.renamed(key, f'arm {name}')
    if key not in fields:
      raise UserError(f'arm {name}: ' + config_lib.unknown_key_message(key, 'field').split(': ', 1)[1])
    if not key.startswith('model.'):
      raise UserError(f'arm {name} sets {key}: arms may change only model.* fields, so that every arm trains on '
                      'the same data, steps and optimizer (change the suite\'s run config instead)')
    *parents, leaf = key.split('.')
    node = cfg
    for part in parents:
      node = node[part]
    current = node[leaf]
    if isinstance(current, float) and isinstance(value, int):
      value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
      value = tuple(value)
    if type(value) is not type(current):
      raise UserError(f'arm {name}: {key}={value!r}: expected {type(current).__name__}')
    node[leaf] = value
  try:
    config_lib.validate(cfg)
  except UserError as e:
    raise UserError(f'arm {name}: {e}') from None
  return cfg


def selected_arms(suite, chosen):
  """The arms to run now (--arms), in suite order; 'base' for a suite's base run alone."""
  names = [name for name, _ in suite.arms] + ([BASE] if BASE in suite else [])
  if not chosen:
    return names
  picked = [n for n in chosen.split(',') if n]
  for name in picked:
    if name not in names:
      hint = closest_match(name, names)
      raise UserError(f'--arms: no arm {name!r}' + (f' (did you mean {hint!r}?)' if hint else '')
                      + f'; arms: {", ".join(names)}')
  return picked


# ---------------------------------------------------------------------------------------
# Budget: parameters and attention FLOPs, known before training


def arm_spec(cfg):
  """The arm's ModelSpec (abstract: nothing allocated)."""
  from sparseformer import data, sharding
  from sparseformer.model import resolve_dims
  from sparseformer.training.state import model_spec
  dims = resolve_dims(cfg.model, data.make_tokenizer(cfg.data.tokenizer).vocab_size)
  return model_spec(dims, sharding.make_mesh(cfg.mesh), tuple(cfg.mesh.rules))


def parameter_shapes(cfg):
  """{path: shape} of the arm's parameters, what --from-arms loads from the earlier arm."""
  from sparseformer.training.checkpoint import flatten_paths
  return {path: tuple(leaf.shape) for path, leaf in flatten_paths(arm_spec(cfg).abstract_params.to_pure_dict()).items()}


def arm_budget(cfg):
  """{'params', 'attention_flops_per_token', 'layers'} without allocating the model."""
  from sparseformer.model.attention.base import layer_attention_flops
  spec = arm_spec(cfg)
  dims = spec.dims
  return {'params': int(spec.param_count), 'mlp_dim': int(dims.mlp_dim),
          'attention_flops_per_token': sum(layer_attention_flops(dims, cfg.data.seq_len)),
          'layers': list(dims.layer_mechanisms)}


MATCH_WITHIN = 0.01
MLP_MULTIPLE = 16


def matched_mlp_config(cfg, name, target_params):
  """cfg with model.mlp_dim set so its parameter count is closest to target_params (the
  count is linear in mlp_dim). cfg itself when it is already within MATCH_WITHIN."""
  from sparseformer.model import resolve_dims
  from sparseformer import data
  params = arm_budget(cfg)['params']
  if abs(params / target_params - 1) <= MATCH_WITHIN:
    return cfg
  mlp = resolve_dims(cfg.model, data.make_tokenizer(cfg.data.tokenizer).vocab_size).mlp_dim
  wider = copy.deepcopy(cfg)
  wider.model.mlp_dim = mlp + MLP_MULTIPLE
  per_unit = (arm_budget(wider)['params'] - params) / MLP_MULTIPLE
  best = mlp + round((target_params - params) / per_unit / MLP_MULTIPLE) * MLP_MULTIPLE
  if best < MLP_MULTIPLE:
    raise UserError(f'arm {name}: no model.mlp_dim matches {target_params:,} parameters (it would be {best})')
  matched = copy.deepcopy(cfg)
  matched.model.mlp_dim = int(best)
  return matched


def check_param_budget(budgets, tolerance):
  """UserError when an arm's parameter count is off the first arm's by more than tolerance."""
  names = list(budgets)
  reference = budgets[names[0]]['params']
  for name in names[1:]:
    difference = budgets[name]['params'] / reference - 1
    budgets[name]['params_vs_first'] = difference
    if abs(difference) > tolerance:
      raise UserError(f'arm {name} has {budgets[name]["params"]:,} parameters, {difference:+.1%} against '
                      f'{names[0]} ({reference:,}); the suite allows {tolerance:.0%} (param_tolerance). '
                      'Resize the arm (e.g. model.mlp_dim) or raise the tolerance.')
  budgets[names[0]]['params_vs_first'] = 0.0


# ---------------------------------------------------------------------------------------
# Running one arm


class ArmStopped(Exception):
  """Training stopped before the last step (SIGTERM): the arm's checkpoint is saved."""


def last_checkpoint(arm_dir):
  from sparseformer.training.trainer import finished_steps
  return (finished_steps(os.path.join(arm_dir, 'checkpoints')) or [None])[-1]


def run_arm(name, cfg, workdir, log, score_nll=True):
  """Trains (or resumes) the arm, evaluates it, and returns its saved results; ArmStopped
  when a SIGTERM stopped the training (nothing is evaluated then)."""
  from sparseformer.training.trainer import train
  arm_dir = os.path.join(workdir, name)
  saved = load_arm_results(arm_dir)
  if saved is not None and saved['step'] == cfg.train.steps == last_checkpoint(arm_dir):
    log(f'=== arm {name}: results for step {saved["step"]} are saved, not re-evaluated')
    return saved
  log(f'\n=== arm {name}: training in {arm_dir}')
  train(cfg, arm_dir, log=log)
  step = last_checkpoint(arm_dir)
  if step != cfg.train.steps:
    raise ArmStopped(f'arm {name} stopped at step {step} of {cfg.train.steps}; relaunch the same command to go on')
  results = {'step': step, 'train': step_times(arm_dir),
             'nll': evaluate_nll(arm_dir, cfg, step, log) if score_nll else None, 'tasks': None}
  if cfg.eval.tasks:
    results['tasks'] = evaluate_arm_tasks(arm_dir, step, log)
  with open(os.path.join(arm_dir, 'compare.json'), 'w') as f:
    json.dump(results, f, indent=2)
  return results


def load_arm_results(arm_dir):
  path = os.path.join(arm_dir, 'compare.json')
  return read_json(path) if os.path.isfile(path) else None


def step_times(workdir):
  """Medians over the logged steps after the first (compiling) one: the step time, the
  part of it spent waiting for input (data_time), the step without that wait
  (compute_time, the comparison's time axis), tokens/s; and the last loss."""
  records, last_loss = [], None
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      record = json.loads(line)
      if 'train/step_time' not in record:
        continue
      last_loss = record['train/loss']
      if record['step'] > 1:
        records.append(record)
  median = lambda values: sorted(values)[len(values) // 2] if values else None  # noqa: E731
  data = [r.get('train/data_time', 0.0) for r in records]
  return {'step_time_s': median([r['train/step_time'] for r in records]), 'data_time_s': median(data),
          'compute_time_s': median([r['train/step_time'] - d for r, d in zip(records, data)]),
          'tokens_per_s': median([r['train/tokens_per_second'] for r in records]), 'final_train_loss': last_loss}


def run_cli(command, argv, label):
  code = run_command(command, argv)
  if code:
    raise UserError(f'{label} failed (exit code {code}); see the output above')


def evaluate_nll(arm_dir, cfg, step, log):
  """eval.py on the arm's newest checkpoint, `step`; its JSON (NLL overall and by position)."""
  from sparseformer.cli.eval import evaluate_workdir
  log(f'=== eval.py --workdir {arm_dir}')
  results = evaluate_workdir(['--workdir', arm_dir])
  if results['step'] != step:
    raise UserError(f'eval of {arm_dir} evaluated step {results["step"]}, not its newest step {step}')
  return results


def evaluate_arm_tasks(arm_dir, step, log):
  """eval_tasks on the arm's checkpoint of `step`; its JSON."""
  from sparseformer.cli.eval_tasks import eval_tasks_command
  log(f'=== python -m sparseformer.cli.eval_tasks --workdir {arm_dir}')
  run_cli(eval_tasks_command, ['--workdir', arm_dir], 'eval_tasks')
  return read_json(os.path.join(arm_dir, 'eval', f'tasks_step{step}.json'))


def read_json(path):
  with open(path) as f:
    return json.load(f)


# ---------------------------------------------------------------------------------------
# Seeds: one workdir per (arm, seed)

SEED_SUFFIX = '.seed'  # arm names cannot hold a '.' (ARM_NAME), so these never clash


def parse_seeds(text, run_seed):
  """'--seeds 0,1,2' -> (0, 1, 2); '' -> (the run's seed,)."""
  if not text:
    return (run_seed,)
  parts = [part.strip() for part in str(text).split(',') if part.strip()]
  if not parts or not all(part.isdigit() for part in parts):
    raise UserError(f'--seeds {text}: give seeds as non-negative integers separated by commas, e.g. --seeds 0,1,2')
  return tuple(dict.fromkeys(int(part) for part in parts))


def seed_dir_name(name, seed, run_seed):
  """The arm's own workdir name for the run's seed; <name>.seed<S> for another seed."""
  return name if seed == run_seed else f'{name}{SEED_SUFFIX}{seed}'


def seeded(cfg, seed):
  cfg = copy.deepcopy(cfg)
  cfg.seed = seed
  return cfg


def starting_from(cfg, base_dir):
  """The arm's run config starting from the parameters of the run in base_dir."""
  cfg = copy.deepcopy(cfg)
  cfg.init_from = base_dir
  return cfg


def earlier_arm_dirs(from_arms, names, seeds, run_seed):
  """{(arm, seed): its workdir in the earlier comparison from_arms}; all must hold a checkpoint."""
  dirs = {(name, seed): os.path.abspath(os.path.join(from_arms, seed_dir_name(name, seed, run_seed)))
          for name in names for seed in seeds}
  missing = [os.path.basename(d) for d in dirs.values() if not os.path.isdir(os.path.join(d, 'checkpoints'))]
  if missing:
    raise UserError(f'--from-arms {from_arms}: no trained arm {", ".join(missing)} there (each arm starts from '
                    'the arm of its name and seed in that comparison workdir)')
  return dirs


def seed_runs(workdir, name, run_seed):
  """[{'seed', **saved results}] of every seed of arm `name` with saved results, by seed."""
  prefix = name + SEED_SUFFIX
  runs = []
  for entry in (os.listdir(workdir) if os.path.isdir(workdir) else ()):
    if entry == name:
      seed = run_seed
    elif entry.startswith(prefix) and entry[len(prefix):].isdigit():
      seed = int(entry[len(prefix):])
    else:
      continue
    saved = load_arm_results(os.path.join(workdir, entry))
    if saved is not None:
      runs.append({'seed': seed, **saved})
  return sorted(runs, key=lambda run: run['seed'])


# ---------------------------------------------------------------------------------------


def compare_command(argv):
  flags, overrides = parse_args(argv, allowed=('config', 'workdir', 'arms', 'seeds', 'from-arms'))
  if flags.get('help'):
    print(__doc__)
    return 0
  if 'config' not in flags or 'workdir' not in flags:
    raise UserError('compare needs --config configs/compare/SUITE.py[:PRESET] and --workdir DIR (see --help)')
  suite = load_suite(flags['config'], overrides)
  names = [name for name, _ in suite.arms]
  configs = {name: arm_config(suite.run, name, changes) for name, changes in suite.arms}
  if suite.match_params:
    target = arm_budget(configs[names[0]])['params']
    configs = {name: matched_mlp_config(cfg, name, target) for name, cfg in configs.items()}
  budgets = {name: arm_budget(configs[name]) for name in names}
  if BASE in suite:
    budgets = {BASE: arm_budget(suite[BASE]), **budgets}
  check_param_budget(budgets, suite.param_tolerance)
  to_run = selected_arms(suite, flags.get('arms', ''))
  seeds = parse_seeds(flags.get('seeds', ''), suite.run.seed)
  earlier = None
  if flags.get('from-arms'):
    if BASE in suite:
      raise UserError('--from-arms: this suite has a base run that every arm starts from; use one or the other')
    earlier = earlier_arm_dirs(flags['from-arms'], [n for n in to_run if n != BASE], seeds, suite.run.seed)
  configure_jax()
  from sparseformer import distributed
  distributed.initialize()
  workdir = flags['workdir']
  os.makedirs(workdir, exist_ok=True)
  log = print if distributed.is_main_process() else (lambda *a, **k: None)
  stopped = None
  try:
    if BASE in suite:  # every arm starts from it: trained (or found done) first
      run_arm(BASE, suite[BASE], workdir, log, suite.score_nll)
      base_dir = os.path.abspath(os.path.join(workdir, BASE))
      configs = {name: starting_from(cfg, base_dir) for name, cfg in configs.items()}
    for name in (n for n in to_run if n != BASE):
      for seed in seeds:
        cfg = seeded(configs[name], seed)
        if earlier:
          cfg = starting_from(cfg, earlier[name, seed])
        run_arm(seed_dir_name(name, seed, suite.run.seed), cfg, workdir, log, suite.score_nll)
  except ArmStopped as e:
    stopped = str(e)
  if distributed.is_main_process():
    from sparseformer.cli.compare_report import write_report
    results = collect(suite, configs, budgets, workdir, flags['config'], flags.get('from-arms'))
    paths = write_report(results, workdir)
    log(open(paths['markdown']).read())
    log('wrote ' + ', '.join(paths.values()))
  if stopped:
    log(stopped)
  return 0


def collect(suite, configs, budgets, workdir, suite_spec, from_arms=None):
  """Every arm with saved results, in suite order, with its budget and settings."""
  import jax
  from sparseformer.cli.compare_report import merge_seed_runs
  arms = {}
  rows = ([(BASE, {'base run': 'every arm starts from it'})] if BASE in suite else []) + list(suite.arms)
  for name, changes in rows:
    runs = seed_runs(workdir, name, (suite[BASE] if name == BASE else suite.run).seed)
    if runs:
      arms[name] = {**budgets[name], **merge_seed_runs(runs), 'seed_runs': runs, 'changes': changes}
  run = suite.run
  return {'suite': suite_spec, 'device': f'{jax.device_count()} x {jax.devices()[0].device_kind}',
          'settings': {'seq_len': run.data.seq_len, 'steps': run.train.steps,
                       'global_batch_size': run.train.global_batch_size, 'data': run.data.name,
                       'tasks': list(run.data.tasks), 'task_fraction': run.data.task_fraction,
                       'eval_tasks': list(run.eval.tasks), 'seed': run.seed,
                       'seeds': sorted({r['seed'] for arm in arms.values() for r in arm['seed_runs']}),
                       'param_tolerance': suite.param_tolerance},
          'notes': suite.notes, 'arms': arms, 'run_config': ml_collections.ConfigDict(run).to_dict(),
          'base_config': ml_collections.ConfigDict(suite[BASE]).to_dict() if BASE in suite else None,
          'from_arms': os.path.abspath(from_arms) if from_arms else None}


def main(argv=None):
  sys.exit(run_command(compare_command, argv))


if __name__ == '__main__':
  main()
