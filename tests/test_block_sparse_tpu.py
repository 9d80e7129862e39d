"""The Mosaic TPU kernels of block-sparse attention (tpu.py), run in TPU interpret mode on
CPU: outputs, LSE and every gradient against dense attention (through the public api) and
against the reference's forward/backward; and lowered to Mosaic for a TPU target. Interpret
mode is slow, so the default cases are few and each covers several features; the wider
sweeps are marked slow."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mask_oracle import block_mask_oracle, mask_oracle, mask_truth, per_document
from test_block_sparse_attention import MASKS, check_against_dense, compiled
from test_block_sparse_attention import numpy_random_inputs as random_inputs

from pallas_kernels.block_sparse_attention import masks, plan_from_block_mask, plan_from_mask, reference, tpu
from pallas_kernels.block_sparse_attention.api import IMPLEMENTATIONS, select_implementation
from pallas_kernels.block_sparse_attention.reference import EMPTY_ROW_LSE


INTERPRET = 'tpu_interpret'


def random_block_plan(seed, batch, length, block_q, block_kv, plan_heads, density, documents, mask=masks.Causal()):
  """(plan, [B, Hp, T, T] the element mask it should stand for, built without the plan)."""
  rng = np.random.default_rng(seed)
  nq, nk = -(-length // block_q), -(-length // block_kv)
  block_mask = rng.random((batch, plan_heads, nq, nk)) < density
  segments = None
  if documents:
    segments = np.cumsum(rng.random((batch, length)) < 0.15, axis=1).astype(np.int32) + 1
  sizes = dict(q_len=length, block_q=block_q, block_kv=block_kv, mask=mask, segment_ids=segments)
  return compiled(plan_from_block_mask, jnp.asarray(block_mask), **sizes), block_mask_oracle(block_mask, **sizes)


def check_against_reference(plan, q, k, v, bias, d_out, scale=0.3, tol=2e-5):
  """tpu.forward/backward (interpret mode) against reference.forward/backward, with a nonzero d_lse."""
  out, lse = tpu.forward(q, k, v, bias, plan, scale, interpret=True)
  out_ref, lse_ref = jax.jit(reference.forward, static_argnums=5)(q, k, v, bias, plan, scale)
  np.testing.assert_allclose(out, out_ref, rtol=tol, atol=tol)
  np.testing.assert_allclose(lse, lse_ref, rtol=tol, atol=tol)
  d_lse = jax.random.normal(jax.random.key(5), lse.shape)
  grads = tpu.backward(q, k, v, bias, plan, scale, out, lse, d_out, d_lse, interpret=True)
  grads_ref = jax.jit(reference.backward, static_argnums=5)(q, k, v, bias, plan, scale, out_ref, lse_ref, d_out,
                                                            d_lse)
  for name, got, want in zip(('dq', 'dk', 'dv', 'dbias'), grads, grads_ref):
    assert got.shape == want.shape and got.dtype == want.dtype, name
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=name)
  return out, lse, grads


# Through the public api against dense attention. Most cases share B=2, T=22, H=4, D=8, so
# the compiled dense oracle is shared.


def test_causal_ragged_with_key_bias():
  q, k, v, bias, d_out = random_inputs(0, 2, 22, 22, 4, 4, 8, jnp.float32, with_bias=True)
  plan = compiled(plan_from_mask, MASKS['causal'], q_len=22, block_q=8, block_kv=8, batch=2)
  allowed = mask_oracle(MASKS['causal'], q_len=22, batch=2)
  check_against_dense(plan, q, k, v, bias, d_out, implementation=INTERPRET, allowed=allowed)


def test_documents_and_window_or_prefix_per_kv_head_plan():
  """Segment ids (differing per batch row), a window|prefix element rule, a plan per kv head (Hp = Hkv)."""
  q, k, v, bias, d_out = random_inputs(1, 2, 22, 22, 4, 2, 8, jnp.float32, with_bias=True)
  plan, allowed = random_block_plan(1, 2, 22, 8, 16, plan_heads=2, density=0.8, documents=True,
                                    mask=MASKS['window_or_prefix'])
  check_against_dense(plan, q, k, v, bias, d_out, implementation=INTERPRET, allowed=allowed)


def test_bfloat16_chunked_group_of_eight_at_document_positions():
  """Chunks restart with the second document (document_positions: the kernels' element
  rule reads index - the document's start from the segment ids)."""
  q, k, v, bias, d_out = random_inputs(3, 1, 24, 24, 8, 1, 16, jnp.bfloat16, with_bias=False)
  mask, segments = MASKS['chunked'], jnp.asarray([[1] * 5 + [2] * 19], jnp.int32)
  plan = compiled(plan_from_mask, mask, q_len=24, block_q=16, block_kv=8, segment_ids=segments,
                  document_positions=True)
  allowed = per_document(lambda n: mask_truth(mask, n, n), segments)[:, None]
  out, _, grads = check_against_dense(plan, q, k, v, bias, d_out, dtype=jnp.bfloat16, implementation=INTERPRET,
                                      allowed=allowed)
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)


