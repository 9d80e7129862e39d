"""summary_prefix.py: Sparse Transformer's fixed pattern with its summary keys gathered in
front of the keys. Over the gathered key axis the mask must stand for exactly
Fixed(l, c) & Causal() (each allowed pair once), its block_kind must be exact on tiles that
fall anywhere (across the prefix's end too), and the plan must visit far fewer tiles."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_block_sparse_patterns import tile_counts, tile_edges

from pallas_kernels.block_sparse_attention import masks, patterns, plan_from_mask
from pallas_kernels.block_sparse_attention.masks import EMPTY, FULL, PARTIAL
from pallas_kernels.block_sparse_attention.summary_prefix import SummaryPrefix, prefix_length, summary_positions

# (row length, stride l, summary c, prefix alignment)
SHAPES = [(37, 8, 3, 1), (64, 16, 4, 8), (50, 7, 7, 4), (20, 5, 1, 16), (150, 32, 4, 16)]


def gathered_truth(length, stride, summary, align):
  prefix = prefix_length(length, stride, summary, align)
  mask = SummaryPrefix(stride, summary, prefix)
  q, k = np.arange(length)[:, None], np.arange(prefix + length)[None, :]
  return mask, np.asarray(mask.elements(q, k)), np.asarray(summary_positions(length, stride, summary, align))


@pytest.mark.parametrize('length, stride, summary, align', SHAPES)
def test_gathered_keys_stand_for_the_fixed_pattern_once_each(length, stride, summary, align):
  _, truth, positions = gathered_truth(length, stride, summary, align)
  prefix = len(positions)
  row_index = np.concatenate([positions, np.arange(length)])
  seen = np.zeros((length, length), np.int64)
  for key, row in enumerate(row_index):
    seen[:, row] += truth[:, key]
  fixed = (patterns.Fixed(stride, summary) & masks.Causal()).elements(np.arange(length)[:, None],
                                                                      np.arange(length)[None, :])
  np.testing.assert_array_equal(seen, np.asarray(fixed, np.int64))
  assert prefix % align == 0 and prefix >= summary * -(-length // stride)


@pytest.mark.parametrize('length, stride, summary, align', SHAPES)
def test_block_kind_is_exact_on_every_tiling(length, stride, summary, align):
  mask, truth, _ = gathered_truth(length, stride, summary, align)
  keys = truth.shape[1]
  edges = []
  for block_q, block_kv, q_offset, k_offset in [(1, 1, 0, 0), (4, 4, 0, 0), (8, 16, 3, 0), (7, 12, 2, 5),
                                                (5, 3, 1, 2), (32, 32, 0, 0)]:
    q0, q1 = tile_edges(length, block_q, q_offset)
    k0, k1 = tile_edges(keys, block_kv, k_offset)
    edges.append([np.broadcast_to(x, (len(q0), len(k0))).ravel()
                  for x in (q0[:, None], q1[:, None], k0[None], k1[None])])
  q0, q1, k0, k1 = (np.concatenate(parts) for parts in zip(*edges))
  kinds = np.asarray(jax.jit(mask.block_kind)(*(jnp.asarray(x, jnp.int32) for x in (q0, q1, k0, k1))))
  counts, area = tile_counts(truth, q0, q1, k0, k1), (q1 - q0) * (k1 - k0)
  expected = np.where(counts == area, FULL, np.where(counts > 0, PARTIAL, EMPTY))
  np.testing.assert_array_equal(kinds, expected)


def test_the_plan_visits_only_the_tiles_in_use():
  """4096 tokens, l = 128, c = 8, blocks of 128: 256 summary slots (2 blocks); q block b
  reads ceil(8 b / 128) prefix blocks and its own diagonal block (46 + 32 tiles), where the
  row's summary columns reach all 528 causal tiles."""
  length, stride, summary, block = 4096, 128, 8, 128
  slots = summary_positions(length, stride, summary, align=block)
  gathered = plan_from_mask(SummaryPrefix(stride, summary, slots.shape[0]), q_len=length,
                            kv_len=slots.shape[0] + length, block_q=block, block_kv=block)
  rows = plan_from_mask(patterns.Fixed(stride, summary) & masks.Causal(), q_len=length, block_q=block, block_kv=block)
  assert int(gathered.kv_count.sum()) == sum(-(-8 * b // 128) for b in range(32)) + 32 == 78
  assert int(rows.kv_count.sum()) == 32 * 33 // 2


def test_bad_parameters_are_refused():
  for stride, summary, prefix in ((0, 1, 0), (4, 5, 0), (4, 0, 0), (4, 2, -1)):
    with pytest.raises(ValueError):
      SummaryPrefix(stride, summary, prefix)
