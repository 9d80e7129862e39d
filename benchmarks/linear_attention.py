"""Chunked gated linear attention at long context, in one run on one GPU: the Triton kernel
(jax_triton) against the jnp chunked reference and dense causal cuDNN softmax attention.

    python benchmarks/linear_attention.py --out linear_attention.json   # GPU: S=32768
    python benchmarks/linear_attention.py --quick                        # CPU smoke run (reference only)

bf16 q, k, v, g (per-key-channel log decay, logsigmoid(x) / 16 as in GLA) [B, S, H, D],
B=1, H=16, Dk=Dv=128, one segment, no initial state (the shapes of FLA's own GLA
benchmarks at a longer S). Rows:
  triton     gated_linear_attention(implementation='triton'): chunk states, chunk outputs;
             backward: states recomputed, state gradients, dq/dk, dv, dg
  reference  gated_linear_attention(implementation='reference'): reference.chunked in jnp
             under jit, backward by jax.vjp of it
  cudnn      jax.nn.dot_product_attention(is_causal=True, implementation='cudnn'), the same
             q, k, v (D=128)
each forward and forward+backward (linear attention: dq, dk, dv, dg; cuDNN: dq, dk, dv).
`vs ref` = reference ms / row ms, `vs cuDNN` = cuDNN ms / row ms of the same pass (> 1:
faster). Time is device time through CUPTI (benchmarks.attention.measure_jax: the kernels
of one call, median over --iterations); wall time where CUPTI is missing (CPU).
err: max |row - reference| / max |reference| over o (fwd) or over dq, dk, dv, dg (fwd+bwd).
The triton rows also print the device time of each kernel of one call (CUPTI).
"""

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.rows import device_name, kernel_times, number, report, text_table, time_row  # noqa: E402
from pallas_kernels.linear_attention import gated_linear_attention  # noqa: E402
from pallas_kernels.linear_attention.api import REGISTRY  # noqa: E402


@dataclasses.dataclass
class Row:
  length: int
  implementation: str  # triton | reference | cudnn
  direction: str  # fwd | fwd+bwd
  ms: float = float('nan')
  vs_reference: float = float('nan')
  vs_cudnn: float = float('nan')
  err: float = float('nan')
  note: str = ''


def make_inputs(seed, batch, length, heads, head_dim):
  keys = jax.random.split(jax.random.key(seed), 5)
  shape = (batch, length, heads, head_dim)
  q, k, v, d_o = (jax.random.normal(key, shape, jnp.bfloat16) for key in (keys[0], keys[1], keys[2], keys[4]))
  g = (jax.nn.log_sigmoid(jax.random.normal(keys[3], shape, jnp.float32)) / 16).astype(jnp.bfloat16)
  return q, k, v, g, d_o


def linear_forward(name):
  @jax.jit
  def forward(q, k, v, g):
    return gated_linear_attention(q, k, v, g, implementation=name)
  return forward


def linear_forward_backward(name):
  @jax.jit
  def forward_backward(q, k, v, g, d_o):
    _, pull = jax.vjp(lambda *x: gated_linear_attention(*x, implementation=name), q, k, v, g)
    return pull(d_o)
  return forward_backward


def cudnn_forward(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')


def cudnn_functions():
  forward_backward = lambda q, k, v, d_o: jax.vjp(cudnn_forward, q, k, v)[1](d_o)  # noqa: E731
  return jax.jit(cudnn_forward), jax.jit(forward_backward)


def kernel_breakdown(function, fn_args):
  """'name ms, ...' of the kernels of one call, longest first (CUPTI); '' where unavailable."""
  _, totals = kernel_times(lambda: function(*fn_args))
  return ', '.join(f'{name} {ms:.3f}' for name, ms in (totals or {}).items())


def relative_error(got, want):
  if got is None or want is None:
    return float('nan')
  pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want))
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))) /
                   max(float(jnp.max(jnp.abs(y.astype(jnp.float32)))), 1e-30)) for x, y in pairs)


