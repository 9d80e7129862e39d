"""Device times of the Mosaic GPU block-sparse backward (dQ and dK/dV kernels) beside
cuDNN's attention backward, B=1, H=16, D=128, bf16.

  python3 benchmarks/backward_probe.py [--lengths 8192 32768] [--plans causal window random]

cuDNN's backward is timed as jax.grad of jax.nn.dot_product_attention(implementation='cudnn')
minus its forward. Our forward (mosaic_gpu_forward, when importable) is timed too, so the
fwd+bwd ratio against cuDNN is printed. TFLOP/s count 2 (fwd) or 5 (bwd) matmuls of
2*bq*bk*D per visited block."""

import argparse
import sys

import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

from pallas_kernels.block_sparse_attention import masks, plan_from_block_mask, plan_from_mask, reference
from pallas_kernels.block_sparse_attention import mosaic_gpu_backward

ITERATIONS = 10


def device_ms(fn, *args):
  """Median over iterations of the summed kernel times of one call, and the per-kernel split."""
  _, runs = profiler.measure(jax.jit(fn), aggregate=False, iterations=ITERATIONS)(*args)
  totals = sorted(sum(t for _, t in run) for run in runs)
  per_kernel = {}
  for name, t in runs[len(runs) // 2]:
    per_kernel[name] = per_kernel.get(name, 0.0) + t
  return totals[len(totals) // 2], per_kernel


def build_plan(name, length, block=128):
  if name == 'causal':
    return plan_from_mask(masks.Causal(), q_len=length, block_q=block, block_kv=block)
  if name == 'window':
    return plan_from_mask(masks.causal_window(1024), q_len=length, block_q=block, block_kv=block)
  n = length // block
  chosen = jax.random.bernoulli(jax.random.key(0), 0.1, (1, 1, n, n)) | jnp.eye(n, dtype=bool)
  return plan_from_block_mask(chosen, q_len=length, block_q=block, block_kv=block, mask=masks.Full())


def visited_flops(plan, head_dim, heads, matmuls):
  tiles = float(plan.kv_count.sum()) * heads // plan.plan_heads
  return tiles * matmuls * 2 * plan.block_q * plan.block_kv * head_dim


def our_forward():
  try:
    from pallas_kernels.block_sparse_attention import mosaic_gpu_forward
    return mosaic_gpu_forward.forward
  except Exception as error:  # the forward is another module's work: time what exists
    print(f'(no mosaic_gpu_forward: {error})')
    return None


def cudnn_ms(q, k, v, plan_name):
  kwargs = dict(implementation='cudnn', is_causal=True)
  if plan_name == 'window':
    kwargs['local_window_size'] = (1023, 0)
  elif plan_name != 'causal':
    return None, None
  fwd = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kwargs)
  loss = lambda q, k, v: jnp.sum(fwd(q, k, v).astype(jnp.float32))
  try:
    fwd_ms, _ = device_ms(fwd, q, k, v)
    both_ms, kernels = device_ms(jax.grad(loss, argnums=(0, 1, 2)), q, k, v)
    print('   cudnn fwd+bwd kernels:', {name[:40]: round(t, 3) for name, t in kernels.items()}, flush=True)
  except Exception as error:
    print(f'cudnn {plan_name}: {type(error).__name__}: {str(error)[:200]}')
    return None, None
  return fwd_ms, both_ms - fwd_ms


def probe(length, plan_name, forward, heads=16, head_dim=128):
  keys = jax.random.split(jax.random.key(1), 4)
  shape = (1, length, heads, head_dim)
  q, k, v, d_out = (jax.random.normal(key, shape, jnp.bfloat16) for key in keys)
  plan = build_plan(plan_name, length)
  scale = head_dim ** -0.5
  fwd = forward or (lambda *a: reference.forward(*a))
  out, lse = jax.jit(lambda q, k, v: fwd(q, k, v, None, plan, scale))(q, k, v)
  fwd_ms = device_ms(lambda q, k, v: forward(q, k, v, None, plan, scale), q, k, v)[0] if forward else None
  bwd = lambda q, k, v, out, lse, d_out: mosaic_gpu_backward.backward(q, k, v, None, plan, scale, out, lse, d_out,
                                                                     None)
  bwd_ms, kernels = device_ms(bwd, q, k, v, out, lse, d_out)
  dq_ms = sum(t for name, t in kernels.items() if 'dq' in name)
  dkv_ms = sum(t for name, t in kernels.items() if 'dkv' in name)
  cudnn_fwd, cudnn_bwd = cudnn_ms(q, k, v, plan_name)
  density = float(plan.kv_count.sum()) / (plan.num_q_blocks * plan.num_kv_blocks)
  tflops = visited_flops(plan, head_dim, heads, 5) / (bwd_ms * 1e9)
  line = (f'S={length:6d} {plan_name:7s} density={density:.3f}  bwd {bwd_ms:8.3f} ms (dq {dq_ms:7.3f}, dkv {dkv_ms:7.3f},'
          f' other {bwd_ms - dq_ms - dkv_ms:6.3f}) {tflops:6.1f} TFLOP/s')
  if fwd_ms:
    line += f' | our fwd {fwd_ms:7.3f} ms'
  if cudnn_bwd:
    line += f' | cudnn fwd {cudnn_fwd:7.3f} bwd {cudnn_bwd:7.3f} ms | bwd speed ratio ours/cudnn {cudnn_bwd / bwd_ms:.3f}'
    if fwd_ms:
      line += f' fwd+bwd ratio {(cudnn_fwd + cudnn_bwd) / (fwd_ms + bwd_ms):.3f}'
  print(line, flush=True)
  print('   kernels:', {name[:40]: round(t, 3) for name, t in kernels.items()}, flush=True)


def main(argv):
  parser = argparse.ArgumentParser()
  parser.add_argument('--lengths', type=int, nargs='+', default=[8192, 32768])
  parser.add_argument('--plans', nargs='+', default=['causal', 'window', 'random'])
  args = parser.parse_args(argv)
  forward = our_forward()
  for length in args.lengths:
    for plan_name in args.plans:
      try:
        probe(length, plan_name, forward)
      except Exception as error:
        print(f'S={length} {plan_name}: {type(error).__name__}: {str(error)[:300]}', flush=True)


if __name__ == '__main__':
  main(sys.argv[1:])
