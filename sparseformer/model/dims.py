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
  norm_eps: float
  init_std: float
  dtype: str
  param_dtype: str
  remat: str
  rope: ml_collections.FrozenConfigDict
  attention: ml_collections.FrozenConfigDict  # options shared by every layer's mechanism
  layer_mechanisms: tuple  # one mechanism name per layer

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
  layer_mechanisms = tuple(m.layer_attention) or (m.attention.kind,) * m.num_layers
  return ModelDims(
      vocab_size=vocab,
      d_model=m.d_model,
      num_layers=m.num_layers,
      num_heads=m.num_heads,
      num_kv_heads=m.num_kv_heads or m.num_heads,
      head_dim=m.head_dim or m.d_model // m.num_heads,
      mlp_dim=m.mlp_dim or round_up(8 * m.d_model // 3, 64),
      tie_embeddings=m.tie_embeddings,
      norm_eps=m.norm_eps,
      init_std=m.init_std,
      dtype=dtype,
      param_dtype=m.param_dtype,
      remat=m.remat,
      rope=ml_collections.FrozenConfigDict(m.rope),
      attention=ml_collections.FrozenConfigDict(m.attention),
      layer_mechanisms=layer_mechanisms,
  )
