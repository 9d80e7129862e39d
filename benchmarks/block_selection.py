"""One layer of the block-selection mechanisms (NSA, MoBA, InfLLM-V2) against cuDNN dense
causal attention and flash-linear-attention's Triton NSA (`parallel_nsa`), in one run on
one GPU, at the NSA paper's shape.

    python benchmarks/block_selection.py --out block_selection.json        # GPU: 32k and 64k
    python benchmarks/block_selection.py --quick                            # CPU smoke run

bf16, B=1, 64 query heads, 4 kv heads, D=128 (the paper's GQA shape), random inputs.
Rows per length, forward and forward+backward:
  nsa        our `nsa` layer, the paper's settings (compression l=32 stride 16, 16
             selected blocks of 64, window 512, 64-token kernel blocks for the selection,
             128-token tiles for the compression and window branches: nsa.branch_block),
             everything it computes: compression, selection scores, the three branches and
             the gates; backward gives dq, dk, dv, the layer input's gradient and the
             parameters'
  nsa_b64    the same with every branch on 64-token tiles (nsa.branch_block 64), as before
             branch_block existed
  nsa_nowin  the same without the window branch (window 0 is not an option: a window of
             one kernel block), the shape of FLA's row below
  moba       our `moba` layer, blocks of 512, top-3 (the paper's 8k setting)
  infllm_v2  our `infllm_v2` layer, 16 selection blocks of 64, sparse
  cudnn      `jax.nn.dot_product_attention(is_causal=True, implementation='cudnn')`, GQA
  fla_nsa    flash-linear-attention's `parallel_nsa` (torch, Triton), 16 blocks of 64,
             its compression and top-k inside, window_size 0 (its window branch needs
             flash-attn, absent on the image); its first call autotunes
`vs cuDNN` = cuDNN ms / row ms of the same pass, `vs FLA` = fla_nsa ms / row ms (> 1:
faster). Device time through CUPTI for JAX (median of --iterations), CUDA events for torch.
On a GPU each of our rows also prints its eight longest kernels (one call, CUPTI): where a
layer's time goes (scores, compressed attention, the branches, XLA's fusions).
"""

import argparse
import dataclasses
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import attention as attention_bench  # noqa: E402
from benchmarks.rows import (device_name, kernel_breakdown, number, report, text_table, time_row,  # noqa: E402
                             write_json)
from sparseformer.config import base_config  # noqa: E402
from sparseformer.model import resolve_dims  # noqa: E402
from sparseformer.model.attention import AttentionContext, get_mechanism  # noqa: E402


@dataclasses.dataclass
class Row:
  length: int
  what: str
  direction: str  # fwd | fwd+bwd
  ms: float = float('nan')
  vs_cudnn: float = float('nan')
  vs_fla: float = float('nan')
  note: str = ''
  kernels: str = ''  # the longest kernels of one call (GPU: CUPTI), also in the JSON


LAYERS = {  # what -> (kind, {model.attention field: value})
    'nsa': ('nsa', {}),
    'nsa_b64': ('nsa', {'nsa.branch_block': 64}),
    'nsa_nowin': ('nsa', {'nsa.window': 64}),
    'moba': ('moba', {'moba.block': 512, 'moba.top_k': 3}),
    'infllm_v2': ('infllm_v2', {'infllm_v2.select_block': 64, 'infllm_v2.select_count': 16,
                                'infllm_v2.sparse_from': 1}),
}


def build_layer(args, kind, options):
  m = base_config().model
  m.num_layers, m.layer_attention, m.attention.block_size = 1, (kind,), args.block
  m.num_heads, m.num_kv_heads, m.head_dim = args.heads, args.kv_heads, args.head_dim
  m.d_model = args.heads * args.head_dim
  for path, value in options.items():
    section, name = path.split('.')
    m.attention[section][name] = value
  return get_mechanism(kind)(resolve_dims(m, 256), 0, nnx.Rngs(0))


