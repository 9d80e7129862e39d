"""Chunked gated linear attention at long context, in one run on one GPU: the Triton kernel
(jax_triton) against the jnp chunked reference, flash-linear-attention's chunk_gla and
dense causal cuDNN softmax attention.

    python benchmarks/linear_attention.py --out linear_attention.json   # GPU: S=32768
    python benchmarks/linear_attention.py --length 8192 --head-dim 64 --documents 8
    python benchmarks/linear_attention.py --shapes 32768:128,8192:64:8   # several shapes, one process
    python benchmarks/linear_attention.py --quick                        # CPU smoke run (reference only)

bf16 q, k, v, g (per-key-channel log decay, logsigmoid(x) / 16 as in GLA) [B, S, H, D],
B=1, H=16, Dk=Dv=128, no initial state (the shapes of FLA's own GLA benchmarks at a longer
S); --documents N packs N equal documents into the row (segment ids for ours, cu_seqlens
for FLA: the state resets at each). --shapes LENGTH:HEAD_DIM[:DOCUMENTS],... runs several
shapes in one process, so FLA autotunes once for all (its tuning keys leave out the
length). Rows:
  triton     gated_linear_attention(implementation='triton'): chunk states, chunk outputs;
             backward: states recomputed, state gradients, dq/dk, dv, dg
  reference  gated_linear_attention(implementation='reference'): reference.chunked in jnp
             under jit, backward by jax.vjp of it
  fla        flash-linear-attention's `fla.ops.gla.chunk_gla` (torch, Triton; fla-core from
             its wheel), the same inputs; its autotuning runs on the first calls, before the
             timed ones. Absent torch, CUDA or fla, the row says why (--no-fla: left out)
  cudnn      jax.nn.dot_product_attention(is_causal=True, implementation='cudnn'), the same
             q, k, v (one causal row, documents ignored)
each forward and forward+backward (linear attention: dq, dk, dv, dg; cuDNN: dq, dk, dv).
`vs ref`, `vs FLA`, `vs cuDNN` = that row's ms / this row's ms in the same pass (> 1:
this row is faster). Time is device time through CUPTI (benchmarks.rows.measure_jax: the kernels
of one call, median over --iterations); wall time where CUPTI is missing (CPU).
err: max |row - reference| / max |reference| over o (fwd) or over dq, dk, dv, dg (fwd+bwd).
The triton rows also print the device time of each kernel of one call (CUPTI).
"""

import argparse
import dataclasses
import os
import sys
import tempfile

# jax_triton blanks TRITON_CACHE_DIR when imported (it caches its kernels itself), and a
# Triton without a cache directory cannot build its CUDA driver: FLA's row then fails with
# "Could not create or locate cache dir". Its own value is kept for torch's Triton.
TRITON_CACHE_DIR = os.environ.get('TRITON_CACHE_DIR') or os.path.join(tempfile.gettempdir(), 'triton_cache')

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.attention_flex import measure_torch  # noqa: E402
from benchmarks.rows import device_name, kernel_breakdown, number, report, text_table, time_row, write_json  # noqa: E402
from pallas_kernels.linear_attention import gated_linear_attention  # noqa: E402
from pallas_kernels.linear_attention.api import REGISTRY  # noqa: E402


@dataclasses.dataclass
class Row:
  length: int
  head_dim: int
  documents: int
  implementation: str  # triton | reference | cudnn
  direction: str  # fwd | fwd+bwd
  ms: float = float('nan')
  vs_reference: float = float('nan')
  vs_fla: float = float('nan')
  vs_cudnn: float = float('nan')
  err: float = float('nan')
  note: str = ''
  kernels: str = ''  # triton rows: the device time of each kernel of one call (GPU: CUPTI), also in the JSON


def make_inputs(seed, batch, length, heads, head_dim):
  keys = jax.random.split(jax.random.key(seed), 5)
  shape = (batch, length, heads, head_dim)
  q, k, v, d_o = (jax.random.normal(key, shape, jnp.bfloat16) for key in (keys[0], keys[1], keys[2], keys[4]))
  g = (jax.nn.log_sigmoid(jax.random.normal(keys[3], shape, jnp.float32)) / 16).astype(jnp.bfloat16)
  return q, k, v, g, d_o


