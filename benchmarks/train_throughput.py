"""Training throughput: MASFormer against all-dense (cuDNN) attention, one full train step.

    python3 benchmarks/train_throughput.py --out throughput.json          # 12 x 768, 32k, on the GPU
    python3 benchmarks/train_throughput.py --quick                        # CPU smoke run

The model comes from `base_config()` with the flags' sizes (the byte tokenizer's
vocabulary unless --vocab-size, bf16 compute, float32 parameters) and the step is the
trainer's (`training.assembly.build_train_step`: forward, backward, gradient clipping,
AdamW, jitted with the trainer's shardings and activation placement). Rows are
unpacked (segment ids None: one document per row), so dense layers run cuDNN flash
attention on a GPU; window layers run the block-sparse kernels. Variants:
  dense      every layer dense;
  masformer  dense at the layers --full-layers names (every:6 of 12: layers 5 and 11),
             window:--window elsewhere;
  window     every layer window:--window;
  routing    every layer routing:--clusters (issue 8): half the kv groups' heads local
             (window:--window), the others routed (shared QK, causal selection). Not in
             the default --variants.
Each variant runs in its own subprocess, so peak memory (`peak_bytes_in_use` of the
device; the process's max RSS on CPU, which has no device statistics) is its own. Step
time: the median over --repeats of (wall time of --steps back-to-back steps with one wait
at the end) / --steps, after --warmup steps. A variant that runs out of memory with
--remat is retried once with --remat-fallback. A last subprocess times one attention layer
alone (forward+backward of the mechanism at the model's shapes) to split the step into
attention and the rest.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TARGET_RATIO = 2.5  # issue 5: MASFormer tokens/s >= 2.5 x all-dense
VARIANTS = ('dense', 'masformer', 'window', 'routing')
DEFAULT_VARIANTS = 'dense,masformer,window'
OUT_OF_MEMORY = ('RESOURCE_EXHAUSTED', 'Out of memory', 'out of memory')
RESULT_PREFIX = 'RESULT '
STARTED = time.perf_counter()


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--layers', type=int, default=12)
  parser.add_argument('--d-model', type=int, default=768)
  parser.add_argument('--heads', type=int, default=12)
  parser.add_argument('--kv-heads', type=int, default=12)
  parser.add_argument('--seq-len', type=int, default=32768)
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--window', type=int, default=1024)
  parser.add_argument('--vocab-size', type=int, default=0, help='0: the byte tokenizer (padded to 384)')
  parser.add_argument('--full-layers', default='every:6', help='MASFormer dense layers (model.attention.alternate_layers)')
  parser.add_argument('--block-size', type=int, default=128)
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--remat', default='none', choices=('none', 'dots', 'full'))
  parser.add_argument('--remat-fallback', default='full', choices=('none', 'dots', 'full'))
  parser.add_argument('--variants', default=DEFAULT_VARIANTS, help=f'a comma-separated subset of {",".join(VARIANTS)}')
  parser.add_argument('--clusters', type=int, default=64, help='routing:K clusters (32k / 64 = 512 tokens a cluster)')
  parser.add_argument('--steps', type=int, default=10, help='back-to-back steps per timed repeat')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--probe-calls', type=int, default=10, help='calls per attention-layer timing; 0 skips')
  parser.add_argument('--child-timeout', type=float, default=240.0, help='seconds per variant subprocess')
  parser.add_argument('--kernel-profile', action='store_true',
                      help='also time one step kernel by kernel (CUPTI): device time by kind, the longest kernels')
  parser.add_argument('--out', default=None, help='write the rows as JSON here')
  parser.add_argument('--quick', action='store_true', help='tiny sizes for a CPU smoke run')
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)  # a variant, or 'attention'
  args = parser.parse_args(argv)
  if args.quick:
    args.layers, args.d_model, args.heads, args.kv_heads, args.seq_len = 2, 64, 4, 4, 256
    args.window, args.full_layers, args.block_size, args.clusters = 64, 'every:2', 64, 4
    args.steps, args.repeats, args.warmup, args.probe_calls = 2, 1, 1, 2
  args.variants = [v for v in args.variants.split(',') if v]
  unknown = set(args.variants) - set(VARIANTS)
  if unknown:
    parser.error(f'unknown variants {sorted(unknown)}; known: {", ".join(VARIANTS)}')
  return args


# ---------------------------------------------------------------------------------------
# One variant, inside its own process


def variant_config(args, variant, remat):
  from sparseformer.config import base_config, validate
  cfg = base_config()
  m, t = cfg.model, cfg.train
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = args.layers, args.d_model, args.heads, args.kv_heads
  m.dtype, m.remat, m.attention.block_size, m.vocab_size = args.dtype, remat, args.block_size, args.vocab_size
  window = f'window:{args.window}'
  m.attention.kind = {'dense': 'dense', 'routing': routing_spec(args)}.get(variant, window)
  m.attention.routing.local_window = args.window
  m.attention.alternate_layers = args.full_layers if variant == 'masformer' else ''
  cfg.data.seq_len, t.global_batch_size, t.steps = args.seq_len, args.batch, 1000
  validate(cfg)
  return cfg


def routing_spec(args):
  return f'routing:{args.clusters}'


def build_step(cfg):
  """The trainer's jitted train step (training/assembly.py), a fresh state, the model spec
  and the batch sharding."""
  from sparseformer import sharding
  from sparseformer.training.assembly import build_train_step
  parts = build_train_step(cfg, sharding.make_mesh(cfg.mesh))
  return parts.step, parts.fresh_state(cfg.seed), parts.spec, parts.batch_sharding


def random_batch(batch, seq_len, vocab, batch_sharding):
  """Unpacked rows of random tokens: every row one document, so no segment ids."""
  import jax
  import jax.numpy as jnp
  tokens = jax.random.randint(jax.random.key(0), (batch, seq_len + 1), 0, vocab, jnp.int32)
  arrays = {'tokens': tokens[:, :-1], 'targets': tokens[:, 1:],
            'positions': jnp.broadcast_to(jnp.arange(seq_len, dtype=jnp.int32), (batch, seq_len)),
            'loss_mask': jnp.ones((batch, seq_len), jnp.float32)}
  return {**jax.device_put(arrays, batch_sharding), 'segment_ids': None}


def peak_memory():
  """(GiB, source): the device allocator's peak, else this process's max RSS."""
  import jax
  stats = jax.local_devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    return stats['peak_bytes_in_use'] / 2**30, 'device'
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 'host_rss'


def timed_steps(step, state, batch, count):
  """(seconds per step over `count` back-to-back steps, state, metrics)."""
  import jax
  start = time.perf_counter()
  for _ in range(count):
    state, metrics = step(state, batch)
  jax.block_until_ready((state, metrics))
  return (time.perf_counter() - start) / count, state, metrics


def block_sparse_implementation(dims, args):
  """The block-sparse implementation a window layer of this model runs, by name."""
  import jax
  from pallas_kernels.block_sparse_attention import masks, plan_from_mask
  from pallas_kernels.block_sparse_attention.api import select_implementation
  q = jax.ShapeDtypeStruct((args.batch, args.seq_len, dims.num_heads, dims.head_dim), dims.compute_dtype)
  kv = jax.ShapeDtypeStruct((args.batch, args.seq_len, dims.num_kv_heads, dims.head_dim), dims.compute_dtype)
  plan = plan_from_mask(masks.causal_window(args.window), q_len=args.seq_len, block_q=args.block_size,
                        block_kv=args.block_size)
  return select_implementation(None, q, kv, kv, None, plan).name


def attention_kernels(dims, args):
  """'dense=cudnn window=mosaic_gpu' style summary of what the layers run."""
  from sparseformer.model.attention.dense import causal_implementation
  kinds = {spec.partition(':')[0] for spec in dims.layer_mechanisms}
  names = {'dense': lambda: causal_implementation(dims.compute_dtype),
           'window': lambda: block_sparse_implementation(dims, args),
           'routing': lambda: block_sparse_implementation(dims, args)}
  return ' '.join(f'{kind}={names[kind]()}' for kind in sorted(kinds))


def progress(message):
  """A timestamped line on stderr: the parent shows the last ones if this process times out."""
  print(f'[{time.perf_counter() - STARTED:7.1f} s] {message}', file=sys.stderr, flush=True)


def run_variant(args, variant, remat):
  import jax
  progress(f'{variant} remat={remat} on {jax.devices()[0].device_kind}')
  cfg = variant_config(args, variant, remat)
  step, state, spec, batch_sharding = build_step(cfg)
  batch = random_batch(args.batch, args.seq_len, spec.dims.vocab_size, batch_sharding)
  jax.block_until_ready(state)
  progress(f'state initialised; {spec.dims.layer_mechanisms}; compiling the step')
  start = time.perf_counter()
  lowered = step.lower(state, batch)
  progress(f'lowered in {time.perf_counter() - start:.1f} s')
  compiled = lowered.compile()
  compile_s = time.perf_counter() - start
  progress(f'compiled in {compile_s:.1f} s (lowering included)')
  first_s, state, _ = timed_steps(compiled, state, batch, args.warmup)
  progress(f'{args.warmup} warm-up steps, {1e3 * first_s:.1f} ms each')
  per_step = []
  for _ in range(args.repeats):
    seconds, state, metrics = timed_steps(compiled, state, batch, args.steps)
    per_step.append(seconds)
    progress(f'{args.steps} steps, {1e3 * seconds:.1f} ms each')
  step_s = statistics.median(per_step)
  peak_gib, memory_source = peak_memory()
  profile = kernel_profile(compiled, state, batch) if args.kernel_profile else {}
  return dict(**profile, variant=variant, layers=' '.join(spec.dims.layer_mechanisms), kernels=attention_kernels(spec.dims, args),
              params=int(spec.param_count), remat=remat, compile_s=compile_s, step_ms=1e3 * step_s,
              step_ms_repeats=[1e3 * s for s in per_step], tokens_per_s=args.batch * args.seq_len / step_s,
              peak_gib=peak_gib, memory_source=memory_source, loss=float(metrics['loss']), note='')


# Substrings of kernel names by kind (XLA's cuBLAS/cuDNN calls, our Pallas kernels).
KERNEL_KINDS = (('attention', ('block_sparse', 'flash', 'fmha', 'sdpa', 'attention', 'chunk_', 'state_grads',
                               'log_decay_grads')),
                ('matmul', ('gemm', 'nvjet', 'cutlass', 'xmma', 'cublas', 'wgmma', 'sm90_')))


def kernel_kind(name):
  lowered = name.lower()
  return next((kind for kind, marks in KERNEL_KINDS if any(mark in lowered for mark in marks)), 'other')


def kernel_profile(compiled, state, batch, longest=12):
  """One more step timed kernel by kernel: device ms in all and by kind, and the longest
  kernels; {} where CUPTI is missing."""
  from benchmarks.rows import kernel_times
  _, times = kernel_times(lambda: compiled(state, batch))
  if not times:
    return {}
  by_kind = {}
  for name, ms in times.items():
    by_kind[kernel_kind(name)] = by_kind.get(kernel_kind(name), 0.0) + ms
  return dict(device_ms=sum(times.values()), device_ms_by_kind=by_kind, kernel_count=len(times),
              longest_kernels=[[name, ms] for name, ms in list(times.items())[:longest]])


def kernel_profile_lines(rows):
  lines = []
  for row in rows:
    if 'device_ms' in row:
      kinds = ', '.join(f'{kind} {ms:.1f}' for kind, ms in sorted(row['device_ms_by_kind'].items()))
      longest = ', '.join(f'{name[:40]} {ms:.2f}' for name, ms in row['longest_kernels'][:6])
      lines.append(f'{row["variant"]}: kernels {row["device_ms"]:.1f} ms of a {row["step_ms"]:.1f} ms step '
                   f'({kinds}); longest: {longest}')
  return lines


# ---------------------------------------------------------------------------------------
# One attention layer alone


def time_calls(fn, inputs, calls):
  import jax
  jax.block_until_ready(fn(*inputs))
  start = time.perf_counter()
  for _ in range(calls):
    result = fn(*inputs)
  jax.block_until_ready(result)
  return 1e3 * (time.perf_counter() - start) / calls


def mechanism_forward(args, spec, ctx):
  """(q, k, v) -> y of one layer of `spec` (layer 0 of a model whose first layer runs it);
  mechanisms that route on pre-RoPE vectors get q, k as those."""
  from flax import nnx
  from sparseformer.model import resolve_dims
  from sparseformer.model.attention import get_mechanism
  variant = 'routing' if spec == routing_spec(args) else 'masformer'
  layer = get_mechanism(spec)(resolve_dims(variant_config(args, variant, args.remat).model, 259), 0, nnx.Rngs(0))
  if getattr(layer, 'needs_pre_rope', False):
    return lambda q, k, v: layer(q, k, v, ctx, pre_rope=(q, k))[0]
  return lambda q, k, v: layer(q, k, v, ctx)[0]


def attention_layer_times(args):
  """{spec: {'fwd_ms', 'fwd_bwd_ms'}} of one mechanism call at the model's shapes."""
  import jax
  import jax.numpy as jnp
  from sparseformer.model import resolve_dims
  from sparseformer.model.attention import AttentionContext
  cfg = variant_config(args, 'masformer', args.remat)
  dims = resolve_dims(cfg.model, 259)
  keys = jax.random.split(jax.random.key(1), 3)
  shape = (args.batch, args.seq_len)
  q = jax.random.normal(keys[0], shape + (dims.num_heads, dims.head_dim), dims.compute_dtype)
  k, v = (jax.random.normal(key, shape + (dims.num_kv_heads, dims.head_dim), dims.compute_dtype) for key in keys[1:])
  ctx = AttentionContext(jnp.zeros(shape, jnp.int32), None, None, None)
  times = {}
  specs = ('dense', f'window:{args.window}') + ((routing_spec(args),) if 'routing' in args.variants else ())
  for spec in specs:
    forward = jax.jit(mechanism_forward(args, spec, ctx))
    loss = lambda q, k, v: forward(q, k, v).astype(jnp.float32).sum()
    both = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    times[spec] = dict(fwd_ms=time_calls(forward, (q, k, v), args.probe_calls),
                       fwd_bwd_ms=time_calls(both, (q, k, v), args.probe_calls))
    progress(f'{spec}: {times[spec]}')
  return times


