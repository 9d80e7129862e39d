"""Multi-GPU validation (issue 11) in one command: the ~125M MASFormer of
configs/masformer_125m.py trained on one GPU, data parallel and fully sharded over N GPUs
from the same seed, resumed across meshes, and context-parallel attention at a length
whose single-GPU training run would not fit. docs/benchmarks.md "Multi-GPU validation
(issue 11)" explains each phase, the figures and the tolerances.

    python benchmarks/multi_gpu.py --out runs/multi_gpu               # every visible GPU
    python benchmarks/multi_gpu.py --out /tmp/mg --quick              # CPU smoke run, 4 fake devices
    python benchmarks/multi_gpu.py --out runs/multi_gpu --phases single,fit_1gpu   # one GPU is enough

Phases (each its own process): single (one GPU), dp (mesh data=N), fsdp (data=1 fsdp=N),
resume_fsdp_from_dp and resume_dp_from_fsdp (step --steps/2 of one mesh's checkpoints
continued on the other), cp (a dense and a window layer over --cp_len tokens split over
the N GPUs, against the unsharded kernel and the float32 reference) and fit_1gpu (XLA's
memory figure for the single-GPU train step at --cp_len). Schedule:
  [single | compile dp | compile fsdp] -> dp -> fsdp -> [both resumes | cp | fit_1gpu]
The compile processes fill the compilation cache all phases share (OUT/jax_cache) while
single runs, so dp, fsdp and the resumes start from compiled programs. Every process keeps
NVLink multicast off. Loss tolerance (relative; bf16, float32 in brackets): 1e-3 (1e-5)
over the first 10 steps from a shared state, 5e-2 (1e-4) at every step.

Estimate on 2 H200, from the issue-5 H100 figures (0.083 s per 32768-token step, compiles
60-140 s): prepare and probe ~20 s; single ~170 s (start 15, compile ~80, 200 x ~0.15 s,
eval ~25); dp and fsdp ~50 s each (compiled programs from the cache, ~0.08 s a step);
the last group ~120 s (cp: the sharded dense fwd+bwd at 2^20 tokens ~30 s; fit_1gpu's
compile). About 7 minutes, under the 9 of one device call. Phases do not start past
--budget seconds; results.json and results.md are rewritten after every group, and
--phases reruns a subset into the same OUT (the report covers every phase found there).
"""

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from sparseformer.distributed import host_device_flags  # noqa: E402 (after the path)

CONFIG = os.path.join(REPO, 'configs', 'masformer_125m.py')
DATASET = 'sparseformer_text/books'
MULTICAST_OFF = {'NCCL_NVLS_ENABLE': '0', 'TORCH_SYMM_MEM_DISABLE_MULTICAST': '1', 'NVSHMEM_DISABLE_NVLS': '1'}
PHASES = ('single', 'dp', 'fsdp', 'resume_fsdp_from_dp', 'resume_dp_from_fsdp', 'cp', 'fit_1gpu')
MULTI_DEVICE_PHASES = {'dp', 'fsdp', 'resume_fsdp_from_dp', 'resume_dp_from_fsdp', 'cp'}
RESULT_PREFIX = 'RESULT '

FULL = dict(steps=200, batch=8, seq_len=8192, warmup=5, cp_len=1 << 20, cp_window=1024, cp_check_heads=1,
            cp_ref_queries=4096, budget=540)
# A CPU smoke run: 2 layers of d_model 64 (4 heads of 16), MASFormer's dense layer on top.
QUICK = dict(steps=6, batch=8, seq_len=256, warmup=2, cp_len=1024, cp_window=300, cp_check_heads=2,
             cp_ref_queries=128, budget=900)
QUICK_MODEL = {'model.d_model': 64, 'model.num_layers': 2, 'model.num_heads': 4, 'model.num_kv_heads': 4,
               'model.attention.kind': 'window:64', 'model.attention.alternate_layers': 'every:2',
               'model.attention.block_size': 64}
