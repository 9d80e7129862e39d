"""Attention time of the gated layer (SeerAttention gates + block-sparse kernel) against
cuDNN dense causal attention, in one run on one GPU.

    python benchmarks/gated_attention.py --out gated_attention.json     # GPU: S=32768, density 0.1, blocks 64, 128
    python benchmarks/gated_attention.py --quick                          # CPU smoke run (S=512, reference kernel)

bf16, B=1, H=16 query and kv heads, D=128, gate width 128 (= D: keys mapped per query
head, no query map, the paper's released setting), random inputs (the same arrays serve as
pre-RoPE and rotated q, k: values do not change the work), top-k selection at --density of
the causal blocks. Rows per block size:
  gate         pooling, per-head maps, block RoPE, [H, nb, nb] scores, top-k, plan lists
  gated        gate + `block_sparse_attention` (--implementation) over the gated plan
  distill      a gate-distillation pass: dense causal pass with LSE, teacher map, gate KL,
               and (fwd+bwd) the gradient of the KL for the gate parameters
  cudnn        `jax.nn.dot_product_attention(is_causal=True, implementation='cudnn')`
each forward and forward+backward (gated: dq, dk, dv; the gate takes no gradient from
the attention). `vs cuDNN` = cuDNN ms / row ms of the same pass (> 1: faster than cuDNN).
Time is device time through CUPTI (`mosaic.gpu.profiler.measure`, the kernels of one
call, median over --iterations); wall time where CUPTI is missing (CPU).
err: max |out - exact| of the gated forward on three sampled q blocks against float32
attention under the gated plan's mask (marked WRONG past 3% of the largest value);
kernel: the block_sparse_attention implementation the plan ran on (mosaic_gpu on an H100,
the jnp reference elsewhere).
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
from benchmarks.rows import device_name, number, report, text_table, time_row  # noqa: E402
from pallas_kernels.block_sparse_attention import plan_from_block_mask  # noqa: E402
from pallas_kernels.block_sparse_attention.api import select_implementation  # noqa: E402
from sparseformer.config import base_config  # noqa: E402
from sparseformer.model import resolve_dims  # noqa: E402
from sparseformer.model.attention import AttentionContext, get_mechanism  # noqa: E402
from sparseformer.model.attention import gate as gate_lib  # noqa: E402


@dataclasses.dataclass
class Row:
  length: int
  block: int
  what: str  # gate | gated | distill | cudnn (or xla)
  direction: str  # fwd | fwd+bwd
  ms: float = float('nan')
  vs_cudnn: float = float('nan')
  density: float = float('nan')  # realised fraction of the causal blocks (gated rows)
  err: float = float('nan')
  kernel: str = ''  # the block_sparse_attention implementation that ran (gated rows)
  note: str = ''


def build_layer(args, block, **gate):
  """(graphdef, state) of one gated mechanism of the benchmark's sizes; the state (its gate
  parameters) depends only on the sizes, so differently configured layers share it."""
  m = base_config().model
  m.num_layers, m.layer_attention = 1, ('gated',)
  m.num_heads = m.num_kv_heads = args.heads
  m.head_dim, m.d_model = args.head_dim, args.heads * args.head_dim
  m.attention.block_size = block
  m.attention.gate.width = args.width
  m.attention.gate.density = args.density
  for key, value in gate.items():
    m.attention.gate[key] = value
  return nnx.split(get_mechanism('gated')(resolve_dims(m, 256), 0, nnx.Rngs(0)))


def context(length, training):
  return AttentionContext(jnp.zeros((1, length), jnp.int32), None, None, None, training=training)


def gated_functions(args, length, block):
  """The state and the jitted functions of one block size."""
  graphdef, state = build_layer(args, block)
  distill_graphdef, _ = build_layer(args, block, forward='dense', distill=True)

  def plan(state, q, k):
    layer = nnx.merge(graphdef, state)
    docs = gate_lib.block_documents(None, length, block, q.shape[0])
    chosen = layer.select(layer.block_gate.scores(q, k, docs), docs)
    return plan_from_block_mask(chosen, q_len=length, block_q=block, block_kv=block)

  def gated(state, q, k, v):
    y, aux = nnx.merge(graphdef, state)(q, k, v, context(length, False), pre_rope=(q, k))
    return y, aux['stats']['gate_density']

  def gated_fwd_bwd(state, q, k, v, d_out):
    _, pull = jax.vjp(lambda q, k, v: gated(state, q, k, v)[0], q, k, v)
    return pull(d_out)

  def distill(state, q, k, v):
    _, aux = nnx.merge(distill_graphdef, state)(q, k, v, context(length, True), pre_rope=(q, k))
    return aux['losses']['gate_kl']

  functions = dict(plan=jax.jit(plan), gated=jax.jit(gated), gated_fwd_bwd=jax.jit(gated_fwd_bwd),
                   distill=jax.jit(distill), distill_fwd_bwd=jax.jit(jax.grad(distill)))
  return state, functions


def run_length(args, length):
  q, k, v, d_out = attention_bench.make_inputs(length, args.heads, args.head_dim, args.seed)
  dense_fwd, dense_fwd_bwd = (jax.jit(f) for f in dense_attend(args.baseline))
  rows = [Row(length, 0, args.baseline, 'fwd'), Row(length, 0, args.baseline, 'fwd+bwd')]
  time_row(rows[0], dense_fwd, (q, k, v), args.iterations)
  time_row(rows[1], dense_fwd_bwd, (q, k, v, d_out), args.iterations)
  for block in args.blocks:
    print(f'S={length} block {block}', flush=True)
    state, functions = gated_functions(args, length, block)
    timed = [('gate', 'fwd', functions['plan'], (state, q, k)),
             ('gated', 'fwd', functions['gated'], (state, q, k, v)),
             ('gated', 'fwd+bwd', functions['gated_fwd_bwd'], (state, q, k, v, d_out)),
             ('distill', 'fwd', functions['distill'], (state, q, k, v)),
             ('distill', 'fwd+bwd', functions['distill_fwd_bwd'], (state, q, k, v))]
    for what, direction, fn, fn_args in timed:
      row = Row(length, block, what, direction)
      result = time_row(row, fn, fn_args, args.iterations)
      if what == 'gated' and direction == 'fwd' and result is not None:
        plan = functions['plan'](state, q, k)
        row.kernel = select_implementation(None, q, k, v, None, plan).name
        check_gated(row, result, plan, (q, k, v, d_out), block)
      rows.append(row)
      print(f'  {what:8s} {direction:8s} {row.ms:9.3f} ms  {row.note}', flush=True)
  baseline = {r.direction: r.ms for r in rows if r.what == args.baseline}
  for row in rows:
    row.vs_cudnn = baseline.get(row.direction, float('nan')) / row.ms
  return rows


def dense_attend(kind):
  attend = attention_bench.dense_attend(kind, 'causal')
  return attend, attention_bench.forward_and_backward(attend)


def check_gated(row, result, plan, inputs, block):
  """Realised density and the error of the gated output on three sampled q blocks."""
  y, density = result
  row.density = float(density)
  sampled = attention_bench.sample_rows(plan.q_len, block)
  exact_out, _ = attention_bench.exact_rows(*inputs, plan, sampled)
  row.err = attention_bench.max_diff(np.asarray(y)[:, sampled], exact_out)
  if attention_bench.is_wrong(np.asarray(y)[:, sampled], exact_out):
    row.note = 'WRONG ' + row.note


def format_table(rows):
  columns = ('S', 'block', 'what', 'pass', 'ms', 'vs cuDNN', 'density', 'err', 'kernel', 'note')
  lines = [[str(r.length), str(r.block or '-'), r.what, r.direction, number(r.ms, '.3f'), number(r.vs_cudnn, '.2f'),
            number(r.density, '.3f'), number(r.err, '.2e'), r.kernel, r.note[:60]] for r in rows]
  return text_table(columns, lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--sizes', default=None, help='comma-separated sequence lengths (default 32768)')
  parser.add_argument('--blocks', default='64,128', help='comma-separated block sizes (default 64,128)')
  parser.add_argument('--density', type=float, default=0.1, help='top-k density of the causal blocks (default 0.1)')
  parser.add_argument('--heads', type=int, default=None, help='query = kv heads (default 16)')
  parser.add_argument('--head-dim', type=int, default=None, help='default 128')
  parser.add_argument('--width', type=int, default=None, help='gate width (default: the head dim)')
  parser.add_argument('--iterations', type=int, default=None)
  parser.add_argument('--baseline', default=None, choices=('cudnn', 'xla'),
                      help='dense causal baseline (default cudnn)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=None, help='write the rows as JSON here')
  parser.add_argument('--quick', action='store_true', help='CPU smoke run: S=512, 2 heads of 64, XLA baseline')
  args = parser.parse_args(argv)
  pick = lambda value, normal, smoke: value if value is not None else (smoke if args.quick else normal)  # noqa: E731
  args.sizes = [int(s) for s in pick(args.sizes, '32768', '512').split(',')]
  args.blocks = [int(b) for b in args.blocks.split(',')]
  args.heads = pick(args.heads, 16, 2)
  args.head_dim = pick(args.head_dim, 128, 64)
  args.width = args.width or args.head_dim
  args.iterations = pick(args.iterations, 20, 2)
  args.baseline = pick(args.baseline, 'cudnn', 'xla')
  return args


def main(argv=None):
  args = parse_args(argv)
  print(f'device: {device_name()}, jax {jax.__version__}; B=1, H={args.heads}, D={args.head_dim}, '
        f'gate width {args.width}, density {args.density}', flush=True)
  rows = [row for length in args.sizes for row in run_length(args, length)]
  report(rows, format_table(rows), args.out,
         dict(heads=args.heads, head_dim=args.head_dim, width=args.width, density=args.density,
              iterations=args.iterations, baseline=args.baseline))
  return rows


if __name__ == '__main__':
  main()
