"""Block-sparse attention against dense float32 masked softmax attention: outputs, LSE and
every gradient (q, k, v, key_bias), on random plans, ragged lengths, GQA groups, documents
and fully masked rows."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mask_oracle import block_mask_oracle, mask_oracle, per_query_head
from oracles import masked_softmax_attention

from pallas_kernels.block_sparse_attention import (block_sparse_attention, masks, plan_from_block_mask,
                                                   plan_from_block_scores, plan_from_mask)
from pallas_kernels.block_sparse_attention.plan import EMPTY, FULL, PARTIAL, dense_mask, mask_block_kinds
from pallas_kernels.block_sparse_attention.reference import EMPTY_ROW_LSE

TOLERANCE = {jnp.float32: dict(rtol=2e-5, atol=2e-5), jnp.bfloat16: dict(rtol=2e-2, atol=2e-2)}


def plan_dense_mask(plan, num_heads):
  """[B, H, Tq, Tk] rendered from the plan itself (per query head). Circular as an oracle
  (the kernel is then only checked to follow the plan): use it only for plans with no
  other source of their mask; mask_oracle.py builds it from masks, blocks and scores."""
  b, hp = plan.kv_count.shape[:2]
  per_plan_head = np.stack([np.stack([dense_mask(plan, i, j) for j in range(hp)]) for i in range(b)])
  return jnp.asarray(np.repeat(per_plan_head, num_heads // hp, axis=1))


def random_inputs(seed, b, tq, tk, h, hkv, d, dtype, with_bias):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (b, tq, h, d), dtype)
  k = jax.random.normal(keys[1], (b, tk, hkv, d), dtype)
  v = jax.random.normal(keys[2], (b, tk, hkv, d), dtype)
  bias = jax.random.normal(keys[3], (b, hkv, tk), jnp.float32) if with_bias else None
  d_out = jax.random.normal(keys[4], (b, tq, h, d), jnp.float32)
  return q, k, v, bias, d_out


def numpy_random_inputs(seed, b, tq, tk, h, hkv, d, dtype, with_bias):
  """random_inputs' shapes and dtypes from NumPy's generator: jax.random's eager draws
  compile a threefry program per new shape (seconds a case)."""
  rng = np.random.default_rng(seed)
  normal = lambda shape, dt: jnp.asarray(rng.standard_normal(shape, np.float32), dt)  # noqa: E731
  q = normal((b, tq, h, d), dtype)
  k = normal((b, tk, hkv, d), dtype)
  v = normal((b, tk, hkv, d), dtype)
  bias = normal((b, hkv, tk), jnp.float32) if with_bias else None
  d_out = normal((b, tq, h, d), jnp.float32)
  return q, k, v, bias, d_out


def compiled(make_plan, *args, **kwargs):
  """make_plan(*args, **kwargs) as one compiled program: its ops one by one compile each."""
  return jax.jit(lambda: make_plan(*args, **kwargs))()


def oracle_or_plan_mask(allowed, plan, num_heads):
  """[B, H, Tq, Tk]: the independent mask [B, Hp, Tq, Tk] widened to the query heads, or,
  when there is none (allowed=None), the plan's own rendering."""
  if allowed is None:
    return plan_dense_mask(plan, num_heads)
  return jnp.asarray(per_query_head(np.asarray(allowed), num_heads))


def loss_and_grads(attention, q, k, v, bias, d_out):
  def loss(q, k, v, bias):
    out, lse = attention(q, k, v, bias)
    return jnp.sum(out.astype(jnp.float32) * d_out) + jnp.sum(jnp.where(lse > -1e29, lse, 0.0) * 0.1), (out, lse)

  argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
  return jax.value_and_grad(loss, argnums, has_aux=True)(q, k, v, bias)


@functools.partial(jax.jit, static_argnames='implementation')
def ours_loss_and_grads(q, k, v, bias, d_out, plan, implementation):
  attention = lambda q, k, v, bias: block_sparse_attention(q, k, v, plan, key_bias=bias,
                                                           implementation=implementation, return_lse=True)
  return loss_and_grads(attention, q, k, v, bias, d_out)


@jax.jit
def oracle_loss_and_grads(q, k, v, bias, d_out, allowed):
  """Compiled once per shape: the cases of one shape share it."""
  attention = lambda q, k, v, bias: masked_softmax_attention(q, k, v, allowed, key_bias=bias, scale=q.shape[-1] ** -0.5,
                                                             return_lse=True)
  return loss_and_grads(attention, q, k, v, bias, d_out)


