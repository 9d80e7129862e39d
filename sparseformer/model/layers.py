"""Building blocks shared by every layer: parameters with logical axes, norms, MLP."""

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs, shape, logical_axes, *, dtype, std=None, value=None):
  """A parameter carrying its logical axis names (mapped to mesh axes by the rules table)."""
  assert len(shape) == len(logical_axes), (shape, logical_axes)
  if value is None:
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
  return nnx.Param(jnp.asarray(value, dtype), logical_axes=tuple(logical_axes))


class Einsum(nnx.Module):
  """A projection written as an einsum over named axes, e.g. 'btd,dhk->bthk'; with
  `bias_dims` (how many trailing output axes the bias spans: the kernel's last ones) a
  bias, zero at initialisation, is added."""

  def __init__(self, equation, shape, logical_axes, dims, rngs, *, std=None, bias_dims=0):
    self.equation = equation
    self.kernel = param(rngs, shape, logical_axes, dtype=dims.weight_dtype,
                        std=dims.init_std if std is None else std)
    if bias_dims:
      bias_shape = tuple(shape[-bias_dims:])
      self.bias = param(rngs, bias_shape, logical_axes[-bias_dims:], dtype=dims.weight_dtype,
                        value=jnp.zeros(bias_shape))
    self.compute_dtype = dims.compute_dtype

  def __call__(self, x):
    y = jnp.einsum(self.equation, x.astype(self.compute_dtype), self.kernel[...].astype(self.compute_dtype))
    if hasattr(self, 'bias'):
      y = y + self.bias[...].astype(self.compute_dtype)
    return y


class RMSNorm(nnx.Module):
  """RMS normalisation over the last axis, of d_model features (or `size` features named
  `axis`: Qwen3's per-head q/k norms)."""

  def __init__(self, dims, rngs, *, size=None, axis='embed'):
    size = size or dims.d_model
    self.scale = param(rngs, (size,), (axis,), dtype=dims.weight_dtype, value=jnp.ones((size,)))
    self.eps = dims.norm_eps
    self.compute_dtype = dims.compute_dtype

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (normed * self.scale[...].astype(jnp.float32)).astype(self.compute_dtype)


def output_std(dims):
  """Residual-branch outputs start smaller so deep stacks start near the identity."""
  return dims.init_std / (2 * dims.num_layers) ** 0.5


class SwiGLU(nnx.Module):

  def __init__(self, dims, rngs):
    d, f = dims.d_model, dims.mlp_dim
    self.gate = Einsum('btd,df->btf', (d, f), ('embed', 'mlp'), dims, rngs)
    self.up = Einsum('btd,df->btf', (d, f), ('embed', 'mlp'), dims, rngs)
    self.down = Einsum('btf,fd->btd', (f, d), ('mlp', 'embed'), dims, rngs, std=output_std(dims))

  def __call__(self, x):
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class ShortConv(nnx.Module):
  """A causal depthwise convolution over each token and the `width - 1` before it in its
  document, added to its input: x + sum_j w[j] * x[t - j]. Zero at initialisation, so a
  model gains it as the identity. It hands attention a mix of neighbouring tokens, the
  "previous token" features an induction head otherwise needs a whole layer to build
  (Zoology's and Based's short convolutions; Allen-Zhu 2025, "Canon layers")."""

  def __init__(self, dims, rngs):
    self.width = dims.short_conv
    self.kernel = param(rngs, (self.width, dims.d_model), ('conv_width', 'embed'), dtype=dims.weight_dtype,
                        value=jnp.zeros((self.width, dims.d_model)))
    self.compute_dtype = dims.compute_dtype

  def __call__(self, x, positions, segment_ids):
    """x [B, T, D] with positions [B, T] (each document counts from 0) and segment_ids
    [B, T] or None: a tap reaches back only within the token's document."""
    kernel = self.kernel[...].astype(self.compute_dtype)
    out = x + kernel[0] * x
    for j in range(1, self.width):
      earlier = jnp.pad(x, ((0, 0), (j, 0), (0, 0)))[:, :-j]
      same_document = positions >= j
      if segment_ids is not None:
        same_document &= jnp.pad(segment_ids, ((0, 0), (j, 0)), constant_values=-1)[:, :-j] == segment_ids
      out = out + kernel[j] * jnp.where(same_document[..., None], earlier, 0)
    return out

  def init_state(self, batch, d_model, dtype):
    """The decoding state: the last width - 1 inputs of each row, oldest first."""
    return jnp.zeros((batch, self.width - 1, d_model), dtype)

  def prefill_state(self, x, lengths):
    """The state after prompts x [B, P, D] right-padded past `lengths` [B]."""
    offsets = lengths[:, None] - self.width + 1 + jnp.arange(self.width - 1)[None, :]
    taps = jnp.take_along_axis(x, jnp.clip(offsets, 0, x.shape[1] - 1)[..., None], axis=1)
    return jnp.where((offsets >= 0)[..., None], taps, 0).astype(x.dtype)

  def decode(self, x, state):
    """(output, state) for one new token per row, x [B, 1, D]."""
    window = jnp.concatenate([state, x.astype(state.dtype)], axis=1)  # oldest first, x last
    kernel = self.kernel[...].astype(self.compute_dtype)
    out = x + jnp.einsum('bjd,jd->bd', window[:, ::-1], kernel)[:, None].astype(x.dtype)
    return out, window[:, 1:]
