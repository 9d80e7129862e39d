import math
import types

import numpy as np
import pytest

from sparseformer.errors import UserError
from sparseformer.model import rope

HEAD_DIM = 16
THETA = 10000.0


def cfg(scaling, factor=4.0, original_seq_len=256, theta=THETA, low_freq_factor=1.0, high_freq_factor=4.0):
  return types.SimpleNamespace(theta=theta, scaling=scaling, factor=factor, original_seq_len=original_seq_len,
                               low_freq_factor=low_freq_factor, high_freq_factor=high_freq_factor)


def base(theta=THETA, d=HEAD_DIM):
  return 1.0 / theta ** (np.arange(0, d, 2) / d)


def freqs(c, d=HEAD_DIM):
  inv_freq, scale = rope.inverse_frequencies(d, c)
  return np.asarray(inv_freq, np.float64), scale


def yarn_reference(factor, original_seq_len, d=HEAD_DIM):
  inv_freq = base(d=d)
  wavelength = 2 * np.pi / inv_freq
  r = original_seq_len / wavelength
  gamma = np.where(r > 32, 1.0, np.where(r < 1, 0.0, (r - 1) / 31))
  return (1 - gamma) * inv_freq / factor + gamma * inv_freq, (0.1 * math.log(factor) + 1) ** 2


def llama3_reference(factor, original_seq_len, low, high, theta=THETA, d=HEAD_DIM):
  """Llama 3.1's rule written as its three cases (meta-llama/llama-models apply_scaling)."""
  out = []
  for f in base(theta, d):
    wavelength = 2 * np.pi / f
    if wavelength < original_seq_len / high:
      out.append(f)
    elif wavelength > original_seq_len / low:
      out.append(f / factor)
    else:
      smooth = (original_seq_len / wavelength - low) / (high - low)
      out.append((1 - smooth) * f / factor + smooth * f)
  return np.array(out)


def test_registry_names():
  assert set(rope.scaling_names()) >= {'none', 'linear', 'ntk', 'yarn', 'llama3'}


@pytest.mark.parametrize('factor,original_seq_len,low,high,theta,d', [
    (8.0, 8192, 1.0, 4.0, 500000.0, 64),  # Llama 3.1 / 3.2
    (32.0, 8192, 1.0, 4.0, 500000.0, 128),  # Llama 3.2 1B/3B
    (4.0, 256, 2.0, 8.0, THETA, HEAD_DIM),
])
def test_llama3_matches_its_three_cases(factor, original_seq_len, low, high, theta, d):
  inv_freq, scale = freqs(cfg('llama3', factor, original_seq_len, theta, low, high), d)
  want = llama3_reference(factor, original_seq_len, low, high, theta, d)
  np.testing.assert_allclose(inv_freq, want, rtol=1e-5)
  assert scale == 1.0
  assert inv_freq[0] == pytest.approx(base(theta, d)[0], rel=1e-6)  # the fastest kept
  assert inv_freq[-1] == pytest.approx(base(theta, d)[-1] / factor, rel=1e-5)  # the slowest divided
  middle = (inv_freq < base(theta, d) * (1 - 1e-6)) & (inv_freq > base(theta, d) / factor * (1 + 1e-6))
  assert middle.any()  # some frequencies are blended


def test_llama3_needs_original_seq_len_and_ordered_factors():
  with pytest.raises(UserError, match='model.rope.original_seq_len'):
    rope.inverse_frequencies(HEAD_DIM, cfg('llama3', original_seq_len=0))
  with pytest.raises(UserError, match='low_freq_factor=4.0, high_freq_factor=1.0: use 0 < low < high'):
    rope.inverse_frequencies(HEAD_DIM, cfg('llama3', low_freq_factor=4.0, high_freq_factor=1.0))


def test_none_and_linear():
  np.testing.assert_allclose(freqs(cfg('none'))[0], base(), rtol=1e-6)
  assert freqs(cfg('none'))[1] == 1.0
  inv_freq, scale = freqs(cfg('linear', factor=4.0))
  np.testing.assert_allclose(inv_freq, base() / 4.0, rtol=1e-6)
  assert scale == 1.0


def test_ntk():
  inv_freq, scale = freqs(cfg('ntk', factor=8.0))
  np.testing.assert_allclose(inv_freq, base(theta=THETA * 8.0 ** (HEAD_DIM / (HEAD_DIM - 2))), rtol=1e-5)
  assert scale == 1.0
  assert inv_freq[0] == pytest.approx(1.0)
  assert inv_freq[-1] == pytest.approx(base()[-1] / 8.0, rel=1e-5)


