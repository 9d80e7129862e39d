"""Each plan builder against the element mask it should stand for, built independently
in numpy (mask_oracle.py): the plan's element mask (its kv lists, full/partial kinds and
the element rule inside partial blocks) equals it exactly; tiles marked FULL are whole
and all True in it, absent tiles hold no True element, and the transposed (dK/dV) lists
visit the same tiles. Random masks and their combinations, ragged and cross-attention
lengths, block shapes, batch, plan heads and documents."""

import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mask_oracle import block_mask_oracle, block_scores_oracle, expand_blocks, mask_oracle, mask_truth, num_blocks
from mask_oracle import same_document

from pallas_kernels.block_sparse_attention import masks, plan_from_block_mask, plan_from_block_scores, plan_from_mask
from pallas_kernels.block_sparse_attention.plan import EMPTY, FULL, PARTIAL, dense_mask, stable_partition

PROPERTY_SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# The builders run op by op and each new array shape compiles every op again (seconds per
# shape on 2 cores), so the default suite draws from two layouts: ragged square lengths
# with unequal blocks, batch 2 and 3 plan heads; cross-attention lengths with queries
# shorter than a block and an odd kv block, batch 1 and 2 plan heads. Masks, documents,
# block choices and scores stay free; the `slow` variants draw every layout.
# (q_len, kv_len, block_q, block_kv, batch, plan heads)
POOLED_LAYOUTS = [(21, 21, 8, 4, 2, 3), (6, 19, 8, 3, 1, 2)]

primitive_masks = st.one_of(
    st.just(masks.Causal()),
    st.just(masks.Full()),
    st.builds(masks.SlidingWindow, st.integers(0, 12), st.integers(0, 6)),
    st.builds(masks.Chunked, st.integers(1, 12)),
    st.builds(masks.GlobalPrefix, st.integers(0, 8)),
)
any_masks = st.recursive(primitive_masks, lambda parts: st.one_of(
    st.builds(lambda a, b: a & b, parts, parts), st.builds(lambda a, b: a | b, parts, parts)), max_leaves=3)

free_shapes = st.tuples(st.integers(1, 40), st.one_of(st.none(), st.integers(1, 40)), st.sampled_from([2, 3, 4, 8, 16]),
                        st.sampled_from([2, 4, 5, 8, 16]), st.integers(1, 2), st.integers(1, 3))
SHAPES = [pytest.param(st.sampled_from(POOLED_LAYOUTS), id='pooled'),
          pytest.param(free_shapes, id='free', marks=pytest.mark.slow)]


@st.composite
def layouts(draw, shapes):
  """(builder keywords: lengths, block sizes, maybe documents; batch; plan heads; rng)."""
  q_len, kv_len, block_q, block_kv, batch, plan_heads = draw(shapes)
  kv_len = q_len if kv_len is None else kv_len
  layout = dict(q_len=q_len, kv_len=kv_len, block_q=block_q, block_kv=block_kv)
  rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
  documents = draw(st.sampled_from(['none', 'contiguous', 'scattered']))
  if documents != 'none':
    ids = lambda length: random_segment_ids(rng, batch, length, contiguous=documents == 'contiguous')
    if q_len == kv_len and draw(st.booleans()):
      layout['segment_ids'] = ids(q_len)
    else:
      layout['q_segment_ids'], layout['kv_segment_ids'] = ids(q_len), ids(kv_len)
  return layout, batch, plan_heads, rng


def random_segment_ids(rng, batch, length, contiguous):
  if contiguous:  # packed documents, as in training rows
    return np.cumsum(rng.random((batch, length)) < 0.2, axis=1).astype(np.int32)
  return rng.integers(0, 3, (batch, length)).astype(np.int32)


def block_shape(layout, batch, plan_heads):
  return (batch, plan_heads, num_blocks(layout['q_len'], layout['block_q']),
          num_blocks(layout['kv_len'], layout['block_kv']))


