"""Fine-tuning an imported Hugging Face model at long context: one train step of
configs/hf_finetune.py for each mechanism preset, timed, with its peak memory and
`sparseformer.cli.fit`'s estimate beside it.

    python tests/fixtures/hf/make_fixtures.py --shape qwen2.5-0.5b --out /tmp/qwen   # transformers
    python benchmarks/hf_finetune.py --source /tmp/qwen --out /tmp/bench --seq-len 32768
    python benchmarks/hf_finetune.py --source DIR --out /tmp/bench --quick            # CPU smoke run

The source directory goes through `python -m sparseformer.cli.import_hf` (timed), then
each preset (dense, masformer, gated; --variants) runs in its own subprocess so its peak
memory is its own: the config is `configs/hf_finetune.py:IMPORTED,PRESET,SEQ_LEN` with
--batch rows, the step the trainer's (`cli.fit.build_train_step`), on one document per
row of random tokens. The state is freshly initialised with the model's shapes: timing
and memory do not depend on the weights' values. Reported per preset: compile time,
median step time over --repeats of --steps back-to-back steps, tokens/s, the device's
peak bytes in use, and fit's estimate (XLA's buffer assignment of this compiled step).
The JSON goes to OUT/hf_finetune.json, each preset's progress to OUT/PRESET.log.

--parallel starts every preset's process at once: they compile side by side (XLA's
compile is mostly host work), then take turns on the device through a file lock
(--device-lock, shared by runs that share a GPU): initialisation, warm-up, the timed steps
and the peak memory happen while a process holds it, so those figures are as in a serial
run. Compile times then include the other compiles' share of the host's cores.
"""

import argparse
import contextlib
import fcntl
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.train_throughput import peak_memory, progress, timed_steps  # noqa: E402

