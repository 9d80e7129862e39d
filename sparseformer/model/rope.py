"""Rotary position embeddings, with a registry of frequency-scaling schemes.

A scaling scheme maps the base inverse frequencies to the ones used for a longer
context and may ask for a temperature on the attention logits (YaRN does).
"""

import math

import jax.numpy as jnp

from sparseformer.errors import UserError

_SCALINGS = {}


def register_scaling(name):
  def wrap(fn):
    _SCALINGS[name] = fn
    return fn
  return wrap


@register_scaling('none')
def _no_scaling(inv_freq, rope_cfg):
  return inv_freq, 1.0


def _factor(rope_cfg):
  factor = rope_cfg.factor
  if not factor >= 1:
    raise UserError(f'model.rope.factor={factor} with model.rope.scaling={rope_cfg.scaling!r}: '
                    'the context extension factor must be >= 1')
  return factor


@register_scaling('linear')
def _linear_scaling(inv_freq, rope_cfg):
  """Position interpolation: positions are divided by `factor`."""
  return inv_freq / _factor(rope_cfg), 1.0


@register_scaling('ntk')
def _ntk_scaling(inv_freq, rope_cfg):
  """NTK-aware: theta becomes theta * factor ** (d / (d - 2)), d = head_dim.

  The highest frequency is kept, the lowest is divided by exactly `factor`.
  """
  factor = _factor(rope_cfg)
  d = 2 * inv_freq.shape[0]
  if d <= 2:
    return inv_freq, 1.0
  # (theta * s ** (d / (d - 2))) ** (-2i / d) = theta ** (-2i / d) * s ** (-2i / (d - 2))
  return inv_freq * factor ** (-jnp.arange(0, d, 2, dtype=jnp.float32) / (d - 2)), 1.0


YARN_BETA_FAST = 32.0
YARN_BETA_SLOW = 1.0


@register_scaling('yarn')
def _yarn_scaling(inv_freq, rope_cfg):
  """YaRN (Peng et al. 2023, arXiv 2309.00071), "NTK-by-parts" plus attention temperature.

  With r = original_seq_len / wavelength (wavelength = 2 pi / inv_freq), the ramp
  gamma = clip((r - beta_slow) / (beta_fast - beta_slow), 0, 1) blends
  inv_freq' = (1 - gamma) * inv_freq / factor + gamma * inv_freq: frequencies that turn more
  than beta_fast times over the original context keep their value, those that turn less than
  beta_slow times are fully interpolated. The ramp is the paper's continuous one, over r,
  not rounded to whole dimensions as some implementations do.

  The paper scales both q and k by sqrt(1 / t) = 0.1 ln(factor) + 1; the model multiplies
  q.k by the returned logit scale (on top of 1 / sqrt(head_dim)), so it is the square,
  (0.1 ln(factor) + 1) ** 2.
  """
  factor = _factor(rope_cfg)
  ratio = _original_seq_len(rope_cfg) * inv_freq / (2 * math.pi)
  gamma = jnp.clip((ratio - YARN_BETA_SLOW) / (YARN_BETA_FAST - YARN_BETA_SLOW), 0.0, 1.0)
  scaled = (1 - gamma) * inv_freq / factor + gamma * inv_freq
  return scaled, (0.1 * math.log(factor) + 1) ** 2


def _original_seq_len(rope_cfg):
  if rope_cfg.original_seq_len <= 0:
    raise UserError(f'model.rope.scaling={rope_cfg.scaling!r} needs model.rope.original_seq_len (the context '
                    f'length the checkpoint was trained at) > 0; got {rope_cfg.original_seq_len}')
  return rope_cfg.original_seq_len


@register_scaling('llama3')
def _llama3_scaling(inv_freq, rope_cfg):
  """Llama 3.1's scaling (meta-llama/llama-models, `apply_scaling`): with L =
  original_seq_len, frequencies whose wavelength is shorter than L / high_freq_factor keep
  their value, those longer than L / low_freq_factor are divided by `factor`, and in
  between the two are blended linearly in L / wavelength. No logit temperature."""
  factor, original = _factor(rope_cfg), _original_seq_len(rope_cfg)
  low, high = rope_cfg.low_freq_factor, rope_cfg.high_freq_factor
  if not 0 < low < high:
    raise UserError(f'model.rope.low_freq_factor={low}, high_freq_factor={high}: use 0 < low < high')
  turns = original * inv_freq / (2 * math.pi)  # L / wavelength
  blend = jnp.clip((turns - low) / (high - low), 0.0, 1.0)  # 0: long wavelengths, 1: short ones
  return (1 - blend) * inv_freq / factor + blend * inv_freq, 1.0


def scaling_names():
  return tuple(_SCALINGS)


def inverse_frequencies(head_dim, rope_cfg):
  """(inverse frequencies [head_dim // 2], logit scale factor) for this config."""
  if rope_cfg.scaling not in _SCALINGS:
    raise UserError(f'model.rope.scaling={rope_cfg.scaling!r}; known: {", ".join(_SCALINGS)}')
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (rope_cfg.theta ** exponents)
  return _SCALINGS[rope_cfg.scaling](inv_freq, rope_cfg)


def rotary_angles(positions, inv_freq):
  """cos and sin [B, T, head_dim // 2] for integer positions [B, T]."""
  angles = positions.astype(jnp.float32)[..., None] * inv_freq
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(x, cos, sin):
  """Rotates x [B, T, heads, head_dim] by the angles, pairing the two halves of head_dim."""
  half = x.shape[-1] // 2
  x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
  cos, sin = cos[:, :, None, :], sin[:, :, None, :]
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)