def check_against_dense(plan, q, k, v, bias, d_out, dtype=jnp.float32, implementation='reference', allowed=None):
  """allowed [B or 1, Hp, Tq, Tk]: the mask the plan should stand for (mask_oracle.py)."""
  allowed = oracle_or_plan_mask(allowed, plan, q.shape[2])
  tol = TOLERANCE[dtype]
  (_, (out, lse)), grads = ours_loss_and_grads(q, k, v, bias, d_out, plan, implementation)
  (_, (out_ref, lse_ref)), grads_ref = oracle_loss_and_grads(q, k, v, bias, d_out, allowed)
  np.testing.assert_allclose(np.asarray(out, np.float32), out_ref, **tol)
  np.testing.assert_allclose(lse, lse_ref, **tol)
  for name, got, want in zip(('dq', 'dk', 'dv', 'dbias'), grads, grads_ref):
    assert bool(jnp.isfinite(got.astype(jnp.float32)).all()), name
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), err_msg=name, **tol)
  return out, lse, grads


MASKS = {
    'causal': masks.Causal(),
    'window': masks.causal_window(5),
    'chunked': masks.Chunked(6) & masks.Causal(),
    'window_or_prefix': (masks.SlidingWindow(4) | masks.GlobalPrefix(3)) & masks.Causal(),
    'bidirectional_window': masks.SlidingWindow(3, 3),
    'full': masks.Full(),
}


# Every mask without GQA and with one GQA group, the groups in rotation: each group meets two masks.
MASK_GROUPS = [(name, group) for i, name in enumerate(sorted(MASKS)) for group in (1, (2, 4, 8)[i % 3])]


