"""Decoding with the mechanisms that choose keys from learned scores (issue 24): gated
(SeerAttention block gates: top-k and threshold) and dynamic_mask (each block_smooth).
Teacher-forced decoding (decode_helpers.py: prompts of 5, 17 and 12 tokens, 40 tokens,
block size 8) gives the forward pass's logits at every position, at settings where the
choice drops keys within those 40 tokens (decoding every key, or the wrong blocks or
keys, fails these tests)."""

import jax
import jax.numpy as jnp
import decode_helpers
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