def document_starts(length, documents):
  """Token index where each of `documents` (nearly) equal documents starts, and the end."""
  return [length * i // documents for i in range(documents + 1)]


def segment_ids(length, documents):
  """[1, S] int32 document ids, or None for one document."""
  if documents == 1:
    return None
  starts = document_starts(length, documents)
  return jnp.asarray(np.searchsorted(starts[1:], np.arange(length), side='right')[None].astype(np.int32))


def linear_forward(name, segments):
  @jax.jit
  def forward(q, k, v, g):
    return gated_linear_attention(q, k, v, g, segment_ids=segments, implementation=name)
  return forward


def linear_forward_backward(name, segments):
  @jax.jit
  def forward_backward(q, k, v, g, d_o):
    attend = lambda *x: gated_linear_attention(*x, segment_ids=segments, implementation=name)  # noqa: E731
    _, pull = jax.vjp(attend, q, k, v, g)
    return pull(d_o)
  return forward_backward


def cudnn_forward(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation='cudnn')


def cudnn_functions():
  forward_backward = lambda q, k, v, d_o: jax.vjp(cudnn_forward, q, k, v)[1](d_o)  # noqa: E731
  return jax.jit(cudnn_forward), jax.jit(forward_backward)


def relative_error(got, want):
  if got is None or want is None:
    return float('nan')
  pairs = zip(jax.tree.leaves(got), jax.tree.leaves(want))
  return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))) /
                   max(float(jnp.max(jnp.abs(y.astype(jnp.float32)))), 1e-30)) for x, y in pairs)


def implementations(args, q, k, v, g, segments):
  """The rows to run: the linear attention kernels that can run here (a skipped one says
  why), then cuDNN and FLA (not in --quick). FLA comes last: its first calls autotune for
  minutes, and a limit that ends the run there loses no other row."""
  if args.quick:
    return ['reference']
  names = []
  for name in ('triton', 'reference'):
    reason = REGISTRY.reason_unavailable(name, q, k, v, g, None, segments)
    if reason:
      print(f'  {name}: skipped, {reason}', flush=True)
    else:
      names.append(name)
  return names + ['cudnn'] + (['fla'] if args.fla else [])


def row_function(name, direction, inputs, segments, args):
  """(function, its arguments) of one row; FLA's are a torch closure and None."""
  q, k, v, g, d_o = inputs
  backward = direction == 'fwd+bwd'
  if name == 'fla':  # built when timed, so that a missing torch or fla fails that row only
    return lambda: fla_function(inputs, backward, document_starts(args.length, args.documents)), None
  if name == 'cudnn':
    return cudnn_functions()[backward], (q, k, v) + ((d_o,) if backward else ())
  function = (linear_forward_backward if backward else linear_forward)(name, segments)
  return function, (q, k, v, g) + ((d_o,) if backward else ())


def metadata(args):
  return dict(heads=args.heads, iterations=args.iterations)


def run(args, earlier_rows=()):
  """The rows of one shape (args.length, .head_dim, .documents); --out is rewritten with
  earlier_rows and every row of this shape as it finishes."""
  inputs = make_inputs(args.seed, 1, args.length, args.heads, args.head_dim)
  segments = segment_ids(args.length, args.documents)
  rows, results = [], {}
  for name in implementations(args, *inputs[:4], segments):
    for direction in ('fwd', 'fwd+bwd'):
      row = Row(args.length, args.head_dim, args.documents, name, direction)
      function, fn_args = row_function(name, direction, inputs, segments, args)
      if name == 'fla':
        results[name, direction] = time_fla_row(row, function, args.iterations)
      else:
        results[name, direction] = time_row(row, function, fn_args, args.iterations)
      print(f'  {name:9s} {direction:8s} {row.ms:9.3f} ms  {row.note}', flush=True)
      if name == 'triton' and results[name, direction] is not None:
        row.kernels = kernel_breakdown(function, fn_args)
        print(f'    kernels (ms): {row.kernels}', flush=True)
      rows.append(row)
      if args.out:  # every finished row kept, should a later one (FLA's autotuning) run out of time
        fill_ratios(rows, results)
        write_json(args.out, dict(device=device_name(), jax=jax.__version__, **metadata(args)),
                   list(earlier_rows) + rows)
  fill_ratios(rows, results)
  return rows


def fill_ratios(rows, results):
  by_key = {(r.implementation, r.direction): r for r in rows}
  for row in rows:
    ratio = lambda name: by_key[name, row.direction].ms / row.ms if (name, row.direction) in by_key else float('nan')  # noqa: E731
    row.vs_reference, row.vs_fla, row.vs_cudnn = ratio('reference'), ratio('fla'), ratio('cudnn')
    if row.implementation != 'cudnn' and np.isnan(row.err):  # once, when the reference has run
      row.err = relative_error(results[row.implementation, row.direction], results.get(('reference', row.direction)))


# ---------------------------------------------------------------- flash-linear-attention


