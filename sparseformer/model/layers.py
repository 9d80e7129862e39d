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
