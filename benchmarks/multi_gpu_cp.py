"""The context-parallel check of benchmarks/multi_gpu.py (its `cp` phase): one attention
layer over a row too long for one GPU's training run, split along the sequence over every
device, against the same kernel unsharded (a few heads) and the float32 reference (the
last queries of those heads)."""

import time



def relative_l2(got, want):
  import jax.numpy as jnp
  got, want = got.astype(jnp.float32), want.astype(jnp.float32)
  return float(jnp.linalg.norm(got - want) / jnp.maximum(jnp.linalg.norm(want), 1e-30))


def attention_grads(attend):
  """(q, k, v, cotangent) -> (y, dq, dk, dv) of `attend`."""
  import jax

  def run(q, k, v, cotangent):
    y, pullback = jax.vjp(attend, q, k, v)
    return (y,) + pullback(cotangent)
  return run


def timed(jitted, *inputs):
  """(outputs, compile seconds, run seconds) of one call."""
  import jax
  start = time.perf_counter()
  compiled = jitted.lower(*inputs).compile()
  middle = time.perf_counter()
  outputs = jax.block_until_ready(compiled(*inputs))
  return outputs, middle - start, time.perf_counter() - middle


def check_context_parallel(args, dims, spec):
  """One attention layer of `spec` over a row of --cp_len tokens split along the sequence
  over every device, against the same kernel on one device (--cp_check_heads heads) and
  the float32 reference (the last --cp_ref_queries queries of those heads)."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec
  from pallas_kernels.block_sparse_attention import block_sparse_attention, masks, plan_from_mask
  from sparseformer import sharding
  from sparseformer.config import base_config
  from sparseformer.model.attention.context_parallel import QueryOffset, previous_shards, sharded_attention
  n, t, h, d = jax.device_count(), args.cp_len, dims.num_heads, dims.head_dim
  block, c, m = dims.attention.block_size, args.cp_check_heads, args.cp_ref_queries
  dtype = jnp.bfloat16 if jax.default_backend() in ('gpu', 'tpu') else jnp.float32
  mesh = sharding.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1, 'sequence': n})
  placement = sharding.ActivationPlacement(mesh, tuple(base_config().mesh.rules))
  mask = masks.Causal() if spec == 'dense' else masks.causal_window(int(spec.partition(':')[2]))
  scale = d ** -0.5
  along_sequence = NamedSharding(mesh, PartitionSpec(None, 'sequence'))
  keys = jax.random.split(jax.random.key(11), 4)
  make = jax.jit(lambda key: jax.random.normal(key, (1, t, h, d), dtype), out_shardings=along_sequence)
  q, k, v, cotangent = (make(key) for key in keys)

  split = lambda q, k, v: sharded_attention(q, k, v, None, mask=mask, block=block, scale=scale,  # noqa: E731
                                            placement=placement)
  sharded = jax.jit(attention_grads(split), out_shardings=along_sequence)
  got, sharded_compile_s, sharded_s = timed(sharded, q, k, v, cotangent)

  device = jax.devices()[0]
  heads = lambda x: jax.device_put(x[:, :, :c], device)  # noqa: E731
  whole = jax.jit(attention_grads(lambda q, k, v: block_sparse_attention(
      q, k, v, plan_from_mask(mask, q_len=t, block_q=block, block_kv=block), scale=scale)))
  want, _, whole_s = timed(whole, *map(heads, (q, k, v, cotangent)))
  vs_kernel = {name: relative_l2(heads(a), b) for name, a, b in zip(('y', 'dq', 'dk', 'dv'), got, want)}
  del want

  tail = lambda x: jax.device_put(x[:, t - m:, :c], device)  # noqa: E731
  f32 = lambda x: heads(x).astype(jnp.float32)  # noqa: E731
  tail_plan = lambda: plan_from_mask(QueryOffset(mask, t - m), q_len=m, kv_len=t,  # noqa: E731
                                     block_q=block, block_kv=block)
  with jax.default_matmul_precision('highest'):
    reference = jax.jit(lambda q, k, v, ct: attention_grads(lambda q, k, v: block_sparse_attention(
        q, k, v, tail_plan(), scale=scale, implementation='reference'))(q, k, v, ct)[:2])
    exact, _, _ = timed(reference, tail(q).astype(jnp.float32), f32(k), f32(v), tail(cotangent).astype(jnp.float32))
  vs_reference = {name: relative_l2(tail(a), b) for name, a, b in zip(('y', 'dq'), got, exact)}
  kernel_limit, reference_limit = (1e-2, 2e-2) if dtype == jnp.bfloat16 else (1e-5, 1e-5)
  return dict(layer=spec, length=t, devices=n, shard_len=t // n, previous_shards=previous_shards(mask, n, t // n),
              heads=h, head_dim=d, dtype=jnp.dtype(dtype).name, check_heads=c, ref_queries=m,
              sharded_compile_s=sharded_compile_s, sharded_s=sharded_s, whole_s=whole_s,
              vs_kernel=vs_kernel, vs_reference=vs_reference, kernel_limit=kernel_limit,
              reference_limit=reference_limit,
              passed=max(vs_kernel.values()) <= kernel_limit and max(vs_reference.values()) <= reference_limit)
