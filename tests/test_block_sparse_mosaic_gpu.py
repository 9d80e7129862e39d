"""The Mosaic GPU implementation end to end through the public api (forward kernel, the
api's custom_vjp, dQ and dK/dV kernels) against the dense float32 oracle: output, LSE
and the gradients of q, k, v and key_bias, by relative L2 error.

The default suite runs one case in Mosaic GPU interpret mode; the `gpu` tests run the
compiled kernels on an sm90 GPU (`bash scripts/test.sh -m gpu` on the GPU machine)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mask_oracle import block_mask_oracle, mask_oracle, mask_truth, per_document
from oracles import masked_softmax_attention
from test_block_sparse_attention import compiled, oracle_or_plan_mask
from test_block_sparse_attention import numpy_random_inputs as random_inputs

from pallas_kernels.block_sparse_attention import (block_sparse_attention, masks, patterns, plan_from_block_mask,
                                                   plan_from_mask)
from pallas_kernels.block_sparse_attention.api import select_implementation


# Relative L2 error ||ours - oracle|| / ||oracle||; P and dS are rounded to the input dtype.
RELATIVE_ERROR = {jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


def relative_error(got, want):
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30)


def check_through_api(plan, allowed, q, k, v, bias, d_out, implementation):
  """allowed [B, Hp, Tq, Tk]: the plan's element mask from mask_oracle.py."""
  scale = q.shape[-1] ** -0.5
  allowed = oracle_or_plan_mask(allowed, plan, q.shape[2])
  argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)

  def ours(q, k, v, bias):
    out, lse = block_sparse_attention(q, k, v, plan, key_bias=bias, implementation=implementation, return_lse=True)
    return jnp.sum(out.astype(jnp.float32) * d_out) + 0.1 * jnp.sum(jnp.where(lse > -1e29, lse, 0.0)), (out, lse)

  def oracle(q, k, v, bias):
    out, lse = masked_softmax_attention(q, k, v, allowed, key_bias=bias, scale=scale, return_lse=True)
    return jnp.sum(out * d_out) + 0.1 * jnp.sum(jnp.where(lse > -1e29, lse, 0.0)), (out, lse)

  (_, (out, lse)), grads = jax.jit(jax.value_and_grad(ours, argnums, has_aux=True))(q, k, v, bias)
  (_, (out_ref, lse_ref)), grads_ref = jax.jit(jax.value_and_grad(oracle, argnums, has_aux=True))(q, k, v, bias)
  limit = RELATIVE_ERROR[q.dtype.type]
  errors = {'out': relative_error(out, out_ref), 'lse': relative_error(lse, lse_ref)}
  for name, got, want in zip(('dq', 'dk', 'dv', 'dbias'), grads, grads_ref):
    assert got.dtype == (q.dtype if name != 'dbias' else bias.dtype), name
    assert bool(jnp.isfinite(got.astype(jnp.float32)).all()), name
    errors[name] = relative_error(got, want)
  assert all(error < limit for error in errors.values()), errors


def test_interpret_through_the_api():
  plan = compiled(plan_from_mask, masks.Causal(), q_len=150, block_q=64, block_kv=64)
  q, k, v, bias, d_out = random_inputs(0, 1, 150, 150, 2, 1, 64, jnp.bfloat16, with_bias=True)
  check_through_api(plan, mask_oracle(masks.Causal(), q_len=150), q, k, v, bias, d_out, 'mosaic_gpu_interpret')


def test_interpret_compressed_keys_with_documents():
  """NSA's compression branch: 180 queries over 10 compressed keys (spans of 32 every 16),
  kv length unlike q length, keys' documents their own (-1 for spans crossing documents)."""
  mask = masks.CompressedCausal(32, 16)
  q_segments = np.asarray([[1] * 100 + [2] * 70 + [0] * 10])
  kv_segments = np.asarray([[1] * 5 + [-1] * 2 + [2] * 3])  # spans 0-4 in doc 1, 5-6 cross, 7-9 in doc 2
  layout = dict(q_len=180, kv_len=10, q_segment_ids=jnp.asarray(q_segments, jnp.int32),
                kv_segment_ids=jnp.asarray(kv_segments, jnp.int32))
  plan = compiled(plan_from_mask, mask, block_q=64, block_kv=64, **layout)
  q, k, v, bias, d_out = random_inputs(2, 1, 180, 10, 2, 1, 64, jnp.bfloat16, with_bias=False)
  check_through_api(plan, mask_oracle(mask, **layout), q, k, v, bias, d_out, 'mosaic_gpu_interpret')