def layer_functions(layer, length, needs):
  """(forward, forward+backward) of (params, q, k, v, x[, d_out]) for a mechanism layer."""
  graph, params, rest = nnx.split(layer, nnx.Param, ...)
  ctx = AttentionContext(jnp.zeros((1, length), jnp.int32), None, None, None, training=True)

  def forward(params, q, k, v, x):
    inputs = {}
    if 'pre_rope' in needs:
      inputs['pre_rope'] = (q, k)
    if 'layer_input' in needs:
      inputs['layer_input'] = x
    return nnx.merge(graph, params, rest)(q, k, v, ctx, **inputs)[0]

  def forward_backward(params, q, k, v, x, d_out):
    _, pull = jax.vjp(forward, params, q, k, v, x)
    return pull(d_out)
  return params, jax.jit(forward), jax.jit(forward_backward)


def mechanism_rows(args, length, what, inputs, rows):
  kind, options = LAYERS[what]
  if kind == 'nsa' and args.quick:
    options = {**options, 'nsa.window': 128}
  try:
    layer = build_layer(args, kind, options)
  except Exception as error:  # a mechanism missing from this checkout is reported, the others still run
    rows += [Row(length, what, d, note=f'{type(error).__name__}: {error}'[:160]) for d in ('fwd', 'fwd+bwd')]
    return
  params, forward, forward_backward = layer_functions(layer, length, layer.extra_inputs)
  q, k, v, x, d_out = inputs
  for direction, fn, fn_args in (('fwd', forward, (params, q, k, v, x)),
                                 ('fwd+bwd', forward_backward, (params, q, k, v, x, d_out))):
    row = Row(length, what, direction)
    if time_row(row, fn, fn_args, args.iterations) is not None and (kernels := kernel_breakdown(fn, fn_args, 8)):
      row.kernels = kernels
      print(f'  {what} {direction} {row.ms:.3f} ms; longest kernels (ms): {kernels}', flush=True)
    rows.append(row)


def cudnn_rows(args, length, inputs, rows):
  q, k, v, _, d_out = inputs
  implementation = 'cudnn' if jax.default_backend() == 'gpu' else 'xla'

  def forward(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)

  def forward_backward(q, k, v, d_out):
    _, pull = jax.vjp(forward, q, k, v)
    return pull(d_out)
  for direction, fn, fn_args in (('fwd', jax.jit(forward), (q, k, v)),
                                 ('fwd+bwd', jax.jit(forward_backward), (q, k, v, d_out))):
    row = Row(length, 'cudnn' if implementation == 'cudnn' else 'xla', direction)
    time_row(row, fn, fn_args, args.iterations)
    rows.append(row)


def fla_rows(args, length, inputs, rows):
  """flash-linear-attention's parallel_nsa, or rows saying why not."""
  try:
    import torch
    from fla.ops.nsa import parallel_nsa
    if not torch.cuda.is_available():
      raise RuntimeError('no CUDA device for torch')
  except Exception as error:
    rows += [Row(length, 'fla_nsa', d, note=f'unavailable: {type(error).__name__}: {error}'[:160])
             for d in ('fwd', 'fwd+bwd')]
    return
  q, k, v, _, d_out = inputs
  q, k, v, d_out = (torch.from_numpy(np.asarray(x, np.float32)).cuda().to(torch.bfloat16) for x in (q, k, v, d_out))
  gates = [torch.rand(1, length, args.heads, device='cuda', dtype=torch.bfloat16) for _ in range(3)]
  grad_inputs = [x.detach().requires_grad_() for x in (q, k, v, *gates)]

  def forward():
    with torch.no_grad():
      return parallel_nsa(q, k, v, *gates, block_counts=16, block_size=64, window_size=0)

  def forward_backward():
    out = parallel_nsa(*grad_inputs, block_counts=16, block_size=64, window_size=0)
    return torch.autograd.grad(out, grad_inputs, d_out, allow_unused=True)  # the window gate: window_size=0
  for direction, fn in (('fwd', forward), ('fwd+bwd', forward_backward)):
    row = Row(length, 'fla_nsa', direction)
    try:
      row.ms, _ = attention_bench.measure_torch(torch, fn, args.iterations)
    except Exception as error:
      row.note = f'{type(error).__name__}: {str(error).splitlines()[0][:160]}'
    rows.append(row)