def child_main(args):
  if args.child == 'attention':
    result = attention_layer_times(args)
  else:
    variant, _, remat = args.child.partition(':')
    result = run_variant(args, variant, remat)
  print(RESULT_PREFIX + json.dumps(result), flush=True)


# ---------------------------------------------------------------------------------------
# The parent: one subprocess per variant, then the table


def child_argv(argv, child):
  return [sys.executable, os.path.abspath(__file__), *argv, '--child', child]


def run_child(argv, child, timeout):
  """(result dict or None, error text)."""
  env = {**os.environ, 'PYTHONPATH': os.pathsep.join(filter(None, [os.path.dirname(os.path.dirname(
      os.path.abspath(__file__))), os.environ.get('PYTHONPATH')]))}
  try:
    done = subprocess.run(child_argv(argv, child), capture_output=True, text=True, timeout=timeout, env=env)
  except subprocess.TimeoutExpired as expired:
    return None, f'timed out after {timeout:.0f} s; its last lines:\n' + as_text(expired.stderr)[-1500:]
  for line in reversed(done.stdout.splitlines()):
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):]), ''
  return None, (done.stderr.strip() or done.stdout.strip() or f'exit {done.returncode}')


def as_text(output):
  """TimeoutExpired carries bytes (or None) whatever run()'s text= said."""
  if isinstance(output, bytes):
    return output.decode(errors='replace')
  return output or ''