def kinds_from_lists(count, index, full, num_columns):
  """[..., n, num_columns] EMPTY/PARTIAL/FULL from per-row (count, indices, full flags)."""
  count, index, full = (np.asarray(x) for x in (count, index, full))
  kinds = np.full(count.shape + (num_columns,), EMPTY)
  for row in np.ndindex(*count.shape):
    for slot in range(count[row]):
      kinds[row + (index[row + (slot,)],)] = FULL if full[row + (slot,)] else PARTIAL
  return kinds


def plan_element_mask(plan):
  """[B, Hp, Tq, Tk] what the plan's kv lists let through: FULL tiles whole, PARTIAL tiles
  where the plan's mask function and documents allow."""
  assert not plan.has_rank_rule
  kinds = expand_blocks(kinds_from_lists(plan.kv_count, plan.kv_index, plan.kv_full, plan.num_kv_blocks),
                        plan.q_len, plan.kv_len, plan.block_q, plan.block_kv)
  if plan.document_positions:  # the segment ids are document starts: positions are index - start
    q = np.arange(plan.q_len)[None, :, None] - np.asarray(plan.q_segment_ids)[:, :, None]
    k = np.arange(plan.kv_len)[None, None, :] - np.asarray(plan.kv_segment_ids)[:, None, :]
    inside = np.asarray(plan.mask.elements(q, k))[:, None]
  else:
    inside = mask_truth(plan.mask, plan.q_len, plan.kv_len)[None, None]
  if plan.q_segment_ids is not None:
    inside = inside & same_document(plan.q_segment_ids, plan.kv_segment_ids)[:, None]
  return (kinds == FULL) | ((kinds == PARTIAL) & inside)


def tiles(array, block_q, block_kv):
  """Yield ((q block, kv block), the tile [..., <= block_q, <= block_kv]) of [..., Tq, Tk]."""
  q_len, kv_len = array.shape[-2:]
  for i in range(num_blocks(q_len, block_q)):
    for j in range(num_blocks(kv_len, block_kv)):
      yield (i, j), array[..., i * block_q:(i + 1) * block_q, j * block_kv:(j + 1) * block_kv]


def assert_plan_stands_for(plan, expected):
  """The plan's element mask equals expected [B, Hp, Tq, Tk], with sound block kinds."""
  got = plan_element_mask(plan)
  expected = np.broadcast_to(expected, got.shape)
  np.testing.assert_array_equal(got, expected)
  kinds = kinds_from_lists(plan.kv_count, plan.kv_index, plan.kv_full, plan.num_kv_blocks)
  for (i, j), tile in tiles(expected, plan.block_q, plan.block_kv):
    full, absent = kinds[..., i, j] == FULL, kinds[..., i, j] == EMPTY
    if full.any():
      assert tile.shape[-2:] == (plan.block_q, plan.block_kv), f'ragged tile {(i, j)} marked full'
      assert tile[full].all(), f'tile {(i, j)} marked full holds a masked element'
    assert not tile[absent].any(), f'absent tile {(i, j)} holds an allowed element'
  transposed = kinds_from_lists(plan.q_count, plan.q_index, plan.q_full, plan.num_q_blocks)
  np.testing.assert_array_equal(transposed.swapaxes(-1, -2), kinds)


@pytest.mark.parametrize('shapes', SHAPES)
@PROPERTY_SETTINGS
@given(data=st.data(), mask=any_masks)
def test_plan_from_mask_is_the_mask_within_documents(shapes, data, mask):
  layout, batch, _, _ = data.draw(layouts(shapes))
  plan = plan_from_mask(mask, batch=batch, **layout)
  assert plan.kv_count.shape[:2] == (batch, 1)
  segments = {key: value for key, value in layout.items() if 'segment' in key}
  assert_plan_stands_for(plan, mask_oracle(mask, q_len=layout['q_len'], kv_len=layout['kv_len'], **segments))


