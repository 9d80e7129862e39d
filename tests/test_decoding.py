"""Decoding with a cache: teacher-forced decoding (prefill a prompt, then feed the
reference tokens one at a time) gives the logits of the full forward pass at every
position, for every mechanism that decodes, in float32 on the CPU, with prompts of
different lengths in one batch."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sparseformer.config import base_config
from sparseformer.model import LanguageModel, resolve_dims
from sparseformer.model.attention import kv_cache

VOCAB = 259
# Logits are O(1); prefill (the training kernels) and decode (one query against the cache)
# sum in different orders in float32.
TOLERANCE = 2e-4

# (layer spec(s), model.attention overrides): every mechanism that decodes, at sizes
# where its sparsity is visible within the sequence (block size 8, 40 tokens).
CASES = {
    'dense': (['dense'], {}),
    'window': (['window:8'], {}),
    'block_local': (['block_local:16'], {}),
    'strided': (['strided:16'], {}),
    'masformer': (['dense', 'window:8'], {}),
}


def model_for(specs, attention=None, **model_overrides):
  cfg = base_config()
  m = cfg.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.dtype = 64, len(specs), 4, 2, 'float32'
  m.attention.kind = specs[0]
  m.layer_attention = tuple(specs)
  m.attention.block_size = 8
  for key, value in (attention or {}).items():
    m.attention[key] = value
  for key, value in model_overrides.items():
    m[key] = value
  return LanguageModel(resolve_dims(m, VOCAB), nnx.Rngs(0))


def teacher_forced_logits(model, tokens, prompt_lengths, prompt_pad):
  """[B, T, vocab] logits: row b's prompt of prompt_lengths[b] tokens prefilled (padded to
  prompt_pad), then its later tokens decoded one by one; NaN where no step gave one
  (before the prompt's last token)."""
  batch, length = tokens.shape
  lengths = jnp.asarray(prompt_lengths, jnp.int32)
  prompts = jnp.where(jnp.arange(prompt_pad)[None] < lengths[:, None], tokens[:, :prompt_pad], 0)
  cache = model.init_cache(batch, length)
  logits, cache = model.prefill(prompts, lengths, cache)
  out = np.full((batch, length, logits.shape[-1]), np.nan, np.float32)
  rows = np.arange(batch)
  out[rows, np.asarray(lengths) - 1] = np.asarray(logits)
  decode = nnx.jit(lambda m, t, p, c: m.decode(t, p, c))
  positions = lengths
  for _ in range(length - min(prompt_lengths)):
    fed = jnp.take_along_axis(tokens, jnp.minimum(positions, length - 1)[:, None], axis=1)[:, 0]
    logits, cache = decode(model, fed, positions, cache)
    live = np.asarray(positions) < length
    out[rows[live], np.asarray(positions)[live]] = np.asarray(logits)[live]
    positions = positions + 1
  return out


@pytest.mark.parametrize('case', sorted(CASES))
def test_teacher_forced_decoding_matches_the_forward_pass(case):
  specs, attention = CASES[case]
  model = model_for(specs, attention)
  batch, length = 3, 40
  tokens = jax.random.randint(jax.random.key(1), (batch, length), 3, VOCAB)
  reference, _ = model(tokens, jnp.broadcast_to(jnp.arange(length), (batch, length)), None)
  prompt_lengths = [5, 17, 12]  # ragged, one past a block boundary, one past the window
  decoded = teacher_forced_logits(model, tokens, prompt_lengths, prompt_pad=24)
  for b, start in enumerate(prompt_lengths):
    np.testing.assert_allclose(decoded[b, start - 1:], np.asarray(reference)[b, start - 1:], rtol=0,
                               atol=TOLERANCE, err_msg=f'{case}, row {b}')


def test_every_registered_mechanism_decodes_or_is_listed():
  """A mechanism without decoding is named by undecodable_layers (what generate reports)."""
  model = model_for(['dense', 'window:8'])
  assert model.undecodable_layers() == []


def test_ring_buffer_keeps_the_last_tokens():
  cache = kv_cache.empty(2, 4, 1, 2, jnp.float32)
  k = jnp.arange(2 * 7 * 2, dtype=jnp.float32).reshape(2, 7, 1, 2)
  filled = kv_cache.fill(cache, k, k, jnp.asarray([6, 3]))
  np.testing.assert_array_equal(filled['position'], [[4, 5, 2, 3], [0, 1, 2, -1]])
  np.testing.assert_array_equal(filled['k'][0, :, 0, 0], k[0, [4, 5, 2, 3], 0, 0])
  stepped = kv_cache.append(filled, k[:, :1] * 0 - 1, k[:, :1] * 0 - 1, jnp.asarray([6, 3]))
  np.testing.assert_array_equal(stepped['position'], [[4, 5, 6, 3], [0, 1, 2, 3]])
  assert float(stepped['k'][0, 2, 0, 0]) == -1 and float(stepped['k'][1, 3, 0, 0]) == -1
