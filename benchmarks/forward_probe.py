"""Device time of the Mosaic GPU block-sparse forward against cuDNN's dense causal forward.

    python3 benchmarks/forward_probe.py [--lengths 8192 32768] [--iterations 20]

B=1, H=16, D=128, bf16. Plans (blocks 128 x 128): dense causal, causal window of 1024,
and a random plan keeping ~10 % of each row's causal blocks plus the diagonal (one list
per head), each under the grid and the persistent schedule. Times are CUPTI kernel times
per call (profiler.measure, median over the iterations, every kernel of the call summed:
the plan packing is included). TFLOP/s count the tiles the kernel computes
(4 * 128 * 128 * D per tile and head).
"""

import argparse
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.mosaic.gpu import profiler

from pallas_kernels.block_sparse_attention import masks, plan_from_block_mask, plan_from_mask, reference
from pallas_kernels.block_sparse_attention import mosaic_gpu_forward

B, H, D, BLOCK = 1, 16, 128, 128


def random_causal_plan(length, keep, seed=0):
  n = length // BLOCK
  rng = np.random.default_rng(seed)
  chosen = (rng.random((1, H, n, n)) < keep) | np.eye(n, dtype=bool)
  return plan_from_block_mask(jnp.asarray(chosen), q_len=length, block_q=BLOCK, block_kv=BLOCK, mask=masks.Causal())


def plans(length):
  return {
      'causal': plan_from_mask(masks.Causal(), q_len=length, block_q=BLOCK, block_kv=BLOCK),
      'window1024': plan_from_mask(masks.causal_window(1024), q_len=length, block_q=BLOCK, block_kv=BLOCK),
      'random10%': random_causal_plan(length, 0.1),
  }


def median_ms(fn, args, iterations):
  _, times = profiler.measure(fn, iterations=iterations)(*args)
  return float(np.median(times))


def tile_tflops(plan, ms):
  tiles = float(jnp.sum(plan.kv_count)) * (H // plan.plan_heads)
  return tiles * 4 * BLOCK * BLOCK * D / (ms * 1e-3) / 1e12


def check_against_reference(fn, plan, q, k, v, expected):
  out, lse = fn(q, k, v, plan)
  out_ref, lse_ref = expected
  out_err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - out_ref.astype(jnp.float32))))
  lse_err = float(jnp.max(jnp.abs(lse - lse_ref)))
  return out_err, lse_err


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--lengths', type=int, nargs='+', default=[8192, 32768])
  parser.add_argument('--iterations', type=int, default=20)
  parser.add_argument('--check-up-to', type=int, default=8192, help='compare with reference.forward up to this length')
  args = parser.parse_args()
  print(subprocess.run(['bash', '-c', 'ptxas --version | tail -1; nvidia-smi --query-gpu=name,clocks.max.sm '
                        '--format=csv,noheader'], capture_output=True, text=True).stdout.strip())
  print(jax.devices()[0].device_kind, 'jax', jax.__version__)
  scale = D ** -0.5
  schedules = {
      'grid': jax.jit(lambda q, k, v, plan: mosaic_gpu_forward.forward(q, k, v, None, plan, scale)),
      'persistent': jax.jit(lambda q, k, v, plan: mosaic_gpu_forward.forward(q, k, v, None, plan, scale,
                                                                             persistent=True)),
  }
  cudnn = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, implementation='cudnn', is_causal=True))
  rows = []
  for length in args.lengths:
    keys = jax.random.split(jax.random.key(length), 3)
    q, k, v = (jax.random.normal(key, (B, length, H, D), jnp.bfloat16) for key in keys)
    cudnn_ms = median_ms(cudnn, (q, k, v), args.iterations)
    causal_tflops = 2 * B * H * length * length * D / (cudnn_ms * 1e-3) / 1e12
    rows.append((length, 'cudnn causal', '', 1.0, cudnn_ms, causal_tflops, 1.0, ''))
    for name, plan in plans(length).items():
      density = float(jnp.mean(plan.kv_count)) / plan.num_kv_blocks
      expected = reference.forward(q, k, v, None, plan, scale) if length <= args.check_up_to else None
      for schedule, ours in schedules.items():
        ms = median_ms(ours, (q, k, v, plan), args.iterations)
        note = ''
        if expected is not None:
          note = 'max|out-ref| %.3g max|lse-ref| %.3g' % check_against_reference(ours, plan, q, k, v, expected)
        rows.append((length, name, schedule, density, ms, tile_tflops(plan, ms), cudnn_ms / ms, note))
        print(rows[-1], flush=True)
  print(f'\n{"S":>6} {"plan":<13} {"schedule":<10} {"density":>7} {"ms":>8} {"TFLOP/s":>8} {"cudnn_ms/ms":>11}  check')
  for length, name, schedule, density, ms, tflops, ratio, note in rows:
    print(f'{length:>6} {name:<13} {schedule:<10} {density:>7.3f} {ms:>8.3f} {tflops:>8.1f} {ratio:>11.2f}  {note}')


if __name__ == '__main__':
  main()
