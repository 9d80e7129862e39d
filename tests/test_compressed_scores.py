"""NSA's selection scores (sparseformer/model/attention/compressed_scores.py) against a
direct dense computation on small shapes: the compressed attention's probabilities
[B, H, T, Tc] from tests/oracles.py under a mask written from the definition (compressed
key j visible at t when j d + l - 1 <= t and its whole span is in t's document), summed
over the selection blocks each key's span overlaps, the heads of a kv group and the
non-padding tokens of a query block. Also the compressed keys' count and documents.

Tolerance: float32, 2e-5 abs + 2e-5 rel (as the mechanisms' tests)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import attention_probabilities, masked_softmax_attention

from pallas_kernels.compressed_mass import reference as compressed_mass_reference
from sparseformer.model.attention.compressed_scores import (CROSSES_DOCUMENTS, compressed_key_segments, num_compressed,
                                                            selection_scores)

CMP_LEN, CMP_STRIDE, SELECT_BLOCK, QUERY_BLOCK = 16, 8, 32, 16


def packed_segments(length):
  """Two rows: three documents then 20 tokens of padding; one document."""
  first = np.concatenate([np.full(70, 1), np.full(60, 2), np.full(length - 150, 3), np.zeros(20)])
  return jnp.asarray(np.stack([first, np.ones(length)]), jnp.int32)


def spans(count, cmp_len, cmp_stride):
  return [range(j * cmp_stride, j * cmp_stride + cmp_len) for j in range(count)]


def visible_compressed(segments, length, cmp_len, cmp_stride):
  """bool [B, T, Tc] from the definition, token by token."""
  count = (length - cmp_len) // cmp_stride + 1
  rows = 2 if segments is None else segments.shape[0]
  ids = np.ones((rows, length), int) if segments is None else np.asarray(segments)
  visible = np.zeros((rows, length, count), bool)
  for b in range(rows):
    for t in range(length):
      for j, span in enumerate(spans(count, cmp_len, cmp_stride)):
        visible[b, t, j] = span[-1] <= t and all(ids[b, i] == ids[b, t] for i in span)
  return visible


def dense_scores(q, k_cmp, segments, length, scale):
  """[B, Hkv, nQ, nS] from the oracle's probabilities, summed by loops over the definition."""
  b, _, heads, _ = q.shape
  count, kv_heads = k_cmp.shape[1], k_cmp.shape[2]
  allowed = visible_compressed(segments, length, CMP_LEN, CMP_STRIDE)
  p = np.asarray(attention_probabilities(q, k_cmp, allowed, scale=scale))  # [B, H, T, Tc]
  nq, ns = -(-length // QUERY_BLOCK), -(-length // SELECT_BLOCK)
  ids = np.ones((b, length), int) if segments is None else np.asarray(segments)
  out = np.zeros((b, kv_heads, nq, ns))
  for s in range(ns):
    block = set(range(s * SELECT_BLOCK, (s + 1) * SELECT_BLOCK))
    touching = [j for j, span in enumerate(spans(count, CMP_LEN, CMP_STRIDE)) if block & set(span)]
    for t in range(length):
      mass = p[:, :, t, touching].sum(-1) * (ids[:, t] != 0)[:, None]  # [B, H]
      out[:, :, t // QUERY_BLOCK, s] += mass.reshape(b, kv_heads, heads // kv_heads).sum(-1)
  return out


def inputs(length, heads=4, kv_heads=2, dim=8, seed=0):
  keys = jax.random.split(jax.random.key(seed), 2)
  count = num_compressed(length, CMP_LEN, CMP_STRIDE)
  return jax.random.normal(keys[0], (2, length, heads, dim)), jax.random.normal(keys[1], (2, count, kv_heads, dim))


@pytest.mark.parametrize('length', [200, 192])
@pytest.mark.parametrize('packed', [False, True])
@pytest.mark.parametrize('given_lse', [False, True])
def test_scores_equal_the_dense_probabilities_summed_by_the_definition(length, packed, given_lse):
  q, k_cmp = inputs(length)
  scale = 0.7
  segments = packed_segments(length) if packed else None
  kv_segments = compressed_key_segments(segments, CMP_LEN, CMP_STRIDE)
  lse = None
  if given_lse:
    allowed = visible_compressed(segments, length, CMP_LEN, CMP_STRIDE)
    _, lse = masked_softmax_attention(q, k_cmp, k_cmp, allowed, scale=scale, return_lse=True)
  got = selection_scores(q, k_cmp, lse, scale=scale, cmp_len=CMP_LEN, cmp_stride=CMP_STRIDE,
                         select_block=SELECT_BLOCK, query_block=QUERY_BLOCK, segment_ids=segments,
                         kv_segment_ids=kv_segments)
  want = dense_scores(q, k_cmp, segments, length, scale)
  assert got.shape == want.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  # every voting query that sees a compressed key gives mass 1 per head (a span may touch two blocks)
  voters = visible_compressed(segments, length, CMP_LEN, CMP_STRIDE).any(-1) & (np.asarray(segments) != 0 if packed
                                                                                else True)
  assert float(got.sum()) >= voters.sum() * 4 - 1e-3 > 0


@pytest.mark.parametrize('blocks_per_step', [1, 3])
def test_query_blocks_in_steps_of_any_size_give_the_same_scores(monkeypatch, blocks_per_step):
  length = 200  # 13 query blocks: 13 steps, or 4 of 3 blocks and a remainder of 1
  q, k_cmp = inputs(length)
  segments = packed_segments(length)
  score = lambda: selection_scores(q, k_cmp, None, scale=0.7, cmp_len=CMP_LEN, cmp_stride=CMP_STRIDE,
                                   select_block=SELECT_BLOCK, query_block=QUERY_BLOCK, segment_ids=segments,
                                   kv_segment_ids=compressed_key_segments(segments, CMP_LEN, CMP_STRIDE))
  whole = score()
  monkeypatch.setattr(compressed_mass_reference, 'STEP_ELEMENTS', blocks_per_step * 2 * QUERY_BLOCK * 4 * k_cmp.shape[1])
  np.testing.assert_allclose(score(), whole, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(whole, dense_scores(q, k_cmp, segments, length, 0.7), rtol=2e-5, atol=2e-5)


def test_query_block_and_select_block_of_other_sizes():
  length, query_block, select_block, cmp_len, cmp_stride = 100, 8, 24, 12, 4
  q, _ = inputs(length)
  k_cmp = jax.random.normal(jax.random.key(5), (2, num_compressed(length, cmp_len, cmp_stride), 2, 8))
  got = selection_scores(q, k_cmp, None, scale=0.3, cmp_len=cmp_len, cmp_stride=cmp_stride,
                         select_block=select_block, query_block=query_block, segment_ids=None, kv_segment_ids=None)
  allowed = visible_compressed(None, length, cmp_len, cmp_stride)
  p = np.asarray(attention_probabilities(q, k_cmp, allowed, scale=0.3))  # [B, H, T, Tc]
  overlap = np.array([[bool(set(range(j * cmp_stride, j * cmp_stride + cmp_len))
                            & set(range(s * select_block, (s + 1) * select_block))) for s in range(5)]
                      for j in range(k_cmp.shape[1])], float)
  per_token = (p @ overlap).reshape(2, 2, 2, length, 5).sum(2)  # [B, Hkv, T, nS]
  want = np.stack([per_token[:, :, i * query_block:(i + 1) * query_block].sum(2) for i in range(13)], 2)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_scores_carry_no_gradient():
  q, k_cmp = inputs(64)
  grads = jax.grad(lambda q, k: selection_scores(
      q, k, None, scale=1.0, cmp_len=CMP_LEN, cmp_stride=CMP_STRIDE, select_block=SELECT_BLOCK,
      query_block=QUERY_BLOCK, segment_ids=None, kv_segment_ids=None).sum(), (0, 1))(q, k_cmp)
  assert all(not np.any(np.asarray(g)) for g in grads)


def test_a_row_shorter_than_one_compressed_block_scores_zero():
  q = jnp.ones((1, 12, 2, 8))
  k_cmp = jnp.zeros((1, num_compressed(12, CMP_LEN, CMP_STRIDE), 1, 8))
  assert k_cmp.shape[1] == 0
  got = selection_scores(q, k_cmp, None, scale=1.0, cmp_len=CMP_LEN, cmp_stride=CMP_STRIDE,
                         select_block=SELECT_BLOCK, query_block=QUERY_BLOCK, segment_ids=None, kv_segment_ids=None)
  assert got.shape == (1, 1, 1, 1) and not np.any(np.asarray(got))


@pytest.mark.parametrize('length,cmp_len,cmp_stride', [(200, 16, 8), (15, 16, 8), (16, 16, 8), (100, 32, 16),
                                                       (99, 12, 4), (31, 16, 16)])
def test_the_count_is_the_complete_spans_in_the_row(length, cmp_len, cmp_stride):
  complete = [j for j in range(length) if j * cmp_stride + cmp_len <= length]
  assert num_compressed(length, cmp_len, cmp_stride) == len(complete)


def test_a_compressed_key_has_its_spans_document_or_none():
  segments = packed_segments(200)
  got = np.asarray(compressed_key_segments(segments, CMP_LEN, CMP_STRIDE))
  ids = np.asarray(segments)
  for b in range(2):
    for j, span in enumerate(spans(got.shape[1], CMP_LEN, CMP_STRIDE)):
      documents = {int(ids[b, i]) for i in span}
      assert got[b, j] == (documents.pop() if len(documents) == 1 else CROSSES_DOCUMENTS), (b, j)
  assert compressed_key_segments(None, CMP_LEN, CMP_STRIDE) is None