@pytest.mark.parametrize('shapes', SHAPES)
@PROPERTY_SETTINGS
@given(data=st.data(), mask=any_masks, density=st.floats(0, 1))
def test_plan_from_block_mask_is_the_chosen_blocks_under_the_mask(shapes, data, mask, density):
  layout, batch, plan_heads, rng = data.draw(layouts(shapes))
  block_mask = rng.random(block_shape(layout, batch, plan_heads)) < density
  plan = plan_from_block_mask(block_mask, mask=mask, **layout)
  assert_plan_stands_for(plan, block_mask_oracle(block_mask, mask=mask, **layout))


@pytest.mark.parametrize('shapes', SHAPES)
@PROPERTY_SETTINGS
@given(data=st.data(), mask=any_masks, keep=st.integers(0, 6), keep_diagonal=st.booleans(), keep_first=st.booleans())
def test_plan_from_block_scores_keeps_the_top_blocks(shapes, data, mask, keep, keep_diagonal, keep_first):
  layout, batch, plan_heads, rng = data.draw(layouts(shapes))
  scores = rng.integers(0, 4, block_shape(layout, batch, plan_heads)).astype(np.float32)  # few values: many ties
  options = dict(mask=mask, keep_diagonal=keep_diagonal, keep_first=keep_first, **layout)
  plan = plan_from_block_scores(scores, keep, **options)
  assert_plan_stands_for(plan, block_scores_oracle(scores, keep, **options))


def test_the_default_mask_of_block_plans_is_causal():
  plan = plan_from_block_mask(np.ones((1, 1, 3, 3), bool), q_len=10, block_q=4, block_kv=4)
  assert_plan_stands_for(plan, np.tril(np.ones((10, 10), bool))[None, None])


def test_dense_mask_renders_the_plans_element_mask():
  """dense_mask (plan_dense_mask in the kernel tests, for plans with no other source) is
  the rendering checked above."""
  segments = np.asarray([[1] * 7 + [2] * 12, [3] * 19])
  block_mask = np.random.default_rng(0).random((2, 2, 5, 3)) < 0.6
  plan = plan_from_block_mask(block_mask, q_len=19, block_q=4, block_kv=8, segment_ids=segments,
                              mask=masks.SlidingWindow(6, 2) | masks.GlobalPrefix(2))
  rendered = plan_element_mask(plan)
  for b, h in np.ndindex(2, 2):
    np.testing.assert_array_equal(dense_mask(plan, b, h), rendered[b, h])


def test_block_scores_choose_among_the_masks_block_answers():
  """A combination's block answer is conservative: block (1, 0) of this mask is called
  partial though it holds nothing, and with keep=1 it takes the place of block (1, 1)."""
  mask = (masks.SlidingWindow(3) & masks.GlobalPrefix(1)) | masks.causal_window(1)
  scores = np.asarray([[[[0, 0], [5, 0]]]], np.float32)
  options = dict(q_len=8, block_q=4, block_kv=4, mask=mask, keep_diagonal=False, keep_first=False)
  plan = plan_from_block_scores(scores, 1, **options)
  assert_plan_stands_for(plan, block_scores_oracle(scores, 1, **options))
  assert np.asarray(plan.block_kinds())[0, 0, 1].tolist() == [PARTIAL, EMPTY]


@given(st.sampled_from([(1, 1, 1), (1, 1, 2), (2, 3, 17), (3, 4, 33)]), st.integers(0, 2 ** 31 - 1))  # few shapes: compiles
@PROPERTY_SETTINGS
def test_stable_partition_moves_the_active_entries_first_in_order(shape, seed):
  rng = np.random.default_rng(seed)
  active = rng.random(shape) < rng.random()
  values = rng.integers(-1000, 1000, shape).astype(np.int32)
  flags = rng.integers(0, 2, shape).astype(np.int8)
  order = np.argsort(~active, axis=-1, kind='stable')
  moved_values, moved_flags = stable_partition(jnp.asarray(active), jnp.asarray(values), jnp.asarray(flags))
  np.testing.assert_array_equal(moved_values, np.take_along_axis(values, order, -1))
  np.testing.assert_array_equal(moved_flags, np.take_along_axis(flags, order, -1))
  assert moved_values.dtype == jnp.int32 and moved_flags.dtype == jnp.int8