def measure_variant(argv, args, variant):
  row, error = run_child(argv, f'{variant}:{args.remat}', args.child_timeout)
  if row is None and any(marker in error for marker in OUT_OF_MEMORY) and args.remat_fallback != args.remat:
    print(f'{variant}: out of memory with remat={args.remat}; retrying with remat={args.remat_fallback}', flush=True)
    row, error = run_child(argv, f'{variant}:{args.remat_fallback}', args.child_timeout)
  if row is None:
    print(f'{variant} failed:\n{error[-3000:]}', flush=True)
    lines = error.strip().splitlines() or ['failed']
    timed_out = lines[0].startswith('timed out')
    summary = lines[0].partition(';')[0] if timed_out else lines[-1]
    if timed_out and len(lines) > 1:
      summary += ' (last: ' + lines[-1].strip() + ')'
    return dict(variant=variant, note=f'FAILED: {summary[:240]}')
  print(f'{variant}: {json.dumps(row)}', flush=True)  # kept even if a later variant hangs
  return row


def add_ratios(rows):
  dense = next((r for r in rows if r['variant'] == 'dense' and 'tokens_per_s' in r), None)
  for row in rows:
    if dense and 'tokens_per_s' in row:
      row['vs_dense'] = row['tokens_per_s'] / dense['tokens_per_s']