# Directly against reference.py (cheaper than the dense oracle).


def test_per_query_head_plan_with_fully_masked_rows_matches_reference():
  """Hp = H: the 4 query heads of a GQA group walk different lists into the same dK/dV block;
  q blocks with no key give zero output and gradient and LSE = EMPTY_ROW_LSE."""
  q, k, v, bias, d_out = random_inputs(2, 2, 22, 22, 4, 1, 8, jnp.float32, with_bias=True)
  plan, _ = random_block_plan(2, 2, 22, 8, 8, plan_heads=4, density=0.5, documents=False)
  assert (plan.kv_count == 0).any(), 'the case needs q blocks that see no key'
  out, lse, (dq, _, _, _) = check_against_reference(plan, q, k, v, bias, d_out)
  empty = np.repeat(np.asarray(plan.kv_count == 0), 8, axis=-1)[..., :22]  # [B, H, Tq] as Hp = H
  assert (np.asarray(lse)[empty] == EMPTY_ROW_LSE).all()
  assert (np.asarray(out).transpose(0, 2, 1, 3)[empty] == 0).all()
  assert (np.asarray(dq).transpose(0, 2, 1, 3)[empty] == 0).all()


def test_short_query_and_cross_lengths_match_reference():
  """A query length shorter than one block and Tq != Tk."""
  q, k, v, bias, d_out = random_inputs(4, 1, 5, 19, 4, 2, 8, jnp.float32, with_bias=True)
  plan = compiled(plan_from_mask, masks.SlidingWindow(6, 2), q_len=5, kv_len=19, block_q=8, block_kv=8)
  check_against_reference(plan, q, k, v, bias, d_out)


def test_tpu_needs_lane_sized_blocks_and_interpret_mode_does_not():
  q, k, v, _, _ = random_inputs(0, 2, 22, 22, 4, 4, 8, jnp.float32, False)
  small = compiled(plan_from_mask, masks.Causal(), q_len=22, block_q=8, block_kv=8, batch=2)
  assert 'multiples of 128' in IMPLEMENTATIONS['tpu'].unavailable(q, k, v, None, small)
  large = compiled(plan_from_mask, masks.Causal(), q_len=22, block_q=128, block_kv=256, batch=2)
  assert IMPLEMENTATIONS['tpu'].unavailable(q, k, v, None, large) is None
  lists = (np.zeros((2, 8, 128), np.int32), np.zeros((2, 8, 128, 128), np.int16), np.zeros((2, 8, 128, 128), np.int8))
  huge = dataclasses.replace(large, kv_count=lists[0], kv_index=lists[1], kv_full=lists[2])  # 786 KB of lists
  assert 'SMEM' in IMPLEMENTATIONS['tpu'].unavailable(q, k, v, None, huge)
  assert select_implementation(INTERPRET, q, k, v, None, small).name == INTERPRET
  if jax.default_backend() != 'tpu':
    with pytest.raises(ValueError, match='runs on tpu'):
      select_implementation('tpu', q, k, v, None, large)


