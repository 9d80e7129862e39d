"""Decoding with a cache: teacher-forced decoding (prefill a prompt, then feed the
reference tokens one at a time) gives the logits of the full forward pass at every
position, for every mechanism that decodes, in float32 on the CPU, with prompts of
different lengths in one batch (decode_helpers.py). Mechanisms with options of their own
have their decoding tests beside their other tests."""

import jax.numpy as jnp
import numpy as np
import pytest
from decode_helpers import VOCAB, check_teacher_forcing, model_for

from sparseformer.model.attention import kv_cache

# (layer spec(s), model.attention overrides) of test_decoding.py: every mechanism that decodes, at sizes
# where its sparsity is visible within the sequence (block size 8, 40 tokens).
CASES = {
    'dense': (['dense'], {}),
    'window': (['window:8'], {}),
    'block_local': (['block_local:16'], {}),
    'strided': (['strided:16'], {}),
    'masformer': (['dense', 'window:8'], {}),
}



@pytest.mark.parametrize('case', sorted(CASES))
def test_teacher_forced_decoding_matches_the_forward_pass(case):
  specs, attention = CASES[case]
  check_teacher_forcing(specs, attention)


def test_every_registered_mechanism_decodes():
  from sparseformer.model.attention.base import mechanism_classes
  assert [cls.name for cls in mechanism_classes() if not cls.can_decode()] == []


@pytest.mark.parametrize('specs, attention, problem', [
    (['dense', 'gated'], {'gate': {'query_block': 'own'}}, r'layer 1 \(gated\): .*query_block=previous'),
    (['routing:2'], {'routing': {'selection': 'balanced_topw'}}, r'layer 0 \(routing:2\): .*selection=causal'),
])
def test_options_that_cannot_decode_are_named_before_anything_runs(specs, attention, problem):
  from sparseformer.errors import UserError
  from sparseformer.generation import Generator
  from sparseformer.training.state import split_model
  graphdef, params, state = split_model(model_for(specs, attention))
  with pytest.raises(UserError, match=problem):
    Generator(graphdef, {'params': params.to_pure_dict(), 'mechanism_state': state.to_pure_dict()}, vocab_size=VOCAB)


def test_ring_buffer_keeps_the_last_tokens():
  cache = kv_cache.empty(2, 4, 1, 2, jnp.float32)
  k = jnp.arange(2 * 7 * 2, dtype=jnp.float32).reshape(2, 7, 1, 2)
  filled = kv_cache.fill(cache, k, k, jnp.asarray([6, 3]))
  np.testing.assert_array_equal(filled['position'], [[4, 5, 2, 3], [0, 1, 2, -1]])
  np.testing.assert_array_equal(filled['k'][0, :, 0, 0], k[0, [4, 5, 2, 3], 0, 0])
  stepped = kv_cache.append(filled, k[:, :1] * 0 - 1, k[:, :1] * 0 - 1, jnp.asarray([6, 3]))
  np.testing.assert_array_equal(stepped['position'], [[4, 5, 6, 3], [0, 1, 2, 3]])
  assert float(stepped['k'][0, 2, 0, 0]) == -1 and float(stepped['k'][1, 3, 0, 0]) == -1
