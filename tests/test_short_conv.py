"""model.short_conv: the causal depthwise convolution before each attention. It reaches
back only within a token's document, starts as the identity, and decodes through its
cache as the forward pass computes it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_helpers import VOCAB, check_teacher_forcing, jitted, model_for
from flax import nnx

from sparseformer.model.layers import ShortConv


def random_kernels(model, seed=0):
  """Gives every block's convolution random taps (they start at zero)."""
  for i, block in enumerate(model.blocks):
    kernel = block.short_conv.kernel
    kernel[...] = 0.5 * jax.random.normal(jax.random.key(seed + i), kernel[...].shape)


def brute_force(x, kernel, segment_ids):
  """out[b, t] = x[b, t] + sum over taps j of kernel[j] * x[b, t - j], for t - j in t's document."""
  out = np.array(x, np.float64)
  for b in range(x.shape[0]):
    for t in range(x.shape[1]):
      for j in range(kernel.shape[0]):
        if t - j >= 0 and segment_ids[b, t - j] == segment_ids[b, t]:
          out[b, t] += kernel[j] * x[b, t - j]
  return out


def test_taps_stay_within_each_packed_document():
  dims = model_for(['dense'], short_conv=3).dims
  conv = ShortConv(dims, nnx.Rngs(0))
  kernel = np.asarray(jax.random.normal(jax.random.key(1), (3, dims.d_model)))
  conv.kernel[...] = kernel
  segment_ids = np.array([[1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 0], [1] * 12])
  starts = np.zeros_like(segment_ids)
  for b in range(2):
    for t in range(1, 12):
      starts[b, t] = starts[b, t - 1] + 1 if segment_ids[b, t] == segment_ids[b, t - 1] else 0
  x = np.asarray(jax.random.normal(jax.random.key(2), (2, 12, dims.d_model)))
  got = conv(jnp.asarray(x), jnp.asarray(starts), jnp.asarray(segment_ids))
  np.testing.assert_allclose(got, brute_force(x, kernel, segment_ids), rtol=1e-5, atol=1e-5)
  one_document = conv(jnp.asarray(x), jnp.broadcast_to(jnp.arange(12), (2, 12)), None)
  np.testing.assert_allclose(one_document[1], brute_force(x, kernel, np.ones_like(segment_ids))[1], rtol=1e-5,
                             atol=1e-5)


def test_a_new_convolution_leaves_the_model_unchanged():
  tokens = jax.random.randint(jax.random.key(0), (2, 24), 3, VOCAB)
  positions = jnp.broadcast_to(jnp.arange(24), (2, 24))
  plain, _ = jitted(model_for(['dense', 'window:8']), '__call__')(tokens, positions, None)
  with_conv = model_for(['dense', 'window:8'], short_conv=4)
  same, _ = jitted(with_conv, '__call__')(tokens, positions, None)
  np.testing.assert_array_equal(same, plain)
  random_kernels(with_conv)
  changed, _ = jitted(with_conv, '__call__')(tokens, positions, None)
  assert np.abs(np.asarray(changed) - np.asarray(plain)).max() > 1e-2


@pytest.mark.parametrize('width', [1, 4])
def test_teacher_forced_decoding_matches_the_forward_pass(width):
  check_teacher_forcing(['dense', 'window:8'], short_conv=width, prepare=random_kernels)
