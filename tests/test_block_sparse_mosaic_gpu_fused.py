"""The fused kv-major Mosaic GPU backward (mosaic_gpu_backward_fused.py) against
reference.backward and the dense float32 oracle: dq, dk, dv and d(key_bias) on mask plans,
documents, random block plans, GQA groups, ragged lengths, fully masked rows; bitwise
equal dq over two runs; CUDA lowering of the hardware path (semaphores, atomics) on any host.

On CPU the kernel runs in Mosaic GPU interpret mode, which runs CTAs one after another in
grid order: the order the GMEM semaphores enforce on a GPU. Interpret mode has no
semaphores or atomics, so there the turn wait/signal are left out and the add is a
read-add-write (see the module docstring); the `gpu` tests run the real thing.
128-key blocks (two compute warpgroups, three interpreter threads) are `slow` here, as in
test_block_sparse_mosaic_gpu_backward.py."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_block_sparse_attention import random_inputs
from test_block_sparse_mosaic_gpu import check_through_api
import test_block_sparse_mosaic_gpu_backward as backward_tests
from test_block_sparse_mosaic_gpu_backward import build_plan, documents, on_gpu, random_block_plan
from test_block_sparse_rank_rule import rank_rule_plan

from pallas_kernels.block_sparse_attention import masks, plan_from_block_mask, plan_from_mask, reference
from pallas_kernels.block_sparse_attention import mosaic_gpu_backward_fused as fused


def fused_gradients(plan, q, k, v, bias, d_out, d_lse, interpret):
  """The fused backward at the reference forward's out and lse."""
  scale = q.shape[-1] ** -0.5
  out, lse = reference.forward(q, k, v, bias, plan, scale)
  return fused.backward(q, k, v, bias, plan, scale, out, lse, d_out, d_lse, interpret=interpret)


# The two-kernel backward's check, run on the fused backward.
check = functools.partial(backward_tests.check, module=fused)


def test_window_ragged_gqa_pair_with_key_bias():
  q, k, v, bias, d_out = random_inputs(0, 1, 120, 120, 2, 1, 64, jnp.bfloat16, with_bias=True)
  check(plan_from_mask(masks.causal_window(70), q_len=120, block_q=64, block_kv=64), q, k, v, bias, d_out, dense=False)


def test_dq_is_bitwise_equal_over_two_runs():
  q, k, v, _, d_out = random_inputs(1, 1, 128, 128, 1, 1, 64, jnp.bfloat16, with_bias=False)
  plan = random_block_plan(2, 128, 64, 64, plan_heads=1, density=0.7)
  first, second = (fused_gradients(plan, q, k, v, None, d_out, None, not on_gpu())[0] for _ in range(2))
  assert np.array_equal(np.asarray(first), np.asarray(second))


def test_turns_count_earlier_kv_blocks_of_each_q_block():
  plan = plan_from_mask(masks.causal_window(100), q_len=256, block_q=64, block_kv=64)
  count, entries, _ = fused.unfused._group_lists(plan, 1, 1, 2)
  entries, _ = fused._descending(count, entries, jnp.zeros_like(entries))
  turns = fused._visit_turns(plan, 1, 1, entries)
  # kv block 1 is seen by q blocks 1, 2, 3 (window 100 spans 3 blocks), last first; it is
  # the second kv block of q blocks 1 (after 0), 2 (after 0) and the first of q block 3.
  assert entries[0, 0, 1, :3].tolist() == [3, 2, 1]
  assert turns[0, 0, 1, :3].tolist() == [0, 1, 1]


def test_shared_memory_limit_is_a_reason():
  q, k, v, _, _ = random_inputs(0, 1, 128, 128, 2, 1, 128, jnp.bfloat16, with_bias=False)
  plan = plan_from_mask(masks.Causal(), q_len=128, block_q=128, block_kv=128)
  assert fused.unavailable(q, k, v, None, plan) is None
  assert 'shared memory' in fused.unavailable(q, k, v, None, plan, stages=3)


LOWERING_CASES = [(128, 128, 128, True, True),
                  pytest.param((64, 128, 64, False, False), marks=pytest.mark.slow)]


@pytest.mark.parametrize('case', LOWERING_CASES, ids=lambda c: 'bq{}_bk{}_d{}_bias{}_docs{}'.format(*c))
def test_lowers_for_cuda_on_any_host(case):
  """The hardware path (GMEM semaphores, atomic adds, transposed dS wgmma) through Mosaic
  GPU lowering without a GPU; not ptxas."""
  block_q, block_kv, head_dim, with_bias, with_documents = case
  b, t, h, hkv = 2, 1000, 8, 2
  segments = jnp.zeros((b, t), jnp.int32) if with_documents else None
  plan = plan_from_mask(masks.Causal(), q_len=t, block_q=block_q, block_kv=block_kv, batch=b, segment_ids=segments)
  q = jax.ShapeDtypeStruct((b, t, h, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, hkv, head_dim), jnp.bfloat16)
  bias = jax.ShapeDtypeStruct((b, hkv, t), jnp.float32) if with_bias else None
  lse = jax.ShapeDtypeStruct((b, h, t), jnp.float32)
  run = lambda q, k, v, bias, out, lse, d_out: fused.backward(q, k, v, bias, plan, 0.1, out, lse, d_out, lse)
  lowered = jax.jit(run).trace(q, kv, kv, bias, q, lse, q).lower(lowering_platforms=('cuda',))
  assert 'block_sparse_fused_bwd' in lowered.as_text()