def test_kernels_lower_to_mosaic_for_a_tpu_target():
  """Lowering for a TPU v5e from this host: block shapes, SMEM lists and every op of the three
  kernel bodies pass Pallas's Mosaic lowering (libtpu's own compile needs a TPU and is not run)."""
  b, t, h, hkv, d = 1, 300, 4, 2, 128
  q, out = jnp.zeros((b, t, h, d), jnp.bfloat16), jnp.zeros((b, t, h, d), jnp.bfloat16)
  k = v = jnp.zeros((b, t, hkv, d), jnp.bfloat16)
  bias, lse = jnp.zeros((b, hkv, t)), jnp.zeros((b, h, t))
  plan = plan_from_mask(MASKS['window_or_prefix'], q_len=t, block_q=128, block_kv=128,
                        segment_ids=jnp.ones((b, t), jnp.int32))
  target = jax.sharding.AbstractDevice(device_kind='TPU v5e', num_cores=1, platform='tpu')
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ('x',), abstract_device=target)):
    forward = jax.export.export(jax.jit(lambda *a: tpu.forward(*a, 0.1)), platforms=['tpu'])(q, k, v, bias, plan)
    backward = jax.export.export(jax.jit(lambda q, k, v, bias, plan, out, lse: tpu.backward(
        q, k, v, bias, plan, 0.1, out, lse, out, lse)), platforms=['tpu'])(q, k, v, bias, plan, out, lse)
  assert forward.mlir_module().count('tpu_custom_call') == 1
  assert backward.mlir_module().count('tpu_custom_call') == 2


@pytest.mark.slow
@pytest.mark.parametrize('mask_name', sorted(MASKS))
@pytest.mark.parametrize('group', [1, 2, 4, 8])
def test_mask_plans_match_dense(mask_name, group):
  q, k, v, bias, d_out = random_inputs(0, 2, 21, 21, 8, 8 // group, 16, jnp.float32, with_bias=True)
  plan = plan_from_mask(MASKS[mask_name], q_len=21, block_q=8, block_kv=4, batch=2)
  allowed = mask_oracle(MASKS[mask_name], q_len=21, batch=2)
  check_against_dense(plan, q, k, v, bias, d_out, implementation=INTERPRET, allowed=allowed)


@pytest.mark.slow
@pytest.mark.parametrize('seed', range(6))
@pytest.mark.parametrize('plan_heads', ['one', 'kv_heads', 'heads'])
def test_random_block_plans_match_dense(seed, plan_heads):
  rng = np.random.default_rng(seed)
  length = int(rng.integers(1, 40))
  block_q, block_kv = (int(x) for x in rng.choice([8, 16, 32], 2))
  group = int(rng.choice([1, 2, 4]))
  h, hkv = 4, 4 // group
  hp = {'one': 1, 'kv_heads': hkv, 'heads': h}[plan_heads]
  with_bias = bool(seed % 2)
  q, k, v, bias, d_out = random_inputs(seed, 2, length, length, h, hkv, 8, jnp.float32, with_bias)
  plan, allowed = random_block_plan(seed, 2, length, block_q, block_kv, hp, density=rng.random(),
                                    documents=seed % 3 == 0)
  check_against_dense(plan, q, k, v, bias, d_out, implementation=INTERPRET, allowed=allowed)


@pytest.mark.slow
@pytest.mark.parametrize('block', [64, 128])
def test_bfloat16_large_blocks_window(block):
  q, k, v, bias, d_out = random_inputs(6, 1, 200, 200, 2, 1, 32, jnp.bfloat16, with_bias=True)
  plan = plan_from_mask(masks.causal_window(70), q_len=200, block_q=block, block_kv=block)
  check_against_dense(plan, q, k, v, bias, d_out, dtype=jnp.bfloat16, implementation=INTERPRET,
                      allowed=mask_oracle(masks.causal_window(70), q_len=200))
