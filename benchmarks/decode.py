"""Decoding speed: tokens/s of `sparseformer.generation` after a prompt of 1k, 8k and 32k
tokens, batch 1 and 16, for dense, window, MASFormer, gated (SeerAttention) and SSE-H
layers, with each variant's cache memory and its prefill time against one forward pass
of the model at the prompt's length.

    python benchmarks/decode.py --out decode.json        # GPU: 12 x 768, bf16
    python benchmarks/decode.py --quick                  # CPU smoke run

The model comes from `base_config()` with the flags' sizes (random weights: speed does
not depend on them). Per (variant, context, batch): the Generator compiles (timed apart),
prefills random prompts of `context` tokens and decodes --new-tokens greedy tokens; decode
tokens/s = batch x decode steps / decode seconds, the host loop included (one step per
token, each waiting for its token: what `cli.generate` does). Cache memory: the bytes of
every layer's cache (from the compiled prefill's outputs). Forward: one jitted forward
pass (the final hidden states, no logits) of the same rows, the median of --repeats.
Variants:
  dense      every layer dense (a key/value cache of every token);
  window     every layer window:--window (a ring buffer of W tokens);
  masformer  dense at every:6 of the layers, window:--window elsewhere;
  gated      every layer gated (SeerAttention gates, block selection at decode);
  sse_h      sse:4 (top 2 of 4 partitions and a shared state) with dense every:4.
"""

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

VARIANTS = ('dense', 'window', 'masformer', 'gated', 'sse_h')


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--contexts', default='1024,8192,32768')
  parser.add_argument('--batches', default='1,16')
  parser.add_argument('--new-tokens', type=int, default=128)
  parser.add_argument('--layers', type=int, default=12)
  parser.add_argument('--d-model', type=int, default=768)
  parser.add_argument('--heads', type=int, default=12)
  parser.add_argument('--kv-heads', type=int, default=4)
  parser.add_argument('--window', type=int, default=1024)
  parser.add_argument('--block-size', type=int, default=128)
  parser.add_argument('--dtype', default='bfloat16')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default='')
  parser.add_argument('--quick', action='store_true', help='CPU smoke run: tiny model, 256 tokens, batch 1 and 2')
  args = parser.parse_args(argv)
  if args.quick:
    args.contexts, args.batches, args.new_tokens, args.repeats = '256', '1,2', 8, 1
    args.layers, args.d_model, args.heads, args.kv_heads, args.window, args.block_size = 4, 64, 4, 2, 64, 64
    args.dtype = 'float32'
  args.variants = [v for v in args.variants.split(',') if v]
  unknown = set(args.variants) - set(VARIANTS)
  if unknown:
    parser.error(f'unknown variants {sorted(unknown)}; known: {", ".join(VARIANTS)}')
  args.contexts = [int(c) for c in args.contexts.split(',')]
  args.batches = [int(b) for b in args.batches.split(',')]
  return args


def variant_model_config(args, variant):
  from sparseformer.config import base_config, validate
  cfg = base_config()
  m = cfg.model
  m.num_layers, m.d_model, m.num_heads, m.num_kv_heads = args.layers, args.d_model, args.heads, args.kv_heads
  m.dtype, m.remat, m.attention.block_size = args.dtype, 'none', args.block_size
  window = f'window:{args.window}'
  m.attention.kind = {'dense': 'dense', 'window': window, 'masformer': window, 'gated': 'gated',
                      'sse_h': 'sse:4'}[variant]
  if variant == 'masformer':
    m.attention.alternate_layers = 'every:6'
  if variant == 'sse_h':
    m.attention.alternate_layers, m.attention.sse.top_k = 'every:4', 2
  validate(cfg)
  return cfg


