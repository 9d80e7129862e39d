"""Launch time: from `python train.py ...` to the first finished train step, and where it goes.

    python benchmarks/launch_time.py --out launch.json                   # GPU: masformer_125m at 32k
    python benchmarks/launch_time.py --quick                             # CPU smoke run

Runs train.py as a fresh process --launches times (default 2) for one step of --config at
--seq-len, each in a new workdir (the closing validation cut to one batch). The first launch is a fresh machine's: an empty data
directory (the shipped corpus is prepared) and an empty persistent compilation cache. The
later ones reuse both, as a researcher's second launch does. Each of train.py's output
lines is stamped with the seconds since the process was spawned, which splits a launch
into phases:
  setup      spawn -> "model: ..." (Python, jax and sparseformer imports; the config; the
             dataset prepared if needed; the input pipeline; the model's
             abstract shapes and the fresh train state, initialised on the device);
  step       -> "step 1 done" (tracing, lowering and compiling the step; the step itself).
With JAX_LOG_COMPILES set in the child, jax logs each jitted function's tracing, lowering
and XLA compilation time: the longest are listed. --profile also runs the first launch
under cProfile and lists the functions with the most cumulative time.
"""

import argparse
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {'fresh': 60.0, 'cached': 20.0}  # issue 25: seconds to the first finished step
PHASES = (('setup', 'model: '), ('step', 'step 1 done'))
JAX_TIMING = re.compile(r'Finished (tracing|jaxpr to MLIR module conversion|XLA compilation) (?:of )?(.+?)'
                        r'(?: for jit)? in ([0-9.e-]+) sec')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--config', default=os.path.join(ROOT, 'configs', 'masformer_125m.py'))
  parser.add_argument('--seq-len', type=int, default=32768)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--launches', type=int, default=2)
  parser.add_argument('--profile', action='store_true', help='cProfile the first launch')
  parser.add_argument('--timeout', type=float, default=280.0, help='seconds per launch')
  parser.add_argument('--scratch', default='', help='folder for workdirs, data and cache (default: a new temp folder)')
  parser.add_argument('--override', action='append', default=[], help='more --config.X=Y flags for train.py')
  parser.add_argument('--out', default='')
  parser.add_argument('--quick', action='store_true', help='CPU smoke run: a 2-layer model at 256 tokens')
  args = parser.parse_args(argv)
  if args.quick:
    args.seq_len = 256
    args.override += ['--config.model.num_layers=2', '--config.model.d_model=64', '--config.model.num_heads=2',
                      '--config.model.num_kv_heads=2', '--config.model.attention.kind=window:128',
                      '--config.model.attention.block_size=64']
  return args


def train_command(args, workdir, profile_path):
  command = [sys.executable]
  if profile_path:
    command += ['-m', 'cProfile', '-o', profile_path]
  return command + [os.path.join(ROOT, 'train.py'), '--config', args.config, '--workdir', workdir,
                    f'--config.data.seq_len={args.seq_len}', f'--config.train.global_batch_size={args.batch}',
                    '--config.train.steps=1', '--config.train.log_every=1', '--config.train.eval_batches=1',
                    *args.override]


def stamped_lines(command, env, timeout):
  """[(seconds since spawn, line)] of the process's stdout and stderr, and its exit code."""
  start = time.perf_counter()
  process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=ROOT)
  timer = threading.Timer(timeout, process.kill)
  timer.start()
  lines = [(time.perf_counter() - start, line.rstrip('\n')) for line in process.stdout]
  timer.cancel()
  return lines, process.wait()


def first_time(lines, prefix):
  return next((t for t, line in lines if line.startswith(prefix)), None)


def phase_times(lines):
  """{phase: seconds} from the stamped lines (a phase missing if its line never came)."""
  times, previous = {}, 0.0
  for name, prefix in PHASES:
    mark = first_time(lines, prefix)
    if mark is None:
      break
    times[name], previous = mark - previous, mark
  if 'step' in times:
    times['total'] = previous
  return times


def jax_timings(lines, longest=8):
  """The longest jax tracing / lowering / compilation entries: [(seconds, kind, function)]."""
  found = []
  for _, line in lines:
    match = JAX_TIMING.search(line)
    if match:
      kind, function, seconds = match.groups()
      found.append((float(seconds), {'jaxpr to MLIR module conversion': 'lowering'}.get(kind, kind), function))
  return sorted(found, reverse=True)[:longest]


def profile_lines(path, longest=25):
  stats = pstats.Stats(path)
  rows = []
  for (filename, line, function), (_, calls, _, cumulative, _) in stats.stats.items():
    rows.append((cumulative, calls, f'{os.path.relpath(filename, ROOT) if filename.startswith(ROOT) else filename}'
                                    f':{line}({function})'))
  rows.sort(reverse=True)
  return [f'{cumulative:8.1f} s {calls:8d} calls  {name[-110:]}' for cumulative, calls, name in rows[:longest]]


def launch(args, scratch, index):
  env = {**os.environ, 'JAX_LOG_COMPILES': '1', 'PYTHONUNBUFFERED': '1',
         'SPARSEFORMER_COMPILATION_CACHE': os.path.join(scratch, 'jax_cache'),
         'SPARSEFORMER_DATA_DIR': os.path.join(scratch, 'data')}
  profile_path = os.path.join(scratch, 'launch.prof') if args.profile and index == 0 else ''
  command = train_command(args, os.path.join(scratch, f'run{index}'), profile_path)
  lines, code = stamped_lines(command, env, args.timeout)
  result = {'launch': index + 1, 'kind': 'fresh' if index == 0 else 'cached', 'exit_code': code,
            'phases_s': phase_times(lines), 'longest_jax': jax_timings(lines),
            'output': [f'{t:7.1f} s  {line}' for t, line in lines if not line.startswith('WARNING:')][-12:]}
  if profile_path and os.path.exists(profile_path):
    result['profile'] = profile_lines(profile_path)
  return result


def report(result):
  phases = ', '.join(f'{name} {seconds:.1f} s' for name, seconds in result['phases_s'].items())
  lines = [f'launch {result["launch"]} ({result["kind"]}), exit code {result["exit_code"]}: {phases}']
  total, target = result['phases_s'].get('total'), TARGETS[result['kind']]
  lines.append(f'  first step after {total:.1f} s (target <= {target:.0f} s)' if total is not None
               else '  no finished step')
  lines += [f'  {seconds:7.2f} s {kind:11s} {function[:100]}' for seconds, kind, function in result['longest_jax']]
  if result['exit_code'] != 0 or total is None:
    lines += ['  ' + line for line in result['output']]
  if 'profile' in result:
    lines += ['  cProfile, cumulative:'] + ['    ' + line for line in result['profile']]
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  scratch = args.scratch or tempfile.mkdtemp(prefix='launch_time_')
  results = []
  try:
    for index in range(args.launches):
      results.append(launch(args, scratch, index))
      print(report(results[-1]), flush=True)
  finally:
    if not args.scratch:
      shutil.rmtree(scratch, ignore_errors=True)
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'args': vars(args), 'launches': results}, f, indent=1)
  return 0 if all(r['exit_code'] == 0 and 'total' in r['phases_s'] for r in results) else 1


if __name__ == '__main__':
  sys.exit(main())