@pytest.mark.parametrize('implementation', ['mosaic_gpu_interpret', pytest.param('mosaic_gpu', marks=pytest.mark.gpu)])
def test_gathered_summary_keys(implementation):
  """The fixed layer's gathered tiling (summary_prefix.py): 150 queries over 64 summary
  slots then the row (kv length 214), with documents; its element rule in partial tiles."""
  from pallas_kernels.block_sparse_attention.summary_prefix import gathered_plan, with_summary_keys
  segments = jnp.asarray([[1] * 90 + [2] * 60], jnp.int32)
  slots, plan = gathered_plan(32, 4, length=150, block=64, segment_ids=segments)
  layout = dict(q_len=150, kv_len=len(slots) + 150, q_segment_ids=segments,
                kv_segment_ids=with_summary_keys(segments, slots))
  q, k, v, bias, d_out = random_inputs(4, 1, 150, len(slots) + 150, 2, 1, 64, jnp.bfloat16, with_bias=False)
  check_through_api(plan, mask_oracle(plan.mask, **layout), q, k, v, bias, d_out, implementation)


def test_interpret_radial_pattern_at_document_positions():
  """Radial's element rule (a count of leading zeros per element) inside the kernel's
  partial tiles, its frames restarting with the second document (document_positions: the
  rule reads index - the document's start from the segment ids)."""
  mask, segments = patterns.Radial(16) & masks.Causal(), jnp.asarray([[1] * 67 + [2] * 83], jnp.int32)
  plan = plan_from_mask(mask, q_len=150, block_q=64, block_kv=64, segment_ids=segments, document_positions=True)
  q, k, v, bias, d_out = random_inputs(3, 1, 150, 150, 2, 1, 64, jnp.bfloat16, with_bias=False)
  allowed = per_document(lambda n: mask_truth(mask, n, n), segments)[:, None]
  check_through_api(plan, allowed, q, k, v, bias, d_out, 'mosaic_gpu_interpret')


GPU_MASKS = {
    'causal': masks.Causal(),
    'window_256': masks.causal_window(256),
    'chunked_192': masks.Chunked(192) & masks.Causal(),
    'prefix_or_window': (masks.SlidingWindow(100) | masks.GlobalPrefix(16)) & masks.Causal(),
    'radial_64': patterns.Radial(64) & masks.Causal(),
}


@pytest.mark.gpu
@pytest.mark.parametrize('mask_name', sorted(GPU_MASKS))
@pytest.mark.parametrize('group', [1, 4])
def test_masks_gpu(mask_name, group):
  plan = plan_from_mask(GPU_MASKS[mask_name], q_len=1000)
  q, k, v, bias, d_out = random_inputs(1, 2, 1000, 1000, 8, 8 // group, 128, jnp.bfloat16, with_bias=True)
  check_through_api(plan, mask_oracle(GPU_MASKS[mask_name], q_len=1000), q, k, v, bias, d_out, 'mosaic_gpu')


@pytest.mark.gpu
@pytest.mark.parametrize('plan_heads', ['one', 'kv', 'all'])
def test_random_per_head_plans_with_documents_gpu(plan_heads):
  rng = np.random.default_rng(3)
  b, t, h, hkv = 2, 777, 8, 2
  hp = {'one': 1, 'kv': hkv, 'all': h}[plan_heads]
  segment_ids = jnp.asarray(np.cumsum(rng.random((b, t)) < 0.004, axis=1).astype(np.int32))
  chosen = jnp.asarray(rng.random((b, hp, 7, 7)) < 0.5)
  plan = plan_from_block_mask(chosen, q_len=t, segment_ids=segment_ids)
  allowed = block_mask_oracle(chosen, q_len=t, segment_ids=segment_ids)
  q, k, v, bias, d_out = random_inputs(2, b, t, t, h, hkv, 64, jnp.float16, with_bias=False)
  check_through_api(plan, allowed, q, k, v, bias, d_out, 'mosaic_gpu')


@pytest.mark.gpu
def test_mosaic_gpu_is_the_default_on_hopper():
  plan = plan_from_mask(masks.Causal(), q_len=256)
  q, k, v, _, _ = random_inputs(0, 1, 256, 256, 2, 2, 128, jnp.bfloat16, with_bias=False)
  assert select_implementation(None, q, k, v, None, plan).name == 'mosaic_gpu'