QUICK_DEVICES = 4


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--out', required=True, help='folder for the runs, logs, results.json and results.md')
  parser.add_argument('--quick', action='store_true', help=f'CPU smoke run on {QUICK_DEVICES} fake devices, tiny model')
  parser.add_argument('--gpus', type=int, default=0, help='devices of the multi-device runs; 0: every visible one')
  parser.add_argument('--phases', default=','.join(PHASES), help='a comma-separated subset to run now')
  parser.add_argument('--data_dir', default='', help='TFDS data dir ($SPARSEFORMER_DATA_DIR or the default cache)')
  for name, value in FULL.items():
    parser.add_argument(f'--{name}', type=int, default=None, help=f'default {value} ({QUICK[name]} with --quick)')
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)  # probe | precompile | cp
  args, rest = parser.parse_known_args(argv)
  if rest and args.child != 'precompile':
    parser.error(f'unrecognized arguments: {" ".join(rest)}')
  args.train_argv = rest  # precompile: the train.py arguments of the run to compile
  for name, value in (QUICK if args.quick else FULL).items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  args.phases = [p for p in args.phases.split(',') if p]
  unknown = set(args.phases) - set(PHASES)
  if unknown:
    parser.error(f'unknown phases {sorted(unknown)}; known: {", ".join(PHASES)}')
  if args.steps < 2 or args.steps % 2:
    parser.error('--steps must be even and at least 2 (the resumes start at --steps/2)')
  return args


# ---------------------------------------------------------------------------------------
# Children: run inside a phase's process


def probe_main(args):
  """How many devices this process sees, their kind and the compute dtype a config gets here."""
  import jax
  from sparseformer.config import base_config
  from sparseformer.model import resolve_dims
  dims = resolve_dims(base_config().model, 259)
  return {'count': jax.device_count(), 'kind': jax.devices()[0].device_kind, 'platform': jax.default_backend(),
          'dtype': str(dims.dtype), 'jax': jax.__version__}


def precompile_main(args):
  """Compiles what a train.py command line compiles (the state's creation, the train step,
  the evaluation) into the compilation cache, with no data and no arrays."""
  import jax
  from sparseformer import config as config_lib, sharding
  from sparseformer.cli.args import parse_args as parse_train_args
  from sparseformer.cli.main import configure_jax
  from sparseformer.data import make_tokenizer
  from sparseformer.evaluation.evaluate import make_eval_batch_fn
  from sparseformer.training.assembly import abstract_batch, build_train_step, compile_train_step
  from sparseformer.training.state import train_state_factory
  flags, overrides = parse_train_args(args.train_argv)
  cfg = config_lib.load_config_file(flags['config'])
  config_lib.apply_overrides(cfg, overrides)
  config_lib.validate(cfg)
  configure_jax()
  start = time.perf_counter()
  parts = build_train_step(cfg, sharding.make_mesh(cfg.mesh))
  spec = parts.spec
  jax.jit(train_state_factory(spec, parts.tx, cfg.seed), out_shardings=parts.state_shardings).lower().compile()
  compile_train_step(parts, cfg.seed)
  state = parts.abstract_state(cfg.seed)
  token_bytes = jax.ShapeDtypeStruct((len(make_tokenizer(cfg.data.tokenizer).token_bytes),), 'float32')
  with sharding.placing_activations(spec.mesh, spec.rules):  # as the trainer's evaluation traces it
    make_eval_batch_fn(spec.graphdef, cfg.data.seq_len, cfg.train.loss_chunk).lower(
        state['params'], state['mechanism_state'], abstract_batch(parts), token_bytes).compile()
  return {'compile_s': time.perf_counter() - start}