def implementations(quick, q, k, v, g):
  """The rows to run: the linear attention kernels that can run here (a skipped one says
  why), then cuDNN (not in --quick)."""
  if quick:
    return ['reference']
  names = []
  for name in ('triton', 'reference'):
    reason = REGISTRY.reason_unavailable(name, q, k, v, g, None, None)
    if reason:
      print(f'  {name}: skipped, {reason}', flush=True)
    else:
      names.append(name)
  return names + ['cudnn']


def run(args):
  q, k, v, g, d_o = make_inputs(args.seed, 1, args.length, args.heads, args.head_dim)
  rows, results = [], {}
  for name in implementations(args.quick, q, k, v, g):
    for direction in ('fwd', 'fwd+bwd'):
      row = Row(args.length, name, direction)
      if name == 'cudnn':
        function = cudnn_functions()[direction == 'fwd+bwd']
        fn_args = (q, k, v) + ((d_o,) if direction == 'fwd+bwd' else ())
      else:
        function = (linear_forward if direction == 'fwd' else linear_forward_backward)(name)
        fn_args = (q, k, v, g) + ((d_o,) if direction == 'fwd+bwd' else ())
      results[name, direction] = time_row(row, function, fn_args, args.iterations)
      print(f'  {name:9s} {direction:8s} {row.ms:9.3f} ms  {row.note}', flush=True)
      if name == 'triton' and results[name, direction] is not None:
        print(f'    kernels (ms): {kernel_breakdown(function, fn_args)}', flush=True)
      rows.append(row)
  for row in rows:
    reference_row = next(r for r in rows if r.implementation == 'reference' and r.direction == row.direction)
    cudnn_row = next((r for r in rows if r.implementation == 'cudnn' and r.direction == row.direction), None)
    row.vs_reference = reference_row.ms / row.ms
    row.vs_cudnn = cudnn_row.ms / row.ms if cudnn_row else float('nan')
    if row.implementation != 'cudnn':
      row.err = relative_error(results[row.implementation, row.direction], results['reference', row.direction])
  return rows


def format_table(rows):
  columns = ['S', 'implementation', 'pass', 'ms', 'vs ref', 'vs cuDNN', 'err', 'note']
  lines = [[str(r.length), r.implementation, r.direction, number(r.ms, '.3f'), number(r.vs_reference, '.2f'),
            number(r.vs_cudnn, '.2f'), number(r.err, '.1e'), r.note] for r in rows]
  return text_table(columns, lines) + '\n(vs ref / vs cuDNN: that row\'s ms / this row\'s ms, the ratio column)'


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--length', type=int, default=None, help='sequence length (default 32768)')
  parser.add_argument('--heads', type=int, default=None, help='default 16')
  parser.add_argument('--head-dim', type=int, default=None, help='Dk = Dv (default 128)')
  parser.add_argument('--iterations', type=int, default=None, help='default 10 (quick: 2)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', '--json', dest='out', default=None, help='write the rows as JSON here')
  parser.add_argument('--quick', action='store_true', help='CPU smoke run: S=256, 2 heads of 32, reference only')
  args = parser.parse_args(argv)
  defaults = dict(length=256, heads=2, head_dim=32, iterations=2) if args.quick else dict(
      length=32768, heads=16, head_dim=128, iterations=10)
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  return args


def main(argv=None):
  args = parse_args(argv)
  print(f'device: {device_name()}, jax {jax.__version__}; B=1, S={args.length}, H={args.heads}, '
        f'Dk=Dv={args.head_dim}, bf16, {args.iterations} iterations', flush=True)
  rows = run(args)
  report(rows, format_table(rows), args.out,
         dict(heads=args.heads, head_dim=args.head_dim, iterations=args.iterations))

if __name__ == '__main__':
  main()