@pytest.mark.parametrize('mask_name, group', MASK_GROUPS)
def test_mask_plans_match_dense(mask_name, group):
  q, k, v, bias, d_out = random_inputs(0, 2, 21, 21, 8, 8 // group, 16, jnp.float32, with_bias=True)
  plan = plan_from_mask(MASKS[mask_name], q_len=21, block_q=8, block_kv=4, batch=2)
  check_against_dense(plan, q, k, v, bias, d_out, allowed=mask_oracle(MASKS[mask_name], q_len=21))



# Every draw has new shapes, so it compiles anew (about 3 s): the default suite takes a few
# draws, the slow one many.
RANDOM_BLOCK_PLANS = given(
    seed=st.integers(0, 10_000), length=st.integers(1, 40), block_q=st.sampled_from([4, 8, 16]),
    block_kv=st.sampled_from([4, 8, 16]), group=st.sampled_from([1, 2, 4]), per_head=st.booleans(),
    density=st.floats(0.0, 1.0), documents=st.booleans(), with_bias=st.booleans())


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@RANDOM_BLOCK_PLANS
def test_random_block_plans_match_dense(**draw):
  check_random_block_plan(**draw)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@RANDOM_BLOCK_PLANS
def test_many_random_block_plans_match_dense(**draw):
  check_random_block_plan(**draw)


def check_random_block_plan(seed, length, block_q, block_kv, group, per_head, density, documents, with_bias):
  rng = np.random.default_rng(seed)
  h, hkv = 4, 4 // group
  q, k, v, bias, d_out = random_inputs(seed, 2, length, length, h, hkv, 8, jnp.float32, with_bias)
  nq, nk = -(-length // block_q), -(-length // block_kv)
  block_mask = rng.random((2, h if per_head else hkv, nq, nk)) < density
  segments = None
  if documents:
    segments = np.cumsum(rng.random((2, length)) < 0.15, axis=1).astype(np.int32) + 1
  layout = dict(q_len=length, block_q=block_q, block_kv=block_kv, segment_ids=segments)
  plan = plan_from_block_mask(jnp.asarray(block_mask), **layout)
  check_against_dense(plan, q, k, v, bias, d_out, allowed=block_mask_oracle(block_mask, **layout))


def test_fully_masked_rows_are_zero_finite_and_have_zero_gradients():
  q, k, v, bias, d_out = random_inputs(1, 1, 16, 16, 2, 1, 8, jnp.float32, with_bias=True)
  block_mask = jnp.zeros((1, 1, 4, 4), bool).at[0, 0, 2:, :].set(True)  # q blocks 0, 1 see nothing
  plan = plan_from_block_mask(block_mask, q_len=16, block_q=4, block_kv=4)
  allowed = block_mask_oracle(block_mask, q_len=16, block_q=4, block_kv=4)
  out, lse, (dq, dk, dv, dbias) = check_against_dense(plan, q, k, v, bias, d_out, allowed=allowed)
  assert (out[:, :8] == 0).all() and (dq[:, :8] == 0).all()
  assert (lse[:, :, :8] == EMPTY_ROW_LSE).all()


def test_bfloat16_inputs():
  q, k, v, bias, d_out = random_inputs(2, 1, 33, 33, 4, 2, 16, jnp.bfloat16, with_bias=False)
  plan = plan_from_mask(masks.causal_window(9), q_len=33, block_q=8, block_kv=8)
  out, _, grads = check_against_dense(plan, q, k, v, bias, d_out, dtype=jnp.bfloat16,
                                      allowed=mask_oracle(masks.causal_window(9), q_len=33))
  assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)


def test_lengths_shorter_than_a_block_and_cross_attention_lengths():
  q, k, v, bias, d_out = random_inputs(3, 1, 5, 5, 2, 2, 8, jnp.float32, with_bias=True)
  check_against_dense(plan_from_mask(masks.Causal(), q_len=5, block_q=16, block_kv=16), q, k, v, bias, d_out,
                      allowed=mask_oracle(masks.Causal(), q_len=5))
  q, k, v, bias, d_out = random_inputs(4, 1, 7, 19, 2, 1, 8, jnp.float32, with_bias=True)
  check_against_dense(plan_from_mask(masks.SlidingWindow(6, 2), q_len=7, kv_len=19, block_q=4, block_kv=8),
                      q, k, v, bias, d_out, allowed=mask_oracle(masks.SlidingWindow(6, 2), q_len=7, kv_len=19))


@pytest.mark.parametrize('name', sorted(MASKS))
def test_max_row_blocks_bounds_every_list(name):
  mask = MASKS[name]
  expected_span = {'causal': None, 'full': None, 'window': 5, 'chunked': 6, 'window_or_prefix': 8,
                   'bidirectional_window': 7}[name]
  assert mask.key_span() == expected_span
  for length, block_q, block_kv in [(37, 4, 4), (64, 8, 4), (50, 4, 8)]:
    plan = plan_from_mask(mask, q_len=length, block_q=block_q, block_kv=block_kv)
    bound = plan.max_row_blocks()
    if expected_span is None:
      assert bound is None
    else:
      assert int(plan.kv_count.max()) <= bound
      if name == 'window':  # a sliding window reaches its bound (give or take the alignment)
        assert bound <= int(plan.kv_count.max()) + 1


@pytest.mark.parametrize('mask', list(MASKS.values()), ids=sorted(MASKS))
def test_block_kinds_are_exact_for_primitives_and_safe_for_combinations(mask):
  """Every tile called FULL is all True and EMPTY all False in the element mask."""
  q_len, kv_len, bq, bk = 37, 29, 8, 4
  kinds = np.asarray(mask_block_kinds(mask, q_len, kv_len, bq, bk))
  elements = np.asarray(mask.elements(np.arange(q_len)[:, None], np.arange(kv_len)[None, :]))
  for i in range(kinds.shape[0]):
    for j in range(kinds.shape[1]):
      tile = elements[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk]
      if kinds[i, j] == FULL:
        assert tile.all() and tile.shape == (bq, bk)
      elif kinds[i, j] == EMPTY:
        assert not tile.any()
      elif not isinstance(mask, (masks.And, masks.Or)):
        assert tile.any() and not (tile.all() and tile.shape == (bq, bk))


def test_top_k_block_scores_keep_diagonal_first_and_break_ties_low():
  scores = jnp.zeros((1, 1, 4, 4))  # all tied: the lowest allowed indices win
  plan = plan_from_block_scores(scores, 2, q_len=16, block_q=4, block_kv=4)
  kinds = np.asarray(plan.block_kinds()[0, 0])
  assert (kinds[3] != EMPTY).tolist() == [True, False, False, True]  # first + diagonal
  assert (kinds[1] != EMPTY).tolist() == [True, True, False, False]
  assert kinds[0, 0] == PARTIAL and kinds[3, 0] == FULL
  scores = jnp.asarray([[[[0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 5, 9, 0]]]], jnp.float32)
  kinds = np.asarray(plan_from_block_scores(scores, 3, q_len=16, block_q=4, block_kv=4).block_kinds()[0, 0])
  assert (kinds[3] != EMPTY).tolist() == [True, False, True, True]


def test_plan_builders_are_jittable_and_transposed_lists_agree():
  segments = jnp.asarray([[1] * 10 + [2] * 22])
  build = jax.jit(lambda s: plan_from_mask(masks.causal_window(8), q_len=32, block_q=8, block_kv=8,
                                           segment_ids=s))
  plan = build(segments)
  kinds = np.asarray(plan.block_kinds())
  nk = plan.num_kv_blocks
  transposed = np.zeros_like(kinds.transpose(0, 1, 3, 2))
  for j in range(nk):
    for slot in range(int(plan.q_count[0, 0, j])):
      i = int(plan.q_index[0, 0, j, slot])
      transposed[0, 0, j, i] = FULL if plan.q_full[0, 0, j, slot] else PARTIAL
  np.testing.assert_array_equal(transposed, kinds.transpose(0, 1, 3, 2))
  assert plan.kv_index.dtype == jnp.int16 and plan.kv_full.dtype == jnp.int8


def test_bad_shapes_and_implementations_fail_fast():
  q, k, v, _, _ = random_inputs(0, 1, 16, 16, 4, 2, 8, jnp.float32, False)
  plan = plan_from_mask(masks.Causal(), q_len=16, block_q=8, block_kv=8)
  with pytest.raises(ValueError, match='unknown implementation'):
    block_sparse_attention(q, k, v, plan, implementation='nope')
  with pytest.raises(ValueError, match='plan is for lengths'):
    block_sparse_attention(q[:, :8], k, v, plan)
  with pytest.raises(ValueError, match='key_bias must be'):
    block_sparse_attention(q, k, v, plan, key_bias=jnp.zeros((1, 4, 16)))
  with pytest.warns(UserWarning, match='falls back to .reference.'):
    block_sparse_attention(q, k, v, plan, implementation=['nope', 'reference'])


def test_a_batch_one_plan_serves_every_batch_row():
  plan = plan_from_mask(masks.causal_window(9), q_len=40, block_q=8, block_kv=8)
  q, k, v, bias, d_out = random_inputs(7, 3, 40, 40, 2, 1, 8, jnp.float32, with_bias=True)
  check_against_dense(plan, q, k, v, bias, d_out, allowed=mask_oracle(masks.causal_window(9), q_len=40))
  documents = plan_from_mask(masks.Causal(), q_len=40, block_q=8, block_kv=8, segment_ids=jnp.ones((1, 40), jnp.int32))
  with pytest.raises(ValueError, match='cannot serve batch 3'):
    block_sparse_attention(q, k, v, documents)


def test_deterministic_picks_the_reproducible_backward(monkeypatch):
  """deterministic=True runs `backward`, False an implementation's `fast_backward` (the fused
  atomic-dQ kernel on Hopper); None the default, or what deterministic_backward(flag) says."""
  import dataclasses

  from pallas_kernels.block_sparse_attention import api, deterministic_backward
  calls = []
  reference = api.IMPLEMENTATIONS['reference']

  def tagged(tag):
    def backward(*args):
      calls.append(tag)
      return reference.backward(*args)
    return backward

  monkeypatch.setitem(api.IMPLEMENTATIONS, 'reference',
                      dataclasses.replace(reference, backward=tagged('deterministic'), fast_backward=tagged('fast')))
  q, k, v, _, _ = random_inputs(0, 1, 64, 64, 2, 1, 16, jnp.float32, with_bias=False)
  plan = plan_from_mask(masks.Causal(), q_len=64, block_q=32, block_kv=32)

  def gradient(scale, **options):  # a new scale each time: a new trace, not a cached one
    loss = lambda q: block_sparse_attention(q, k, v, plan, scale=scale, implementation='reference', **options).sum()
    return jax.grad(loss)(q)

  gradient(0.1)
  gradient(0.2, deterministic=True)
  gradient(0.3, deterministic=False)
  with deterministic_backward():
    gradient(0.4)
    gradient(0.5, deterministic=False)
  with deterministic_backward(False):
    gradient(0.6)
  default = 'fast' if api.FUSED_BACKWARD_VERIFIED else 'deterministic'
  assert calls == [default, 'deterministic', 'fast', 'deterministic', 'fast', 'fast']
