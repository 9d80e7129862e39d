"""The plan's data-dependent rank rule (a key is visible where key_rank >= q_threshold,
dynamic mask attention's selection) against dense attention under the explicit mask:
outputs, LSE and every gradient, plan heads 1/Hkv/H, documents, ragged lengths, tiles
marked full only where the rule keeps every element; the jnp reference and the Mosaic TPU
kernels (interpret mode, and lowered for a TPU target). The Mosaic GPU kernels are tested
in test_block_sparse_mosaic_gpu_rank_rule.py."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mask_oracle import block_mask_oracle, per_query_head
from test_block_sparse_attention import check_against_dense, plan_dense_mask, random_inputs

from pallas_kernels.block_sparse_attention import api, masks, plan_from_block_mask, tpu
from pallas_kernels.block_sparse_attention.plan import FULL, PARTIAL, from_kinds


def rank_rule_plan(seed, batch, plan_heads, length, block_q, block_kv, documents, rank_levels=None):
  """(plan with a random rank rule, the plan without it, [B, Hp, T, T] the element mask of
  that plan's blocks built independently). A tile stays full only where every rank of its
  keys reaches every threshold of its queries. Ranks are a permutation of the positions,
  or with `rank_levels` drawn from that many values: ties, so that a rank off by one
  changes a good share of each row (one key a row with a permutation)."""
  rng = np.random.default_rng(seed)
  nq, nk = -(-length // block_q), -(-length // block_kv)
  block_mask = jnp.asarray(rng.random((batch, plan_heads, nq, nk)) < 0.8)
  segments = None
  if documents:
    segments = jnp.asarray(np.cumsum(rng.random((batch, length)) < 0.1, axis=1).astype(np.int32))
  base = plan_from_block_mask(block_mask, q_len=length, block_q=block_q, block_kv=block_kv, segment_ids=segments)
  if rank_levels is None:
    ranks = np.stack([np.stack([rng.permutation(length) for _ in range(plan_heads)]) for _ in range(batch)])
  else:
    ranks = rng.integers(0, rank_levels, (batch, plan_heads, length))
  thresholds = rng.integers(-1, rank_levels or length, (batch, plan_heads, length))
  thresholds[..., :min(2 * block_q, length // 2)] = -1  # rows that keep everything: their tiles stay full
  kinds = np.asarray(base.block_kinds())
  pad_q, pad_k = nq * block_q - length, nk * block_kv - length
  key_min = np.pad(ranks, ((0, 0), (0, 0), (0, pad_k)), constant_values=length).reshape(batch, plan_heads, nk, -1)
  row_max = np.pad(thresholds, ((0, 0), (0, 0), (0, pad_q)), constant_values=-1).reshape(batch, plan_heads, nq, -1)
  rank_full = key_min.min(-1)[:, :, None, :] >= row_max.max(-1)[..., None]
  kinds = np.where((kinds == FULL) & ~rank_full, PARTIAL, kinds)
  plan = from_kinds(jnp.asarray(kinds), base.mask, length, length, block_q, block_kv, base.q_segment_ids,
                    base.kv_segment_ids, q_threshold=jnp.asarray(thresholds), key_rank=jnp.asarray(ranks))
  base_allowed = block_mask_oracle(block_mask, q_len=length, block_q=block_q, block_kv=block_kv, segment_ids=segments)
  return plan, base, base_allowed


def explicit_mask(plan, base_allowed, num_heads):
  """[B, H, Tq, Tk]: the blocks' element mask without the rule, narrowed by the rule
  element by element."""
  rule = np.asarray(plan.key_rank)[:, :, None, :] >= np.asarray(plan.q_threshold)[:, :, :, None]
  return per_query_head(base_allowed & rule, num_heads)


CASES = [  # (seed, length, block_q, block_kv, heads, kv heads, plan heads, documents)
    (0, 37, 8, 8, 4, 2, 2, False),
    (1, 37, 8, 16, 4, 2, 1, True),
    (2, 29, 16, 8, 4, 1, 4, True),
    pytest.param((3, 64, 16, 16, 2, 2, 2, True), marks=pytest.mark.slow),
]


@pytest.mark.parametrize('case', CASES)
def test_rank_rule_matches_dense_reference(case):
  seed, length, block_q, block_kv, h, hkv, hp, documents = case
  plan, base, base_allowed = rank_rule_plan(seed, 2, hp, length, block_q, block_kv, documents)
  allowed = explicit_mask(plan, base_allowed, h)
  np.testing.assert_array_equal(np.asarray(plan_dense_mask(plan, h)), allowed)
  assert (np.asarray(plan.block_kinds()) == FULL).any() or not (np.asarray(base.block_kinds()) == FULL).any()
  q, k, v, bias, d_out = random_inputs(seed, 2, length, length, h, hkv, 8, jnp.float32, with_bias=True)
  check_against_dense(plan, q, k, v, bias, d_out, allowed=allowed)


def test_rank_rule_needs_both_arrays_and_their_shapes():
  _, base, _ = rank_rule_plan(0, 1, 1, 16, 8, 8, False)
  kinds = base.block_kinds()
  with pytest.raises(ValueError, match='give both'):
    from_kinds(kinds, masks.Causal(), 16, 16, 8, 8, key_rank=jnp.zeros((1, 1, 16), jnp.int32))
  with pytest.raises(ValueError, match='must be'):
    from_kinds(kinds, masks.Causal(), 16, 16, 8, 8, q_threshold=jnp.zeros((1, 1, 15), jnp.int32),
               key_rank=jnp.zeros((1, 1, 16), jnp.int32))


def test_element_mask_refuses_to_ignore_the_rule():
  plan, _, _ = rank_rule_plan(0, 1, 1, 16, 8, 8, False)
  with pytest.raises(ValueError, match='rank rule'):
    plan.element_mask(jnp.arange(16)[:, None], jnp.arange(16)[None, :])


def test_rank_rule_plans_do_not_broadcast_over_the_batch():
  plan, _, _ = rank_rule_plan(0, 1, 1, 16, 8, 8, False)
  q, k, v, _, _ = random_inputs(0, 2, 16, 16, 2, 1, 8, jnp.float32, with_bias=False)
  with pytest.raises(ValueError, match='ranks'):
    api.block_sparse_attention(q, k, v, plan)


def test_plan_without_rule_is_unchanged_by_the_new_fields():
  plan, base, _ = rank_rule_plan(0, 1, 1, 16, 8, 8, False)
  assert base.key_rank is None and not base.has_rank_rule
  assert dataclasses.replace(plan, key_rank=None, q_threshold=None).has_rank_rule is False


# Mosaic TPU kernels (interpret mode on CPU) ------------------------------------------------

@pytest.mark.parametrize('case', [pytest.param(CASES[1], marks=pytest.mark.slow), CASES[2]])
def test_rank_rule_tpu_interpret_matches_dense(case):
  """Plan heads 1 (shared by a GQA pair) and H (per query head, the dK/dV pass walks the
  group's members), documents, ragged lengths, bias."""
  seed, length, block_q, block_kv, h, hkv, hp, documents = case
  plan, _, base_allowed = rank_rule_plan(seed, 2, hp, length, block_q, block_kv, documents)
  q, k, v, bias, d_out = random_inputs(seed, 2, length, length, h, hkv, 8, jnp.float32, with_bias=True)
  check_against_dense(plan, q, k, v, bias, d_out, implementation='tpu_interpret',
                      allowed=explicit_mask(plan, base_allowed, h))


def test_rank_rule_lowers_to_mosaic_for_a_tpu_target():
  b, t, h, hkv, d = 1, 300, 4, 2, 128
  q, out = jnp.zeros((b, t, h, d), jnp.bfloat16), jnp.zeros((b, t, h, d), jnp.bfloat16)
  k = v = jnp.zeros((b, t, hkv, d), jnp.bfloat16)
  bias, lse = jnp.zeros((b, hkv, t)), jnp.zeros((b, h, t))
  plan, _, _ = rank_rule_plan(0, b, hkv, t, 128, 128, True)
  target = jax.sharding.AbstractDevice(device_kind='TPU v5e', num_cores=1, platform='tpu')
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ('x',), abstract_device=target)):
    forward = jax.export.export(jax.jit(lambda *a: tpu.forward(*a, 0.1)), platforms=['tpu'])(q, k, v, bias, plan)
    backward = jax.export.export(jax.jit(lambda q, k, v, bias, plan, out, lse: tpu.backward(
        q, k, v, bias, plan, 0.1, out, lse, out, lse)), platforms=['tpu'])(q, k, v, bias, plan, out, lse)
  assert forward.mlir_module().count('tpu_custom_call') == 1
  assert backward.mlir_module().count('tpu_custom_call') == 2