def forward_seconds(graphdef, arrays, batch, context, repeats):
  """Median seconds of one jitted forward pass (final hidden states) over random rows."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  def hidden(arrays, tokens):
    model = nnx.merge(graphdef, arrays['params'], arrays['mechanism_state'])
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    return model.hidden(tokens, positions, None)[0]
  forward = jax.jit(hidden)
  tokens = jax.random.randint(jax.random.key(1), (batch, context), 3, 259, jnp.int32)
  forward(arrays, tokens).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    forward(arrays, tokens).block_until_ready()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def device_step_seconds(generator, prompts, args):
  """Seconds per decode step with the steps looped on the device (Generator.device_loop:
  no host wait per token), after a prefill of the same prompts; the best of --repeats."""
  import jax
  import numpy as np
  from sparseformer.generation import Sampling
  (prefill, _), _ = generator.compiled(*generator.shapes(prompts, args.new_tokens), Sampling())
  lengths = np.full(len(prompts), len(prompts[0]), np.int32)
  loop = generator.device_loop(args.new_tokens - 1)
  times = []
  for _ in range(args.repeats + 1):  # the first compiles
    tokens, cache = prefill(generator.arrays, np.asarray(prompts, np.int32), lengths, jax.random.key(0))
    jax.block_until_ready(cache)
    start = time.perf_counter()
    jax.block_until_ready(loop(generator.arrays, cache, tokens, lengths, jax.random.key(1)))
    times.append(time.perf_counter() - start)
  return min(times[1:]) / (args.new_tokens - 1)


def measure(args, variant, context, batch):
  import jax
  import numpy as np
  from sparseformer.generation import Generator
  from sparseformer.model import resolve_dims
  from sparseformer.training.state import model_arrays, model_spec
  from sparseformer import sharding
  cfg = variant_model_config(args, variant)
  dims = resolve_dims(cfg.model, 259)
  spec = model_spec(dims, sharding.make_mesh(cfg.mesh), tuple(cfg.mesh.rules))
  arrays = model_arrays(dims, jax.random.key(0))
  generator = Generator(spec.graphdef, arrays, vocab_size=259)
  prompts = np.random.default_rng(0).integers(3, 259, (batch, context)).tolist()
  compiled = generator.generate(prompts, max_new_tokens=args.new_tokens)
  runs = [generator.generate(prompts, max_new_tokens=args.new_tokens) for _ in range(args.repeats)]
  run = min(runs, key=lambda r: r.decode_seconds)
  device_step = device_step_seconds(generator, prompts, args)
  return {'variant': variant, 'context': context, 'batch': batch, 'layers': list(dims.layer_mechanisms),
          'decode_tokens_per_s': batch * run.decode_steps / run.decode_seconds,
          'decode_ms_per_step': 1e3 * run.decode_seconds / run.decode_steps,
          'device_ms_per_step': 1e3 * device_step, 'device_tokens_per_s': batch / device_step,
          'prefill_s': min(r.prefill_seconds for r in runs),
          'forward_s': forward_seconds(spec.graphdef, arrays, batch, context, args.repeats),
          'cache_mib': run.cache_bytes / 2**20, 'compile_s': compiled.compile_seconds,
          'device': jax.devices()[0].device_kind}


def format_table(rows):
  lines = ['| variant | context | batch | decode tokens/s | ms/step | device tokens/s | device ms/step | cache MiB | '
           'prefill s | forward s | prefill / forward |', '| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |']
  for r in rows:
    if 'error' in r:
      lines.append(f'| {r["variant"]} | {r["context"]} | {r["batch"]} | error: {r["error"][:80]} | | | | | | | |')
      continue
    lines.append(f'| {r["variant"]} | {r["context"]} | {r["batch"]} | {r["decode_tokens_per_s"]:.0f} | '
                 f'{r["decode_ms_per_step"]:.2f} | {r["device_tokens_per_s"]:.0f} | {r["device_ms_per_step"]:.2f} | '
                 f'{r["cache_mib"]:.1f} | {r["prefill_s"]:.3f} | '
                 f'{r["forward_s"]:.3f} | {r["prefill_s"] / r["forward_s"]:.2f} |')
  return '\n'.join(lines)


def main(argv=None):
  args = parse_args(sys.argv[1:] if argv is None else argv)
  rows = []
  for variant in args.variants:
    for context in args.contexts:
      for batch in args.batches:
        try:
          row = measure(args, variant, context, batch)
        except Exception as error:  # a variant that fails (memory, a missing decode) is a row, not the end
          row = {'variant': variant, 'context': context, 'batch': batch,
                 'error': f'{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ""}'}
        print(json.dumps(row), flush=True)
        rows.append(row)
        if args.out:
          with open(args.out, 'w') as f:
            json.dump({'args': {k: v for k, v in vars(args).items()}, 'rows': rows}, f, indent=1)
  print(format_table(rows))
  return 0


if __name__ == '__main__':
  sys.exit(main())