SLOW_CASES = [
    # mask or plan, length, heads, kv heads, head_dim, block_q, block_kv, dtype, bias, documents
    ('causal', 256, 4, 2, 64, 128, 128, jnp.bfloat16, True, False),
    ('window', 200, 4, 2, 64, 128, 64, jnp.float16, True, True),
    ('chunked', 256, 4, 4, 128, 64, 128, jnp.bfloat16, False, False),
    ('random_1', 256, 4, 2, 64, 64, 64, jnp.bfloat16, True, True),
    ('random_kv', 200, 4, 2, 64, 64, 128, jnp.bfloat16, True, False),
    ('random_h', 256, 4, 2, 64, 128, 64, jnp.float16, True, False),
]


@pytest.mark.slow
@pytest.mark.parametrize('case', SLOW_CASES, ids=[c[0] for c in SLOW_CASES])
def test_larger_interpret_cases(case):
  name, length, heads, kv_heads, head_dim, block_q, block_kv, dtype, with_bias, with_documents = case
  q, k, v, bias, d_out = random_inputs(11, 1, length, length, heads, kv_heads, head_dim, dtype, with_bias)
  plan = build_plan(name, length, heads, kv_heads, block_q, block_kv, documents(length, 3) if with_documents else None)
  check(plan, q, k, v, bias, d_out)


@pytest.mark.slow
def test_fully_masked_rows_get_zero_gradients():
  q, k, v, bias, d_out = random_inputs(3, 1, 128, 128, 4, 2, 64, jnp.bfloat16, with_bias=True)
  chosen = jnp.zeros((1, 2, 2, 2), bool).at[:, 1, 1, :].set(True)  # plan head 0 sees nothing at all
  plan = plan_from_block_mask(chosen, q_len=128, block_q=64, block_kv=64)
  dq, dk, dv, dbias = check(plan, q, k, v, bias, d_out)
  assert (dq[:, :, :2] == 0).all() and (dk[:, :, 0] == 0).all() and (dv[:, :, 0] == 0).all()
  assert (dbias[:, 0] == 0).all() and (dq[:, :64, 2:] == 0).all()


@pytest.mark.slow
def test_rank_rule_plan_against_the_reference():
  plan, _ = rank_rule_plan(4, 1, 2, 192, 64, 64, documents=True)
  q, k, v, bias, d_out = random_inputs(4, 1, 192, 192, 4, 2, 64, jnp.bfloat16, with_bias=True)
  check(plan, q, k, v, bias, d_out, dense=False)


@pytest.mark.slow
def test_interpret_through_the_api():
  plan = plan_from_mask(masks.Causal(), q_len=150, block_q=64, block_kv=64)
  q, k, v, bias, d_out = random_inputs(0, 1, 150, 150, 2, 1, 64, jnp.bfloat16, with_bias=True)
  check_through_api(plan, q, k, v, bias, d_out, 'mosaic_gpu_fused_interpret')


@pytest.mark.gpu
@pytest.mark.parametrize('mask', [masks.Causal(), masks.causal_window(1024)], ids=['causal', 'window_1024'])
def test_gpu_gradients_are_bitwise_equal_over_runs(mask):
  """Up to 32 kv blocks add into each q block here, in CTAs resident at the same time; an
  add out of turn would change dq's low bits."""
  q, k, v, bias, d_out = random_inputs(8, 2, 4096, 4096, 8, 2, 128, jnp.bfloat16, with_bias=True)
  plan = plan_from_mask(mask, q_len=4096, block_q=128, block_kv=128, batch=2)
  d_lse = jax.random.normal(jax.random.key(7), (2, 8, 4096))
  runs = [fused_gradients(plan, q, k, v, bias, d_out, d_lse, False) for _ in range(3)]
  for other in runs[1:]:
    for name, first, again in zip(('dq', 'dk', 'dv', 'dbias'), runs[0], other):
      assert np.array_equal(np.asarray(first), np.asarray(again)), name


@pytest.mark.gpu
def test_gpu_through_the_api():
  plan = plan_from_mask(masks.causal_window(500), q_len=3000, block_q=128, block_kv=128)
  q, k, v, bias, d_out = random_inputs(9, 1, 3000, 3000, 8, 2, 128, jnp.bfloat16, with_bias=True)
  check_through_api(plan, q, k, v, bias, d_out, 'mosaic_gpu_fused')
