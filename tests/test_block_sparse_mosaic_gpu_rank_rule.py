"""The Mosaic GPU kernels with a plan's rank rule (key_rank >= q_threshold): forward
against reference.forward and the dense oracle under the explicit mask, dQ/dK/dV/d(bias)
against reference.backward and the dense oracle's gradients, in GPU interpret
mode on CPU; lowering for CUDA on any host; larger `gpu` cases on an sm90 GPU. Plans
come from random ranks and thresholds (rank_rule_plan) and from dynamic mask attention's
top-w selection (dynamic_mask_plan)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_block_sparse_attention import plan_dense_mask, random_inputs
from test_block_sparse_mosaic_gpu_backward import BACKWARDS, FUSED_SLOW_ON_CPU, PATHS
from test_block_sparse_mosaic_gpu_backward import check as check_backward
from test_block_sparse_mosaic_gpu_forward import check_forward
from test_block_sparse_rank_rule import explicit_mask, rank_rule_plan

from pallas_kernels.block_sparse_attention import mosaic_gpu_forward
from sparseformer.model.attention.dynamic_mask_plan import dynamic_mask_plan


def top_w_plan(seed, batch, kv_heads, length, block, window, documents):
  """A dynamic mask plan. Its mask has no source here but the plan, so its dense checks
  render the plan (plan_dense_mask); test_dynamic_mask.py checks the selection itself."""
  rng = np.random.default_rng(seed)
  scores = jnp.asarray(rng.integers(0, 5, (batch, kv_heads, length)).astype(np.float32))
  segments = None
  if documents:
    segments = jnp.asarray(np.cumsum(rng.random((batch, length)) < 0.01, axis=1).astype(np.int32))
  return dynamic_mask_plan(scores, window, block_q=block, block_kv=block, segment_ids=segments)[0]


RANK_LEVELS = 8  # tied ranks: a kernel's rank or threshold off by one changes many elements
# (seed, B, T, H, Hkv, plan heads, block_q, block_kv, documents)
FORWARD_CASES = [(0, 1, 200, 2, 2, 2, 128, 64, True),
                 pytest.param((1, 2, 130, 2, 1, 1, 64, 64, False), marks=pytest.mark.slow)]


@pytest.mark.parametrize('case', FORWARD_CASES)
def test_forward_random_rank_rule_interpret(case):
  seed, b, t, h, hkv, hp, bq, bk, docs = case
  plan, _, base_allowed = rank_rule_plan(seed, b, hp, t, bq, bk, docs, RANK_LEVELS)
  allowed = explicit_mask(plan, base_allowed, h)
  np.testing.assert_array_equal(np.asarray(plan_dense_mask(plan, h)), allowed)
  q, k, v, bias, _ = random_inputs(seed, b, t, t, h, hkv, 64, jnp.bfloat16, True)
  check_forward(plan, q, k, v, bias, interpret=True, persistent=seed % 2 == 1, allowed=allowed)


def test_forward_top_w_plan_interpret():
  plan = top_w_plan(4, 1, 2, 192, 64, 40, documents=True)
  q, k, v, bias, _ = random_inputs(2, 1, 192, 192, 4, 2, 64, jnp.bfloat16, True)
  check_forward(plan, q, k, v, bias, interpret=True)


def test_per_query_head_rank_plans_are_unavailable_with_the_reason():
  plan, _, _ = rank_rule_plan(0, 1, 4, 128, 64, 64, False)
  q, k, v, _, _ = random_inputs(0, 1, 128, 128, 4, 2, 64, jnp.bfloat16, False)
  assert '1 or Hkv' in mosaic_gpu_forward.unavailable(q, k, v, None, plan, interpret=True)


@pytest.mark.parametrize('persistent,block', [(False, 128), (True, 64)])
def test_forward_lowers_for_cuda(persistent, block, monkeypatch):
  monkeypatch.setattr(mosaic_gpu_forward.common, 'is_hopper_gpu', lambda: True)
  b, t, h, hkv, d = 1, 2000, 8, 2, 128
  plan = top_w_plan(3, b, hkv, t, block, 256, documents=True)
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16)
  bias = jax.ShapeDtypeStruct((b, hkv, t), jnp.float32)
  run = lambda q, k, v, bias: mosaic_gpu_forward.forward(q, k, v, bias, plan, 0.1, persistent=persistent)
  lowered = jax.jit(run).trace(q, kv, kv, bias).lower(lowering_platforms=('cuda',))
  assert 'mosaic_gpu' in lowered.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize('block', [64, 128])
@pytest.mark.parametrize('group', [1, 4])
def test_forward_top_w_plans_gpu(block, group):
  h, t = 8, 1500
  hkv = h // group
  plan = top_w_plan(block + group, 2, hkv, t, block, 300, documents=group == 4)
  q, k, v, bias, _ = random_inputs(group, 2, t, t, h, hkv, 128, jnp.bfloat16, True)
  check_forward(plan, q, k, v, bias, interpret=False, persistent=block == 64)


# Backward (both paths: dQ and dK/dV kernels; fused) -----------------------------------------------------------

@pytest.mark.parametrize('path', FUSED_SLOW_ON_CPU)
@pytest.mark.parametrize('case', FORWARD_CASES)
def test_backward_random_rank_rule_interpret(case, path):
  seed, b, t, h, hkv, hp, bq, bk, docs = case
  plan, _, base_allowed = rank_rule_plan(seed, b, hp, t, bq, bk, docs, RANK_LEVELS)
  q, k, v, bias, d_out = random_inputs(seed, b, t, t, h, hkv, 64, jnp.bfloat16, True)
  check_backward(plan, q, k, v, bias, d_out, interpret=True, allowed=explicit_mask(plan, base_allowed, h), path=path)


@pytest.mark.parametrize('path', PATHS)
def test_backward_top_w_plan_interpret(path):
  plan = top_w_plan(4, 1, 2, 192, 64, 40, documents=True)
  q, k, v, bias, d_out = random_inputs(4, 1, 192, 192, 4, 2, 64, jnp.bfloat16, True)
  check_backward(plan, q, k, v, bias, d_out, interpret=True, path=path)


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('block', [64, 128])
def test_backward_lowers_for_cuda(block, path):
  b, t, h, hkv, d = 1, 2000, 8, 2, 128
  plan = top_w_plan(5, b, hkv, t, block, 256, documents=True)
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16)
  bias = jax.ShapeDtypeStruct((b, hkv, t), jnp.float32)
  lse = jax.ShapeDtypeStruct((b, h, t), jnp.float32)
  run = lambda q, k, v, bias, out, lse, d_out: BACKWARDS[path](q, k, v, bias, plan, 0.1, out, lse, d_out, lse)
  lowered = jax.jit(run).trace(q, kv, kv, bias, q, lse, q).lower(lowering_platforms=('cuda',))
  assert lowered.as_text().count('mosaic_gpu') >= 2


@pytest.mark.gpu
@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('block', [64, 128])
@pytest.mark.parametrize('group', [1, 4])
def test_backward_top_w_plans_gpu(block, group, path):
  h, t = 8, 1500
  hkv = h // group
  plan = top_w_plan(block + group, 2, hkv, t, block, 300, documents=group == 4)
  q, k, v, bias, d_out = random_inputs(group, 2, t, t, h, hkv, 128, jnp.bfloat16, True)
  check_backward(plan, q, k, v, bias, d_out, interpret=False, path=path)