@pytest.mark.parametrize('factor,original_seq_len,d', [(4.0, 256, 16), (16.0, 4096, 64), (2.5, 1000, 32)])
def test_yarn_matches_formula(factor, original_seq_len, d):
  inv_freq, scale = freqs(cfg('yarn', factor, original_seq_len), d)
  want, want_scale = yarn_reference(factor, original_seq_len, d)
  np.testing.assert_allclose(inv_freq, want, rtol=1e-5)
  assert scale == pytest.approx(want_scale)


def test_yarn_ends_and_ramp():
  factor = 4.0
  inv_freq, scale = freqs(cfg('yarn', factor, original_seq_len=256))
  r = 256 * base() / (2 * np.pi)
  assert r[0] > 32 and r[-1] < 1 and ((r > 1) & (r < 32)).any()
  assert inv_freq[0] == pytest.approx(base()[0], rel=1e-6)
  assert inv_freq[-1] == pytest.approx(base()[-1] / factor, rel=1e-6)
  ramp = (r > 1) & (r < 32)
  assert np.all(inv_freq[ramp] < base()[ramp]) and np.all(inv_freq[ramp] > base()[ramp] / factor)
  assert scale == pytest.approx((0.1 * math.log(4.0) + 1) ** 2)


@pytest.mark.parametrize('scaling', ['none', 'linear', 'ntk', 'yarn', 'llama3'])
def test_factor_one_is_unscaled(scaling):
  inv_freq, scale = freqs(cfg(scaling, factor=1.0))
  np.testing.assert_allclose(inv_freq, base(), rtol=1e-6)
  assert scale == pytest.approx(1.0)


@pytest.mark.parametrize('scaling', ['linear', 'ntk', 'yarn', 'llama3'])
@pytest.mark.parametrize('factor', [0.5, 0.0, -2.0])
def test_factor_below_one_rejected(scaling, factor):
  with pytest.raises(UserError, match='model.rope.factor'):
    rope.inverse_frequencies(HEAD_DIM, cfg(scaling, factor=factor))


def test_yarn_needs_original_seq_len():
  with pytest.raises(UserError, match='model.rope.original_seq_len'):
    rope.inverse_frequencies(HEAD_DIM, cfg('yarn', original_seq_len=0))


def test_unknown_scaling():
  with pytest.raises(UserError, match='model.rope.scaling'):
    rope.inverse_frequencies(HEAD_DIM, cfg('dynamic'))


def test_linear_angles_are_interpolated_positions():
  s = 4.0
  positions = np.arange(0, 64, 4, dtype=np.int32)[None, :]
  cos, sin = rope.rotary_angles(positions, rope.inverse_frequencies(HEAD_DIM, cfg('linear', factor=s))[0])
  angles = (positions / s)[..., None] * base()
  np.testing.assert_allclose(np.asarray(cos), np.cos(angles), atol=1e-5)
  np.testing.assert_allclose(np.asarray(sin), np.sin(angles), atol=1e-5)
  cos0, sin0 = rope.rotary_angles(positions // 4, rope.inverse_frequencies(HEAD_DIM, cfg('none'))[0])
  np.testing.assert_allclose(np.asarray(cos), np.asarray(cos0), atol=1e-5)
  np.testing.assert_allclose(np.asarray(sin), np.asarray(sin0), atol=1e-5)


def test_yarn_model_forward_under_jit():
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from sparseformer.config import base_config
  from sparseformer.model import LanguageModel, resolve_dims

  def logits(scaling):
    m = base_config().model
    m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.dtype = 32, 1, 2, 2, 'float32'
    m.rope.scaling, m.rope.factor, m.rope.original_seq_len = scaling, 4.0, 8
    model = LanguageModel(resolve_dims(m, 259), nnx.Rngs(0))
    tokens = jnp.arange(3, 35, dtype=jnp.int32)[None]
    positions = jnp.arange(32, dtype=jnp.int32)[None]
    return nnx.jit(lambda mdl: mdl(tokens, positions, jnp.ones_like(tokens))[0])(model)

  yarn, none = logits('yarn'), logits('none')
  assert bool(jnp.isfinite(yarn).all())
  assert float(jnp.abs(yarn - none).max()) > 1e-4
