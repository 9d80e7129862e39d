"""Decoding with the mechanisms that choose keys from learned scores (issue 24): gated
(SeerAttention block gates: top-k and threshold) and dynamic_mask (each block_smooth).
Teacher-forced decoding (decode_helpers.py: prompts of 5, 17 and 12 tokens, 40 tokens,
block size 8) gives the forward pass's logits at every position, at settings where the
choice drops keys within those 40 tokens (decoding every key, or the wrong blocks or
keys, fails these tests)."""

import jax
import jax.numpy as jnp
import decode_helpers
import numpy as np
import pytest
from decode_helpers import check_teacher_forcing, model_for

from sparseformer.errors import UserError

# gate settings (width 8): 5 blocks of 8 tokens, so top-k at density 0.9 keeps 3 blocks per
# row (block 0, the diagonal and one of the blocks between); threshold 0.25 drops blocks in
# most rows of 4 or more blocks, differently per head.
GATES = {
    'topk': dict(width=8, density=0.9),
    'threshold': dict(width=8, selection='threshold', threshold=0.25),
    'dense_eval': dict(width=8, density=0.2, eval_forward='dense'),
}


@pytest.mark.parametrize('gate', [pytest.param(g, marks=pytest.mark.slow) if g == 'dense_eval' else g
                                  for g in sorted(GATES)])
def test_gated_decoding_matches_the_forward_pass(gate):
  check_teacher_forcing(['gated'], {'gate': GATES[gate]})


def test_gated_decoding_from_prompts_that_end_at_a_block_edge():
  """The first decoded token finishes the prompt's last block (its key entry, the next
  block's choice); a prompt of one token has no finished block."""
  check_teacher_forcing(['gated'], {'gate': GATES['topk']}, prompt_lengths=(8, 16, 1))


def test_gated_decoding_gathers_the_chosen_blocks_at_low_density():
  """12 blocks of 8 tokens at density 0.6 keep 4 per row (block 0, the diagonal and the
  two best-scoring others): a step gathers 4 blocks per query head instead of reading
  the whole cache (GatedAttention.gathered_blocks), and still gives the forward pass's
  logits."""
  gate = dict(width=8, density=0.6)
  model = model_for(['gated'], {'gate': gate})
  assert model.blocks[0].attention.mechanism.gathered_blocks(model.init_cache(1, 96)[0]) == 4
  check_teacher_forcing(['gated'], {'gate': gate}, prompt_lengths=(5, 33, 70), length=96, prompt_pad=72)


def test_attend_blocks_equals_masked_attention_over_the_same_blocks():
  """kv_cache.attend_blocks against kv_cache.attend with the blocks as a mask: GQA, a
  cache whose length is not a multiple of the block, empty slots, padding (-1) entries,
  and a row whose query sees no slot of its blocks."""
  from sparseformer.model.attention import kv_cache
  batch, slots, kv_heads, heads, dim, block = 3, 21, 2, 4, 8, 4
  keys = jax.random.split(jax.random.key(0), 4)
  lengths = jnp.asarray([21, 13, 2])
  k = jax.random.normal(keys[0], (batch, slots, kv_heads, dim))
  v = jax.random.normal(keys[1], (batch, slots, kv_heads, dim))
  cache = kv_cache.fill(kv_cache.empty(batch, slots, kv_heads, dim, jnp.float32), k, v, lengths)
  q = jax.random.normal(keys[2], (batch, 1, heads, dim))
  blocks = jnp.asarray([[[5, 0, -1], [1, 2, 3], [4, -1, -1], [0, 5, 2]],
                        [[3, 1, 0], [-1, -1, 2], [5, 4, 3], [1, -1, -1]],
                        [[3, 4, -1], [0, -1, -1], [1, 0, -1], [2, 3, 4]]])
  positions = jnp.asarray([20, 12, 1])
  got = kv_cache.attend_blocks(q, cache, blocks, block, positions, 0.3)
  slot_block = jnp.arange(slots) // block
  chosen = (slot_block[None, None, :, None] == blocks[:, :, None, :]).any(-1)  # [B, H, S]
  want = kv_cache.attend(q, cache, chosen & kv_cache.causal(cache, positions)[:, None], 0.3)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=0, atol=1e-6)
  assert not np.asarray(got[2, 0, 0]).any()  # row 2, head 0: blocks 3 and 4 hold nothing yet


def test_gated_decoding_with_own_query_blocks_is_a_user_error():
  model = model_for(['gated'], {'gate': dict(width=8, query_block='own')})
  with pytest.raises(UserError, match='query_block=previous'):
    model.init_cache(1, 16)


@pytest.fixture
def varied_key_scores(monkeypatch):
  """dynamic_mask layers whose key scores differ by O(1) from key to key (at init they are
  nearly one constant, which the softmax ignores): the test then sees the key bias."""
  plain = decode_helpers.model_for

  def varied(*args, **kwargs):
    model = plain(*args, **kwargs)
    for i, block in enumerate(model.blocks):
      mechanism = block.attention.mechanism
      mechanism.dt_weight[...] = jax.random.normal(jax.random.key(i), mechanism.dt_weight.shape)
      mechanism.dt_scale[...] = jnp.full(mechanism.dt_scale.shape, 2.0)
    return model

  monkeypatch.setattr(decode_helpers, 'model_for', varied)


# (keep count, block_smooth): W = 6 keeps less than the prompts; majority at W = 16 keeps some
# of the blocks between block 0 and the diagonal; budget at W = 24 keeps one of them.
SMOOTHINGS = {'none': 6, 'majority': 16, 'budget': 24}


@pytest.mark.parametrize('smoothing', sorted(SMOOTHINGS))
def test_dynamic_mask_decoding_matches_the_forward_pass(smoothing, varied_key_scores):
  check_teacher_forcing([f'dynamic_mask:{SMOOTHINGS[smoothing]}'], {'dynamic_mask': {'block_smooth': smoothing}})