CONFIG = os.path.join(ROOT, 'configs', 'hf_finetune.py')
RESULT_PREFIX = 'RESULT '


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--source', required=True, help='a Hugging Face model directory')
  parser.add_argument('--out', required=True)
  parser.add_argument('--seq-len', type=int, default=32768)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--variants', default='dense,masformer,gated')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--child-timeout', type=float, default=420.0)
  parser.add_argument('--parallel', action='store_true', help='compile the presets side by side, time them in turn')
  parser.add_argument('--device-lock', default='', help='the lock file of --parallel (default OUT/device.lock)')
  parser.add_argument('--quick', action='store_true', help='CPU smoke run: 512 tokens, 1 step, no repeats')
  parser.add_argument('--child', default='', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  args.device_lock = args.device_lock or os.path.join(args.out, 'device.lock')
  if args.quick:
    args.seq_len, args.steps, args.repeats, args.warmup = 512, 1, 1, 1
  return args


def run_child(args, variant, imported):
  """One preset's measurements (in this process)."""
  import jax
  from sparseformer import config as config_lib
  from sparseformer import sharding
  from sparseformer.cli.fit import memory_per_device
  from sparseformer.training.assembly import build_train_step, compile_train_step
  cfg = config_lib.load_config_file(f'{CONFIG}:{imported},{variant},{args.seq_len}')
  cfg.train.global_batch_size = args.batch
  parts = build_train_step(cfg, sharding.make_mesh(cfg.mesh))
  progress(f'{variant}: {parts.spec.dims.layer_mechanisms[:4]}... compiling')
  start = time.perf_counter()
  compiled = compile_train_step(parts)
  compile_s = time.perf_counter() - start
  estimate = memory_per_device(compiled)['total']
  progress(f'{variant}: compiled in {compile_s:.1f} s (fit estimate {estimate / 2**30:.2f} GiB)')
  with device_turn(args):
    progress(f'{variant}: initialising')
    return {**measure_steps(args, parts, compiled), 'variant': variant, 'layers': list(parts.spec.dims.layer_mechanisms),
            'params': int(parts.spec.param_count), 'seq_len': args.seq_len, 'batch': args.batch,
            'compile_s': compile_s, 'fit_estimate_gib': estimate / 2**30}


@contextlib.contextmanager
def device_turn(args):
  """Holds --device-lock (with --parallel) while the device is measured."""
  if not args.parallel:
    yield
    return
  with open(args.device_lock, 'a') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def measure_steps(args, parts, compiled):
  """Step time, tokens/s, peak memory and loss of a compiled step on a fresh state."""
  import jax
  from sparseformer.training.assembly import synthetic_batch
  state = parts.fresh_state(0)
  batch = synthetic_batch(parts, parts.spec.dims.vocab_size)
  warmup_s, state, _ = timed_steps(compiled, state, batch, args.warmup)
  progress(f'{args.warmup} warm-up steps in {warmup_s * args.warmup:.1f} s')
  per_step = []
  for _ in range(args.repeats):
    seconds, state, metrics = timed_steps(compiled, state, batch, args.steps)
    per_step.append(seconds)
  step_s = statistics.median(per_step)
  peak_gib, source = peak_memory()
  return {'step_ms': 1e3 * step_s, 'step_ms_repeats': [1e3 * s for s in per_step],
          'tokens_per_s': args.batch * args.seq_len / step_s, 'peak_gib': peak_gib, 'memory_source': source,
          'loss': float(jax.device_get(metrics['loss'])), 'device': jax.devices()[0].device_kind}


def import_source(args):
  from sparseformer.interop.hf_import import import_model
  imported = os.path.join(args.out, 'imported')
  start = time.perf_counter()
  report = import_model(args.source, imported, {'model.param_dtype': 'float32'}, log=progress)
  return imported, {**report, 'import_s': time.perf_counter() - start}


def child_output_tail(log):
  """The end of a child's log (its progress lines say where it stopped)."""
  return log[-1500:]


def start_preset(args, argv, variant, imported, env):
  """A preset's process; its progress and errors go to OUT/PRESET.log (a file, not a pipe:
  processes that nobody reads yet must not block on a full pipe while holding the device)."""
  log = open(os.path.join(args.out, f'{variant}.log'), 'w')
  child = subprocess.Popen([sys.executable, os.path.abspath(__file__), *argv, '--child', f'{variant},{imported}'],
                           stdout=subprocess.PIPE, stderr=log, text=True, env=env, cwd=ROOT)
  log.close()
  return child


def preset_row(args, child, variant, timeout):
  """The row a preset's process printed, or its error (the tail of its log)."""
  try:
    stdout, _ = child.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    child.kill()
    child.communicate()
    return {'variant': variant, 'error': f'timed out after {timeout:.0f} s',
            'child_progress': child_output_tail(preset_log(args, variant))}
  lines = [line for line in stdout.splitlines() if line.startswith(RESULT_PREFIX)]
  if lines:
    return json.loads(lines[-1][len(RESULT_PREFIX):])
  return {'variant': variant, 'error': child_output_tail(preset_log(args, variant))}


def preset_log(args, variant):
  with open(os.path.join(args.out, f'{variant}.log'), errors='replace') as f:
    return f.read()


def run_presets(args, argv, imported, env):
  """One row per preset, each from its own process: one after another, or (--parallel) all
  started at once, each child's --child-timeout counted from the common start."""
  variants = args.variants.split(',')
  if not args.parallel:
    rows = []
    for variant in variants:
      rows.append(preset_row(args, start_preset(args, argv, variant, imported, env), variant, args.child_timeout))
      progress(json.dumps(rows[-1])[:300])
    return rows
  # Each process allocates only what it uses: they share the device.
  env = {**env, 'XLA_PYTHON_CLIENT_PREALLOCATE': 'false'}
  children = [start_preset(args, argv, variant, imported, env) for variant in variants]
  deadline = time.monotonic() + args.child_timeout
  rows = []
  for child, variant in zip(children, variants):
    rows.append(preset_row(args, child, variant, max(1.0, deadline - time.monotonic())))
    progress(json.dumps(rows[-1])[:300])
  return rows


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  if args.child:
    variant, imported = args.child.split(',', 1)
    print(RESULT_PREFIX + json.dumps(run_child(args, variant, imported)), flush=True)
    return 0
  os.makedirs(args.out, exist_ok=True)
  child_env = dict(os.environ)
  # The import runs on the host: a JAX client here on the GPU would hold most of its memory
  # (XLA preallocates 75%) while the presets run in their own processes.
  os.environ['JAX_PLATFORMS'] = 'cpu'
  imported, report = import_source(args)
  progress(f'imported {report["architecture"]}: {report["parameters"] / 1e6:.1f}M parameters in '
           f'{report["import_s"]:.1f} s')
  rows = run_presets(args, sys.argv[1:] if argv is None else argv, imported, child_env)
  result = {'source': args.source, 'import': report, 'rows': rows}
  with open(os.path.join(args.out, 'hf_finetune.json'), 'w') as f:
    json.dump(result, f, indent=1)
  dense = next((r for r in rows if r.get('variant') == 'dense' and 'step_ms' in r), None)
  print('| preset | tokens/s | vs dense | step ms | compile s | peak GiB | fit estimate GiB |')
  print('| --- | --- | --- | --- | --- | --- | --- |')
  for r in rows:
    if 'step_ms' not in r:
      print(f'| {r["variant"]} | error | | | | | |')
      continue
    ratio = f'{r["tokens_per_s"] / dense["tokens_per_s"]:.2f}x' if dense else ''
    print(f'| {r["variant"]} | {r["tokens_per_s"]:.0f} | {ratio} | {r["step_ms"]:.1f} | {r["compile_s"]:.1f} | '
          f'{r["peak_gib"]:.2f} | {r["fit_estimate_gib"]:.2f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