def cp_main(args):
  from sparseformer import config as config_lib
  from sparseformer.model import resolve_dims
  overrides = {k: str(v) for k, v in model_overrides(args).items()}
  cfg = config_lib.apply_overrides(config_lib.load_config_file(CONFIG), overrides)
  dims = resolve_dims(cfg.model, 259)
  from benchmarks.multi_gpu_cp import check_context_parallel
  return {'layers': [check_context_parallel(args, dims, spec) for spec in ('dense', f'window:{args.cp_window}')]}


def child_main(args):
  run = {'probe': probe_main, 'precompile': precompile_main, 'cp': cp_main}[args.child]
  print(RESULT_PREFIX + json.dumps(run(args)), flush=True)
  return 0


# ---------------------------------------------------------------------------------------
# Phase commands and their environments


def model_overrides(args):
  return dict(QUICK_MODEL) if args.quick else {}


def train_overrides(args, mesh):
  """Overrides of configs/masformer_125m.py shared by every training run, plus the mesh."""
  fields = {'seed': 0, 'data.seq_len': args.seq_len, 'train.steps': args.steps,
            'train.global_batch_size': args.batch, 'train.warmup_steps': max(1, args.steps // 10),
            'train.log_every': 1, 'train.eval_batches': 1, 'checkpoint.every_steps': args.steps // 2,
            'checkpoint.keep': 3, **model_overrides(args)}
  if args.data_dir:
    fields['data.data_dir'] = args.data_dir
  fields.update({f'mesh.{axis}': size for axis, size in mesh.items()})
  return fields


def device_count_problem(args, visible):
  """Why --gpus cannot serve the wanted phases on `visible` devices, or None. Only
  `single` and `fit_1gpu` may run on one device (a check on a one-GPU machine)."""
  least = 2 if set(args.phases) & MULTI_DEVICE_PHASES else 1
  if not least <= args.gpus <= visible:
    phases = ','.join(args.phases)
    return f'--gpus={args.gpus}: the phases {phases} need {least} to {visible} devices ({visible} visible)'
  if args.batch % args.gpus:
    return f'--batch={args.batch} does not split over {args.gpus} devices'
  return None


def meshes(devices):
  return {'single': {'data': 1, 'fsdp': 1}, 'dp': {'data': devices, 'fsdp': 1}, 'fsdp': {'data': 1, 'fsdp': devices}}


def train_argv(args, workdir, mesh):
  overrides = train_overrides(args, mesh)
  return ['--config', CONFIG, '--workdir', workdir] + [f'--config.{k}={v}' for k, v in overrides.items()]


def base_env():
  """This environment with multicast off and the repository first on the import path
  (the GPU machine's prelude puts its extra packages on PYTHONPATH too)."""
  return {**os.environ, **MULTICAST_OFF,
          'PYTHONPATH': os.pathsep.join(filter(None, [REPO, os.environ.get('PYTHONPATH')]))}


def phase_env(args, device_count, *, shares_devices, first=0):
  """The environment of a phase's process: `device_count` devices (GPUs from index `first`
  of the visible ones, or fake CPU devices with --quick), multicast off, one compilation
  cache, one process."""
  env = {**base_env(), 'PYTHONUNBUFFERED': '1', 'SPARSEFORMER_DISTRIBUTED': 'off',
         'SPARSEFORMER_COMPILATION_CACHE': os.environ.get('SPARSEFORMER_COMPILATION_CACHE',
                                                          os.path.join(os.path.abspath(args.out), 'jax_cache'))}
  if args.quick:
    env['XLA_FLAGS'] = host_device_flags(device_count, env.get('XLA_FLAGS', ''))
    env['JAX_PLATFORMS'] = 'cpu'
  else:
    env['CUDA_VISIBLE_DEVICES'] = ','.join(args.visible_gpus[first:first + device_count])
  if shares_devices:  # several processes on one GPU: allocate on demand, not 75% up front
    env['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'
  return env


def own_command(args, child, extra=()):
  argv = [sys.executable, os.path.abspath(__file__), '--out', args.out, '--child', child]
  if args.quick:
    argv.append('--quick')
  return argv + [f'--{name}={getattr(args, name)}' for name in FULL] + list(extra)


class Phase:
  """One process of a phase, its output in OUT/logs/<name>.log."""

  def __init__(self, name, argv, env, out):
    self.name, self.argv = name, argv
    self.log_path = os.path.join(out, 'logs', f'{name}.log')
    os.makedirs(os.path.dirname(self.log_path), exist_ok=True)
    self.started = time.perf_counter()
    with open(self.log_path, 'w') as log:
      log.write(' '.join(argv) + '\n\n')
      log.flush()
      self.process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                      start_new_session=True)
    self.returncode = None
    self.wall_s = None

  def wait(self, deadline):
    """Waits until it ends or `deadline` (perf_counter) passes; then stops it."""
    try:
      self.returncode = self.process.wait(timeout=max(1.0, deadline - time.perf_counter()))
    except subprocess.TimeoutExpired:
      os.killpg(self.process.pid, signal.SIGKILL)
      self.process.wait()
      self.returncode = 'timeout'
    self.wall_s = time.perf_counter() - self.started
    return self

  def output(self):
    with open(self.log_path, errors='replace') as log:
      return log.read()

  @staticmethod
  def result_in(log_path):
    """The RESULT line's dict in the log of a child of this script, or None."""
    if not os.path.exists(log_path):
      return None
    with open(log_path, errors='replace') as log:
      lines = log.read().splitlines()
    return next((json.loads(line[len(RESULT_PREFIX):]) for line in reversed(lines) if line.startswith(RESULT_PREFIX)),
                None)

  def summary(self):
    tail = self.output().strip().splitlines()[-1:] if self.returncode != 0 else []
    return {'command': rel_command(self.argv), 'returncode': self.returncode, 'wall_s': self.wall_s,
            'log': os.path.relpath(self.log_path, REPO) if self.log_path.startswith(REPO) else self.log_path,
            **({'error': tail[0][-300:]} if tail else {})}


def rel_command(argv):
  return ' '.join('python' if a == sys.executable else os.path.relpath(a, REPO) if a.startswith(REPO + os.sep) else a
                  for a in argv)


def run_group(phases, deadline, log):
  """Waits for every phase of a group (started together); {name: summary}."""
  for phase in phases:
    phase.wait(deadline)
    log(f'  {phase.name}: exit {phase.returncode} after {phase.wall_s:.1f} s ({phase.log_path})')
  return {phase.name: phase.summary() for phase in phases}


# ---------------------------------------------------------------------------------------
# The report: read from OUT, so a rerun of some phases reports them all

# Relative loss difference allowed (over the first EARLY_STEPS compared steps, at every step)
LOSS_TOLERANCE = {'bfloat16': (1e-3, 5e-2), 'float32': (1e-5, 1e-4)}
EARLY_STEPS = 10
TIMED_RUNS = ('single', 'dp', 'fsdp')
RESUMES = (('resume_fsdp_from_dp', 'dp'), ('resume_dp_from_fsdp', 'fsdp'))


def train_records(workdir):
  """{step: metrics} of the training lines of a run's metrics.jsonl ({} if none)."""
  path = os.path.join(workdir, 'metrics.jsonl')
  with open(path) if os.path.exists(path) else open(os.devnull) as f:
    return {r['step']: r for r in map(json.loads, filter(str.strip, f)) if 'train/loss' in r}


def run_summary(records, args, devices):
  """Losses by step and the throughput of one training run."""
  times = sorted(r['train/step_time'] for step, r in records.items() if step > args.warmup)
  median = times[len(times) // 2] if times else None
  tokens_per_s = args.batch * args.seq_len / median if median else None
  return {'devices': devices, 'losses': {str(step): r['train/loss'] for step, r in sorted(records.items())},
          'first_step_s': records[min(records)]['train/step_time'], 'step_time_s': median,
          'tokens_per_s': tokens_per_s, 'tokens_per_s_per_device': tokens_per_s and tokens_per_s / devices}


def loss_check(runs, name, reference, early, limits):
  """Relative loss differences of `name` against `reference` over the steps both logged;
  `early`: the first EARLY_STEPS of them start from the same state (a run's start, or the
  step after a resume against the run that wrote the checkpoint)."""
  got, want = runs[name]['losses'], runs[reference]['losses']
  steps = sorted(int(s) for s in got if s in want)
  if not steps:
    return None
  diffs = {s: abs(got[str(s)] - want[str(s)]) / abs(want[str(s)]) for s in steps}
  worst = max(diffs, key=diffs.get)
  early_limit, every_limit = limits
  first = steps[:EARLY_STEPS]
  early_diff = max(diffs[s] for s in first) if early else None
  return dict(run=name, against=reference, steps=f'{steps[0]}-{steps[-1]}',
              early_steps=f'{first[0]}-{first[-1]}' if early else None, early_diff=early_diff, early_limit=early_limit,
              max_diff=diffs[worst], max_at=worst, mean_diff=sum(diffs.values()) / len(diffs), every_limit=every_limit,
              passed=diffs[worst] <= every_limit and (early_diff is None or early_diff <= early_limit))


def parse_fit(phase_summary, log_text):
  """XLA's per-device memory figures from the fit command's output, or its error."""
  figures = {}
  for line in log_text.splitlines():
    parts = line.split()
    if len(parts) >= 3 and parts[2] == 'GiB' and parts[0] in ('arguments', 'temporaries', 'total'):
      figures[parts[0] + '_gib'] = float(parts[1])
  if not figures:
    figures['error'] = phase_summary.get('error') or 'no memory figures in its output'
  return figures


def collect(args, device, phases, runs_dir, logs_dir):
  dtype = device.get('dtype', 'bfloat16')
  limits = LOSS_TOLERANCE.get(dtype, LOSS_TOLERANCE['bfloat16'])
  devices = {'single': 1}
  runs = {}
  for name in TIMED_RUNS + tuple(r for r, _ in RESUMES):
    records = train_records(os.path.join(runs_dir, name))
    if records and phases.get(name, {}).get('returncode', 0) == 0:
      runs[name] = run_summary(records, args, devices.get(name, args.gpus))
  single = runs.get('single', {}).get('tokens_per_s')
  for run in runs.values():
    run['scaling_efficiency'] = run['tokens_per_s_per_device'] / single if single and run['tokens_per_s'] else None
  wanted = [(name, 'single', True) for name in ('dp', 'fsdp')]
  for name, source in RESUMES:
    wanted += [(name, source, True), (name, 'single', False)]
  checks = [loss_check(runs, *case, limits) for case in wanted if case[0] in runs and case[1] in runs]
  results = {'settings': {k: v for k, v in vars(args).items() if k not in ('child', 'train_argv')},
             'device': device, 'dtype': dtype,
             'loss_tolerance': {f'first_{EARLY_STEPS}_steps': limits[0], 'every_step': limits[1]},
             'phases': phases, 'runs': runs, 'loss_checks': [c for c in checks if c]}
  cp = phases.get('cp')
  if cp:
    found = Phase.result_in(os.path.join(logs_dir, 'cp.log'))
    results['cp'] = found['layers'] if found else {'error': cp.get('error', 'no result')}
  if 'fit_1gpu' in phases:
    with open(os.path.join(logs_dir, 'fit_1gpu.log'), errors='replace') as f:
      results['fit_1gpu'] = {'length': args.cp_len, **parse_fit(phases['fit_1gpu'], f.read())}
  failed = [name for name, p in phases.items() if p['returncode'] != 0]
  cp_ok = all(row['passed'] for row in results['cp']) if isinstance(results.get('cp'), list) else 'cp' not in phases
  results['failed_phases'] = failed
  # the compile processes only save time and fit_1gpu only documents memory: neither decides
  decisive = [name for name in failed if name in PHASES and name != 'fit_1gpu']
  results['passed'] = not decisive and cp_ok and all(c['passed'] for c in results['loss_checks'])
  return results


def fmt(value, spec='.3g'):
  return '-' if value is None else format(value, spec)


def throughput_table(results):
  lines = ['| run | devices | median step s | tokens/s | tokens/s per device | scaling efficiency | first step s |',
           '| --- | --- | --- | --- | --- | --- | --- |']
  for name in TIMED_RUNS:
    run = results['runs'].get(name)
    if run:
      cells = [fmt(run['step_time_s'], '.4f'), fmt(run['tokens_per_s'], ',.0f'),
               fmt(run['tokens_per_s_per_device'], ',.0f'), fmt(run['scaling_efficiency'], '.3f'),
               fmt(run['first_step_s'], '.1f')]
      lines.append(f'| {name} | {run["devices"]} | ' + ' | '.join(cells) + ' |')
  return lines


def loss_tables(results, steps):
  lines = [f'| run | against | steps | max rel. diff, first {EARLY_STEPS} (limit) | max rel. diff (limit), at step '
           '| mean rel. diff | |', '| --- | --- | --- | --- | --- | --- | --- |']
  for c in results['loss_checks']:
    early = f'{c["early_diff"]:.2e} ({c["early_limit"]:g})' if c['early_diff'] is not None else '-'
    every = f'{c["max_diff"]:.2e} ({c["every_limit"]:g}), {c["max_at"]}'
    lines.append(f'| {c["run"]} | {c["against"]} | {c["steps"]} | {early} | {every} | {c["mean_diff"]:.2e} | '
                 f'{"pass" if c["passed"] else "FAIL"} |')
  names = list(results['runs'])
  shown = sorted({1, 2, steps // 4, steps // 2, steps // 2 + 1, 3 * steps // 4, steps} - {0})
  lines += ['', '| step | ' + ' | '.join(names) + ' |', '| --- ' * (len(names) + 1) + '|']
  for step in shown:
    losses = [fmt(results['runs'][n]['losses'].get(str(step)), '.5f') for n in names]
    lines.append(f'| {step} | ' + ' | '.join(losses) + ' |')
  return lines


def cp_table(rows):
  if not isinstance(rows, list):
    return [f'context parallelism: FAILED ({rows["error"]})']
  lines = ['| layer | tokens | devices | vs unsharded kernel y / dq / dk / dv (limit) '
           '| vs f32 reference y / dq (limit) | sharded fwd+bwd s | |', '| --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    kernel = ' / '.join(f'{e:.1e}' for e in r['vs_kernel'].values())
    reference = ' / '.join(f'{e:.1e}' for e in r['vs_reference'].values())
    lines.append(f'| {r["layer"]} | {r["length"]:,} | {r["devices"]} | {kernel} ({r["kernel_limit"]:g}) | {reference} '
                 f'({r["reference_limit"]:g}) | {r["sharded_s"]:.2f} | {"pass" if r["passed"] else "FAIL"} |')
  return lines


def markdown(results):
  s, device = results['settings'], results['device']
  lines = [f'Multi-GPU validation on {s["gpus"]} x {device.get("kind", "?")} ({results["dtype"]} compute, jax '
           f'{device.get("jax", "?")}): configs/masformer_125m.py, {s["steps"]} steps of {s["batch"]} x {s["seq_len"]} '
           f'tokens, seed 0; step time the median after {s["warmup"]} steps.', ''] + throughput_table(results)
  lines += [''] + loss_tables(results, s['steps'])
  if 'cp' in results:
    lines += ['', f'Context parallelism (mesh sequence={s["gpus"]}; heads checked: {s["cp_check_heads"]}, '
              f'reference on the last {s["cp_ref_queries"]} queries):', ''] + cp_table(results['cp'])
  fit = results.get('fit_1gpu')
  if fit:
    needs = f'{fit["total_gib"]:.1f} GiB per device' if 'total_gib' in fit else fit['error']
    lines += ['', f'Single-GPU train step at {fit["length"]:,} tokens (sparseformer.cli.fit): {needs}.']
  lines += ['', 'Phases:', ''] + [f'- {name}: exit {p["returncode"]}, {fmt(p["wall_s"], ".0f")} s: `{p["command"]}`'
                                   for name, p in results['phases'].items()]
  lines += ['', f'Verdict: {"PASS" if results["passed"] else "FAIL"}' +
            (f' (failed phases: {", ".join(results["failed_phases"])})' if results['failed_phases'] else '')]
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------
# The experiment


class Experiment:

  def __init__(self, args, log):
    self.args, self.log = args, log
    self.runs = os.path.join(args.out, 'runs')
    self.started = time.perf_counter()
    self.deadline = self.started + args.budget
    self.phases = previous_phases(args.out)  # name -> process summary; a rerun adds to an earlier run's
    self.device = {}

  def workdir(self, name):
    return os.path.join(self.runs, name)

  def train_phase(self, name, mesh, devices, shares_devices=False, resume_from=None, first_gpu=0):
    workdir = self.workdir(name)
    shutil.rmtree(workdir, ignore_errors=True)
    if resume_from is not None:
      copy_checkpoint(self.workdir(resume_from), self.args.steps // 2, workdir)
    argv = [sys.executable, os.path.join(REPO, 'train.py')] + train_argv(self.args, workdir, mesh)
    return Phase(name, argv, phase_env(self.args, devices, shares_devices=shares_devices, first=first_gpu),
                 self.args.out)

  def group(self, label, starters):
    """Starts the phases of {name: () -> Phase} together and waits for them all; none
    starts past --budget (they are reported as skipped)."""
    if not starters:
      return
    if time.perf_counter() > self.deadline:
      self.log(f'skipped {label}: past --budget={self.args.budget} s')
      self.phases.update({name: {'command': '', 'returncode': 'skipped (budget)', 'wall_s': None} for name in starters})
      return
    self.log(f'[{time.perf_counter() - self.started:6.1f} s] {label}: ' + ', '.join(starters))
    self.phases.update(run_group([start() for start in starters.values()], self.deadline, self.log))
    self.write_report()

  def probe(self):
    args = self.args
    env = phase_env(args, QUICK_DEVICES, shares_devices=True) if args.quick else {
        **base_env(), 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}
    phase = Phase('probe', own_command(args, 'probe'), env, args.out).wait(self.started + 300)
    self.device = Phase.result_in(phase.log_path)
    if self.device is None:
      raise SystemExit(f'device probe failed:\n{phase.output()[-3000:]}')
    if not args.quick:
      visible = os.environ.get('CUDA_VISIBLE_DEVICES')
      args.visible_gpus = visible.split(',') if visible else [str(i) for i in range(self.device['count'])]
    args.gpus = args.gpus or self.device['count']
    problem = device_count_problem(args, self.device['count'])
    if problem:
      raise SystemExit(problem)
    self.log(f'devices: {self.device["count"]} x {self.device["kind"]} ({self.device["platform"]}, '
             f'{self.device["dtype"]} compute); multi-device runs on {args.gpus}')

  def prepare_data(self):
    argv = [sys.executable, '-m', 'sparseformer.cli.prepare_data', '--name', DATASET]
    argv += ['--data_dir', self.args.data_dir] if self.args.data_dir else []
    env = {**base_env(), 'JAX_PLATFORMS': 'cpu'}
    phase = Phase('prepare_data', argv, env, self.args.out).wait(self.deadline)
    if phase.returncode != 0:
      raise SystemExit(f'preparing {DATASET} failed:\n{phase.output()[-3000:]}')

  def run(self):
    args, wanted = self.args, set(self.args.phases)
    os.makedirs(args.out, exist_ok=True)
    self.prepare_data()
    self.probe()
    n, mesh = args.gpus, meshes(args.gpus)
    shared = phase_env(args, n, shares_devices=True)
    # single on the last GPU: the compile processes autotune XLA's kernels on the first
    first = {'single': lambda: self.train_phase('single', mesh['single'], 1, first_gpu=n - 1)}
    for name in ('dp', 'fsdp'):
      argv = own_command(args, 'precompile', train_argv(args, self.workdir(name), mesh[name]))
      first[f'compile_{name}'] = lambda name=name, argv=argv: Phase(f'compile_{name}', argv, shared, args.out)
    self.group('single run; dp and fsdp steps compiled meanwhile',
               {k: v for k, v in first.items() if k.removeprefix('compile_') in wanted})
    for name in ('dp', 'fsdp'):
      if name in wanted:
        self.group(f'{name} run', {name: lambda name=name: self.train_phase(name, mesh[name], n)})
    last = {}
    for name, target, source in (('resume_fsdp_from_dp', 'fsdp', 'dp'), ('resume_dp_from_fsdp', 'dp', 'fsdp')):
      if name in wanted and self.has_checkpoint(source):
        last[name] = lambda name=name, target=target, source=source: self.train_phase(
            name, mesh[target], n, shares_devices=True, resume_from=source)
      elif name in wanted:
        self.log(f'{name}: no checkpoint of step {args.steps // 2} in {self.workdir(source)}; left out')
    last['cp'] = lambda: Phase('cp', own_command(args, 'cp'), shared, args.out)
    last['fit_1gpu'] = lambda: Phase('fit_1gpu', self.fit_argv(), phase_env(args, 1, shares_devices=True), args.out)
    self.group('cross-mesh resumes, context parallelism, single-GPU fit',
               {k: v for k, v in last.items() if k in wanted})
    return self.write_report()

  def fit_argv(self):
    overrides = {'data.seq_len': self.args.cp_len, 'train.global_batch_size': 1, 'mesh.data': 1, 'mesh.fsdp': 1,
                 **model_overrides(self.args)}
    return [sys.executable, '-m', 'sparseformer.cli.fit', '--config', CONFIG] + [
        f'--config.{k}={v}' for k, v in overrides.items()]

  def has_checkpoint(self, name):
    return os.path.isdir(os.path.join(self.workdir(name), 'checkpoints', str(self.args.steps // 2)))

  def write_report(self):
    results = collect(self.args, self.device, self.phases, self.runs, os.path.join(self.args.out, 'logs'))
    results['wall_s'] = time.perf_counter() - self.started
    text = markdown(results)
    with open(os.path.join(self.args.out, 'results.json'), 'w') as f:
      json.dump(results, f, indent=1)
    with open(os.path.join(self.args.out, 'results.md'), 'w') as f:
      f.write(text)
    return results, text


def previous_phases(out):
  path = os.path.join(out, 'results.json')
  if not os.path.exists(path):
    return {}
  with open(path) as f:
    return json.load(f).get('phases', {})


def copy_checkpoint(source_workdir, step, workdir):
  """Step `step` of another run's checkpoints as the only checkpoint of a fresh workdir:
  train.py there resumes from it (model, optimizer, step, data position) on its own mesh."""
  source = os.path.join(source_workdir, 'checkpoints', str(step))
  if not os.path.isdir(source):
    raise SystemExit(f'no checkpoint of step {step} in {source_workdir}')
  shutil.copytree(source, os.path.join(workdir, 'checkpoints', str(step)))


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.child:
    return child_main(args)
  results, text = Experiment(args, lambda *a: print(*a, flush=True)).run()
  print('\n' + text)
  return 0 if results['passed'] else 1


if __name__ == '__main__':
  sys.exit(main())
