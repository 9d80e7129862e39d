"""Rotary position embeddings, with a registry of frequency-scaling schemes.

A scaling scheme maps the base inverse frequencies to the ones used for a longer
context and may ask for a temperature on the attention logits (YaRN does).
"""

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


@register_scaling('linear')
def _linear_scaling(inv_freq, rope_cfg):
  """Position interpolation: positions are divided by `factor`."""
  return inv_freq / rope_cfg.factor, 1.0


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
