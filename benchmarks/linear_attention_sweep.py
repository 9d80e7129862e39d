"""Launch-settings sweep of the GLA Triton kernels (linear_attention/triton_launch.py), GPU.

    python benchmarks/linear_attention_sweep.py --out sweep.json default 'chunk_dqk_kernel:num_warps=8' 'chunk=128'
    python benchmarks/linear_attention_sweep.py --quick        # CPU smoke run: the jnp reference stands in
Settings are SPARSEFORMER_GLA_LAUNCH strings, run after `reference` (reference.chunked in
jnp) and `default` (no overrides), each timed forward and forward+backward (as the api
calls the kernels) at S=32768 H=16 D=128 and at S=8192 H=16 D=64 with 8 packed documents,
bf16, B=1: device time (CUPTI; wall time on a CPU) and under each row every kernel's time
in one call, so a setting that changes several kernels times each variant. Rows print as
measured, --out is rewritten after each setting; a failing setting says why, one running
past --guard seconds (compiles included) is cut off. `vs default` = default ms / this ms
(> 1: faster); err = max|this - reference| / max|reference| over o, or dq, dk, dv, dg.
"""

import argparse
import contextlib
import dataclasses
import os
import signal
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.linear_attention import make_inputs, relative_error, segment_ids  # noqa: E402
from benchmarks.rows import device_name, kernel_times, measure_jax, number, write_json  # noqa: E402
from pallas_kernels.linear_attention import reference, triton_gpu, triton_launch  # noqa: E402

SHAPES = (('S32768_D128', 32768, 16, 128, 1), ('S8192_D64_x8', 8192, 16, 64, 8))  # (label, S, H, D, documents)
QUICK_SHAPES = (('S256_D32', 256, 2, 32, 1), ('S256_D16_x4', 256, 2, 16, 4))


@dataclasses.dataclass
class Row:
  setting: str
  shape: str
  direction: str  # fwd | fwd+bwd
  ms: float = float('nan')
  vs_default: float = float('nan')
  err: float = float('nan')
  note: str = ''
  kernels: dict = dataclasses.field(default_factory=dict)  # kernel name: ms of one call (CUPTI)


def kernel_functions(settings, segments):
  """(forward, forward+backward) through the Triton kernels, jitted."""
  launch = triton_gpu.jax_triton_launch

  def forward(q, k, v, g):
    return triton_gpu.forward_with(launch, q, k, v, g, None, segments, reference.default_scale(q), settings)[0]

  def forward_backward(q, k, v, g, d_o):
    scale = reference.default_scale(q)
    o, final = triton_gpu.forward_with(launch, q, k, v, g, None, segments, scale, settings)
    return triton_gpu.backward_with(launch, q, k, v, g, None, segments, scale, o, final, d_o, jnp.zeros_like(final),
                                    settings)[:4]
  return jax.jit(forward), jax.jit(forward_backward)


def reference_functions(settings, segments):  # --quick: reference.chunked at the setting's chunk sizes
  def forward(q, k, v, g):
    return reference.chunked(q, k, v, g, segment_ids=segments, chunk=settings.chunk, sub_chunk=settings.sub_chunk)[0]
  return jax.jit(forward), jax.jit(lambda q, k, v, g, d_o: jax.vjp(forward, q, k, v, g)[1](d_o))


@contextlib.contextmanager
def guard(seconds):
  """Raises TimeoutError in this thread once `seconds` have passed (at the next Python step)."""
  def expire(signum, frame):
    raise TimeoutError(f'cut off after {seconds} s')
  previous = signal.signal(signal.SIGALRM, expire)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def measure_setting(text, shape, inputs, args, baseline):
  """The fwd and fwd+bwd rows of one setting ('reference': reference.chunked) on one shape;
  `baseline` keeps the default's times and the reference's results per (shape, pass)."""
  rows = [Row(text, shape[0], direction) for direction in ('fwd', 'fwd+bwd')]
  try:
    with guard(args.guard):
      settings = triton_launch.parse('' if text in ('default', 'reference') else text)
      build = reference_functions if args.quick or text == 'reference' else kernel_functions
      functions = build(settings, segment_ids(shape[1], shape[4]))
      for row, function, fn_args in zip(rows, functions, (inputs[:4], inputs)):
        row.ms, result = measure_jax(function, fn_args, args.iterations)
        if text != 'reference':
          row.kernels = kernel_times(lambda: function(*fn_args))[1] or {}  # noqa: B023
        key = shape[0], row.direction
        if text in ('default', 'reference'):
          baseline[(text, *key)] = row.ms if text == 'default' else result
        row.vs_default = baseline.get(('default', *key), float('nan')) / row.ms
        row.err = relative_error(result, baseline.get(('reference', *key)))
  except Exception as error:  # one bad setting must not stop the sweep
    for row in (row for row in rows if row.ms != row.ms):  # not measured
      row.note = ': '.join([type(error).__name__] + str(error).splitlines()[:1])[:160]
  return rows


COLUMNS = '{:<60s} {:<13s} {:<8s} {:>9s} {:>10s} {:>8s}  {}'


def print_row(row):  # the setting cut at 60 characters; the JSON keeps it whole
  print(COLUMNS.format(row.setting[:60], row.shape, row.direction, number(row.ms, '.3f'),
                       number(row.vs_default, '.2f'), number(row.err, '.1e'), row.note), flush=True)
  if row.kernels:
    print('    ' + ', '.join(f'{name.removesuffix("_kernel")} {ms:.3f}' for name, ms in row.kernels.items()),
          flush=True)


def parse_args(argv):
  parser = argparse.ArgumentParser(description='Launch-settings sweep of the GLA Triton kernels')
  parser.add_argument('settings', nargs='*', help="SPARSEFORMER_GLA_LAUNCH strings, after 'reference' and 'default'")
  parser.add_argument('--iterations', type=int, default=None, help='default 10 (quick: 2)')
  parser.add_argument('--guard', type=int, default=120, help='seconds per setting and shape (default 120)')
  parser.add_argument('--out', default=None, help='write the rows as JSON here (after every setting)')
  parser.add_argument('--quick', action='store_true', help='CPU smoke run: small shapes, reference.chunked')
  args = parser.parse_args(argv)
  args.iterations = args.iterations or (2 if args.quick else 10)
  args.settings = ['reference', 'default'] + [s for s in args.settings if s not in ('reference', 'default')]
  for text in args.settings[2:]:  # a typo fails now, not minutes into the run
    triton_launch.parse(text)
  return args


def main(argv=None):
  args = parse_args(argv)
  print(f'device: {device_name()}, jax {jax.__version__}; bf16, B=1, {args.iterations} iterations\n' +
        COLUMNS.format('setting', 'shape', 'pass', 'ms', 'vs default', 'err', 'note'), flush=True)
  rows, baseline = [], {}
  shapes = [(shape, make_inputs(0, 1, *shape[1:4])) for shape in (QUICK_SHAPES if args.quick else SHAPES)]
  for text in args.settings:  # setting by setting, so a run cut short has whole settings
    for shape, inputs in shapes:
      for row in measure_setting(text, shape, inputs, args, baseline):
        print_row(row)
        rows.append(row)
      if args.out:
        write_json(args.out, dict(device=device_name(), jax=jax.__version__, iterations=args.iterations), rows)
  return rows


if __name__ == '__main__':
  main()