def target_line(rows):
  ratio = next((r.get('vs_dense') for r in rows if r['variant'] == 'masformer'), None)
  if ratio is None:
    return f'target masformer >= {TARGET_RATIO}x dense tokens/s: not measured'
  verdict = 'met' if ratio >= TARGET_RATIO else 'missed'
  return f'target masformer >= {TARGET_RATIO}x dense tokens/s: {ratio:.2f}x, {verdict}'


def format_table(rows):
  header = f'{"variant":<10} {"params":>10} {"remat":>5} {"compile_s":>9} {"step_ms":>9} {"tokens/s":>10} ' \
           f'{"peak_GiB":>8} {"loss":>6} {"vs_dense":>8}  kernels'
  lines = [header]
  for r in rows:
    if 'tokens_per_s' not in r:
      lines.append(f'{r["variant"]:<10} {r["note"]}')
      continue
    memory = f'{r["peak_gib"]:.2f}' + ('' if r['memory_source'] == 'device' else '*')
    lines.append(f'{r["variant"]:<10} {r["params"]:>10,} {r["remat"]:>5} {r["compile_s"]:>9.1f} {r["step_ms"]:>9.1f} '
                 f'{r["tokens_per_s"]:>10,.0f} {memory:>8} {r["loss"]:>6.3f} {r.get("vs_dense", float("nan")):>8.2f}'
                 f'  {r["kernels"]}')
  if any(r.get('memory_source') == 'host_rss' for r in rows):
    lines.append('* process max RSS (no device memory statistics on this platform)')
  return '\n'.join(lines)


