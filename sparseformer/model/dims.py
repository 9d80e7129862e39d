"""The model's resolved sizes: config values with every 0/'auto' filled in."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


@dataclasses.dataclass(frozen=True)
class ModelDims:
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  tie_embeddings: bool
  qkv_bias: bool
  out_bias: bool
  qk_norm: bool
  norm_eps: float
  init_std: float
  dtype: str
  param_dtype: str
  remat: str
  short_conv: int  # taps of the convolution before each attention; 0: none
  rope: ml_collections.FrozenConfigDict
  attention: ml_collections.FrozenConfigDict  # options shared by every layer's mechanism
  layer_mechanisms: tuple  # one mechanism spec (name[:argument]) per layer

  @property
  def compute_dtype(self):
    return DTYPES[self.dtype]

  @property
  def weight_dtype(self):
    return DTYPES[self.param_dtype]

  @property
  def group_size(self):
    """Query heads per key/value head (grouped-query attention)."""
    return self.num_heads // self.num_kv_heads


def alternate_layer_indices(pattern, num_layers):
  """The layers a `model.attention.alternate_layers` pattern names: '' (none), 'bottom:N',
  'top:N', 'every:K' (layers K-1, 2K-1, ...), or explicit indices '0,5,11'.
  ValueError for a pattern that does not parse or names a layer past num_layers."""
  if not pattern:
    return ()
  kind, _, count = pattern.partition(':')
  if kind in ('bottom', 'top', 'every'):
    if not count.isdigit() or int(count) < 1:
      raise ValueError(f'{kind} needs a positive count, e.g. {kind}:2')
    n = int(count)
    layers = {'bottom': range(min(n, num_layers)), 'top': range(max(num_layers - n, 0), num_layers),
              'every': range(n - 1, num_layers, n)}[kind]
    return tuple(layers)
  try:
    layers = tuple(sorted({int(part) for part in pattern.split(',')}))
  except ValueError:
    raise ValueError("use '', bottom:N, top:N, every:K or layer indices such as 0,5") from None
  if layers[0] < 0 or layers[-1] >= num_layers:
    raise ValueError(f'layer indices must lie in [0, {num_layers})')
  return layers


def layer_mechanism_specs(m):
  """One mechanism spec per layer: model.layer_attention if given, else attention.kind with
  attention.alternate_kind at the layers attention.alternate_layers names (MASFormer's
  dense layers among windows, routing layers among windows, a dense layer among SSE...)."""
  if m.layer_attention:
    return tuple(m.layer_attention)
  alternate = alternate_layer_indices(m.attention.alternate_layers, m.num_layers)
  return tuple(m.attention.alternate_kind if i in alternate else m.attention.kind for i in range(m.num_layers))


def round_up(n, multiple):
  return -(-n // multiple) * multiple


def resolve_dims(model_cfg, tokenizer_vocab_size, platform=None):
  """ModelDims from `config.model`; the tokenizer decides the vocabulary when it is 0."""
  m = model_cfg
  vocab = m.vocab_size or round_up(tokenizer_vocab_size, 128)
  if vocab < tokenizer_vocab_size:
    from sparseformer.errors import UserError
    raise UserError(f'model.vocab_size={vocab} is smaller than the tokenizer vocabulary ({tokenizer_vocab_size})')
  platform = platform or jax.default_backend()
  dtype = m.dtype if m.dtype != 'auto' else ('float32' if platform == 'cpu' else 'bfloat16')
  layer_mechanisms = layer_mechanism_specs(m)
  return ModelDims(
      vocab_size=vocab,
      d_model=m.d_model,
      num_layers=m.num_layers,
      num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads or m.num_heads,
      head_dim=m.head_dim or m.d_model // m.num_heads,
      mlp_dim=m.mlp_dim or round_up(8 * m.d_model // 3, 64),
      tie_embeddings=m.tie_embeddings,
      qkv_bias=m.qkv_bias,
      out_bias=m.out_bias,
      qk_norm=m.qk_norm,
      norm_eps=m.norm_eps,
      init_std=m.init_std,
      dtype=dtype,
      param_dtype=m.param_dtype,
      remat=m.remat,
      short_conv=m.short_conv,
      rope=ml_collections.FrozenConfigDict(m.rope),
      attention=ml_collections.FrozenConfigDict(m.attention),
      layer_mechanisms=layer_mechanisms,
  )