def fill_ratios(rows):
  base = {(r.length, r.direction, r.what): r.ms for r in rows}
  for r in rows:
    dense = base.get((r.length, r.direction, 'cudnn'), base.get((r.length, r.direction, 'xla'), np.nan))
    r.vs_cudnn = dense / r.ms
    r.vs_fla = base.get((r.length, r.direction, 'fla_nsa'), np.nan) / r.ms


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--lengths', default='32768,65536')
  parser.add_argument('--heads', type=int, default=64)
  parser.add_argument('--kv-heads', type=int, default=4)
  parser.add_argument('--head-dim', type=int, default=128)
  parser.add_argument('--block', type=int, default=64)
  parser.add_argument('--rows', default='nsa,nsa_nowin,moba,infllm_v2,cudnn,fla_nsa')
  parser.add_argument('--iterations', type=int, default=10)
  parser.add_argument('--out', default='')
  parser.add_argument('--dkv-splits', type=int, default=0,
                      help="parts per dK/dV list in the Hopper backward (0: the kernel's own rule, "
                           "mosaic_gpu_backward.dkv_splits); to find the rule's best setting")
  parser.add_argument('--quick', action='store_true', help='CPU smoke run: 512 tokens, 8 heads, 2 kv heads, D=32')
  args = parser.parse_args(argv)
  if args.dkv_splits < 0:
    parser.error('--dkv-splits: use 0 (the rule) or a number of parts >= 1')
  if args.quick:
    args.lengths, args.heads, args.kv_heads, args.head_dim, args.iterations = '512', 8, 2, 32, 1
  return args


def make_inputs(args, length):
  keys = jax.random.split(jax.random.key(0), 5)
  shape_q = (1, length, args.heads, args.head_dim)
  shape_kv = (1, length, args.kv_heads, args.head_dim)
  return (jax.random.normal(keys[0], shape_q, jnp.bfloat16), jax.random.normal(keys[1], shape_kv, jnp.bfloat16),
          jax.random.normal(keys[2], shape_kv, jnp.bfloat16),
          jax.random.normal(keys[3], (1, length, args.heads * args.head_dim), jnp.bfloat16),
          jax.random.normal(keys[4], shape_q, jnp.bfloat16))


def force_dkv_splits(parts):
  """Every unfused dK/dV list of the Hopper backward cut into `parts` (0: leave the rule)."""
  if parts:
    from pallas_kernels.block_sparse_attention import mosaic_gpu_backward
    mosaic_gpu_backward.dkv_splits = lambda num_programs, list_length, fused=False, spanned=False: 1 if fused else parts


def main(argv=None):
  args = parse_args(argv)
  force_dkv_splits(args.dkv_splits)
  wanted = args.rows.split(',')
  rows = []
  meta = dict(heads=args.heads, kv_heads=args.kv_heads, head_dim=args.head_dim, block=args.block,
              iterations=args.iterations, dkv_splits=args.dkv_splits or 'rule')
  def measured(rows):
    print_last(rows)
    if args.out:  # every finished row kept, should a later one run out of time
      fill_ratios(rows)
      write_json(args.out, dict(device=device_name(), jax=jax.__version__, **meta), rows)

  for length in (int(n) for n in args.lengths.split(',')):
    inputs = make_inputs(args, length)
    if 'cudnn' in wanted:
      cudnn_rows(args, length, inputs, rows)
      measured(rows)
    for what in wanted:
      if what in LAYERS:
        mechanism_rows(args, length, what, inputs, rows)
        measured(rows)
    if 'fla_nsa' in wanted and not args.quick:
      fla_rows(args, length, inputs, rows)
      measured(rows)
  fill_ratios(rows)
  lines = [[str(r.length), r.what, r.direction, number(r.ms, '.2f'), number(r.vs_cudnn, '.2f'),
            number(r.vs_fla, '.2f'), r.note] for r in rows]
  table = text_table(['length', 'what', 'pass', 'ms', 'vs cuDNN', 'vs FLA', 'note'], lines)
  report(rows, table, args.out, meta)
  return rows


def print_last(rows):
  """The row pair (fwd, fwd+bwd) just measured."""
  print(f'{rows[-1].length} {rows[-1].what}: '
        + ', '.join(f'{r.direction} {r.ms:.2f} ms {r.note}'.rstrip() for r in rows[-2:]), flush=True)


if __name__ == '__main__':
  main()