def attention_share_lines(times, rows, args):
  """One attention layer's time, and the model's attention time against its step time."""
  dense, window = times['dense']['fwd_bwd_ms'], times[f'window:{args.window}']['fwd_bwd_ms']
  lines = [f'one attention layer, fwd / fwd+bwd ms: dense {times["dense"]["fwd_ms"]:.2f} / {dense:.2f}, '
           f'window:{args.window} {times[f"window:{args.window}"]["fwd_ms"]:.2f} / {window:.2f}']
  if routing_spec(args) in times:
    routing = times[routing_spec(args)]
    lines[0] += f', {routing_spec(args)} {routing["fwd_ms"]:.2f} / {routing["fwd_bwd_ms"]:.2f}'
  for row in rows:
    specs = row.get('layers', '').split()
    if 'tokens_per_s' not in row or any(s not in times for s in specs):
      continue
    attention_ms = sum(times[s]['fwd_bwd_ms'] for s in specs)
    lines.append(f'{row["variant"]}: attention fwd+bwd {attention_ms:.1f} ms of a {row["step_ms"]:.1f} ms step '
                 f'({100 * attention_ms / row["step_ms"]:.0f}%); rest {row["step_ms"] - attention_ms:.1f} ms')
  return lines


def write_json(path, args, rows, attention_times, summary):
  meta = {k: v for k, v in vars(args).items() if k not in ('out', 'child')}
  with open(path, 'w') as handle:
    json.dump(dict(meta=meta, rows=rows, attention_layer=attention_times, summary=summary), handle, indent=1)


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  args = parse_args(argv)
  if args.child:
    return child_main(args)
  parent_argv = strip_option(argv, '--out')
  rows = [measure_variant(parent_argv, args, variant) for variant in args.variants]
  add_ratios(rows)
  attention_times = None
  if args.probe_calls:
    attention_times, error = run_child(parent_argv, 'attention', args.child_timeout)
    if attention_times is None:
      print(f'attention layer timing failed:\n{error[-3000:]}', flush=True)
  summary = [target_line(rows)] + (attention_share_lines(attention_times, rows, args) if attention_times else [])
  summary += kernel_profile_lines(rows)
  print(f'\nB={args.batch} T={args.seq_len} layers={args.layers} d_model={args.d_model} heads={args.heads}/'
        f'{args.kv_heads} vocab={args.vocab_size or "byte"} window={args.window} '
        f'alternate_layers={args.full_layers} dtype={args.dtype} block={args.block_size}; '
        f'step = median of {args.repeats} x {args.steps} back-to-back steps')
  print(format_table(rows))
  print('\n'.join(summary))
  if args.out:
    write_json(args.out, args, rows, attention_times, summary)
  return 0 if all('tokens_per_s' in r for r in rows) else 1


def strip_option(argv, name):
  """argv without `name VALUE` / `name=VALUE`."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg == name:
      skip = True
    elif not arg.startswith(name + '='):
      out.append(arg)
  return out


if __name__ == '__main__':
  sys.exit(main())