def fla_function(inputs, backward, starts):
  """chunk_gla on torch copies of the inputs (cu_seqlens from the document starts): a
  closure returning o, or (dq, dk, dv, dg); raises if torch, CUDA or fla is missing."""
  os.environ['TRITON_CACHE_DIR'] = TRITON_CACHE_DIR
  import torch
  from fla.ops.gla import chunk_gla
  if not torch.cuda.is_available():
    raise RuntimeError('torch sees no CUDA device')
  q, k, v, g, d_o = (torch.from_numpy(np.asarray(x, np.float32)).cuda().to(torch.bfloat16) for x in inputs)
  cu_seqlens = None if len(starts) == 2 else torch.tensor(starts, dtype=torch.long, device='cuda')
  if not backward:
    def forward():
      with torch.no_grad():
        return chunk_gla(q, k, v, g, cu_seqlens=cu_seqlens)[0]
    return forward
  grad_inputs = [x.detach().requires_grad_() for x in (q, k, v, g)]

  def forward_backward():
    out = chunk_gla(*grad_inputs, cu_seqlens=cu_seqlens)[0]
    return torch.autograd.grad(out, grad_inputs, d_o)
  return forward_backward


def time_fla_row(row, build, iterations):
  """Fills row.ms (CUDA events over back-to-back calls, after the warm-up calls that run
  FLA's autotuning); returns the result as jax arrays (None, and the reason in row.note,
  where FLA cannot run)."""
  try:
    import torch
    row.ms, result = measure_torch(torch, build(), iterations)
  except Exception as error:
    row.note = f'unavailable: {type(error).__name__}: {str(error).splitlines()[0][:150]}'
    return None
  to_jax = lambda x: jnp.asarray(x.float().cpu().numpy())  # noqa: E731
  return to_jax(result) if hasattr(result, 'cpu') else tuple(to_jax(x) for x in result)


def format_table(rows):
  columns = ['S', 'D', 'docs', 'implementation', 'pass', 'ms', 'vs ref', 'vs FLA', 'vs cuDNN', 'err', 'note']
  lines = [[str(r.length), str(r.head_dim), str(r.documents), r.implementation, r.direction, number(r.ms, '.3f'), number(r.vs_reference, '.2f'),
            number(r.vs_fla, '.2f'), number(r.vs_cudnn, '.2f'), number(r.err, '.1e'), r.note] for r in rows]
  return text_table(columns, lines) + '\n(vs ref / vs FLA / vs cuDNN: that row\'s ms / this row\'s ms, the ratio column)'


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--length', type=int, default=None, help='sequence length (default 32768)')
  parser.add_argument('--heads', type=int, default=None, help='default 16')
  parser.add_argument('--head-dim', type=int, default=None, help='Dk = Dv (default 128)')
  parser.add_argument('--iterations', type=int, default=None, help='default 10 (quick: 2)')
  parser.add_argument('--documents', type=int, default=1, help='equal documents packed in the row (default 1)')
  parser.add_argument('--shapes', default=None,
                      help='LENGTH:HEAD_DIM[:DOCUMENTS],... in one process (instead of --length, --head-dim, --documents)')
  parser.add_argument('--no-fla', dest='fla', action='store_false', help="leave out flash-linear-attention's row")
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', '--json', dest='out', default=None, help='write the rows as JSON here')
  parser.add_argument('--quick', action='store_true', help='CPU smoke run: S=256, 2 heads of 32, reference only')
  args = parser.parse_args(argv)
  if args.documents < 1:
    parser.error(f'--documents {args.documents}: use 1 or more')
  defaults = dict(length=256, heads=2, head_dim=32, iterations=2) if args.quick else dict(
      length=32768, heads=16, head_dim=128, iterations=10)
  for key, value in defaults.items():
    if getattr(args, key) is None:
      setattr(args, key, value)
  args.shape_list = parse_shapes(parser, args)
  return args


def parse_shapes(parser, args):
  """[(length, head_dim, documents), ...] from --shapes, or the one shape of the flags."""
  if args.shapes is None:
    return [(args.length, args.head_dim, args.documents)]
  shapes = []
  for text in filter(None, (part.strip() for part in args.shapes.split(','))):
    fields = text.split(':')
    try:
      numbers = [int(field) for field in fields]
    except ValueError:
      numbers = []
    if len(numbers) not in (2, 3) or min(numbers) < 1:
      parser.error(f'--shapes {text!r}: use LENGTH:HEAD_DIM or LENGTH:HEAD_DIM:DOCUMENTS, positive integers')
    shapes.append((numbers[0], numbers[1], numbers[2] if len(numbers) == 3 else 1))
  if not shapes:
    parser.error('--shapes names no shape')
  return shapes


def main(argv=None):
  args = parse_args(argv)
  rows = []
  for length, head_dim, documents in args.shape_list:
    shape_args = argparse.Namespace(**{**vars(args), 'length': length, 'head_dim': head_dim, 'documents': documents})
    print(f'device: {device_name()}, jax {jax.__version__}; B=1, S={length}, H={args.heads}, '
          f'Dk=Dv={head_dim}, {documents} document(s), bf16, {args.iterations} iterations', flush=True)
    rows += run(shape_args, rows)
  report(rows, format_table(rows), args.out, metadata(args))

if __name__ == '__main__':
  main()
