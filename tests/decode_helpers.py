"""Teacher-forced decoding: the shared setup of the decoding tests."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseformer.config import base_config
from sparseformer.model import LanguageModel, resolve_dims

VOCAB = 259
# Logits are O(1); prefill (the training kernels) and decode (one query against the cache)
# sum in different orders in float32.
TOLERANCE = 2e-4


def model_for(specs, attention=None, **model_overrides):
  """A float32 model of one layer per spec (4 heads, 2 kv heads, block size 8);
  `attention`: model.attention overrides (a nested section as a dict)."""
  cfg = base_config()
  m = cfg.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.dtype = 64, len(specs), 4, 2, 'float32'
  m.attention.kind = specs[0]
  m.layer_attention = tuple(specs)
  m.attention.block_size = 8
  for key, value in (attention or {}).items():
    if isinstance(value, dict):
      m.attention[key].update(value)
    else:
      m.attention[key] = value
  for key, value in model_overrides.items():
    m[key] = value
  return LanguageModel(resolve_dims(m, VOCAB), nnx.Rngs(0))


def jitted(model, method):
  """jax.jit of model.method(*args) over the model's state (one compile per shape; the
  model's arrays are arguments, not constants folded into the program)."""
  graphdef, state = nnx.split(model)
  fn = jax.jit(lambda state, *args: getattr(nnx.merge(graphdef, state), method)(*args))
  return lambda *args: fn(state, *args)


def teacher_forced_logits(model, tokens, prompt_lengths, prompt_pad):
  """[B, T, vocab] logits: row b's prompt of prompt_lengths[b] tokens prefilled (padded to
  prompt_pad), then its later tokens decoded one by one; NaN where no step gave one
  (before the prompt's last token)."""
  batch, length = tokens.shape
  lengths = jnp.asarray(prompt_lengths, jnp.int32)
  prompts = jnp.where(jnp.arange(prompt_pad)[None] < lengths[:, None], tokens[:, :prompt_pad], 0)
  logits, cache = jitted(model, 'prefill')(prompts, lengths, model.init_cache(batch, length))
  out = np.full((batch, length, logits.shape[-1]), np.nan, np.float32)
  rows = np.arange(batch)
  out[rows, np.asarray(lengths) - 1] = np.asarray(logits)
  decode = jitted(model, 'decode')
  positions = lengths
  for _ in range(length - min(prompt_lengths)):
    fed = jnp.take_along_axis(tokens, jnp.minimum(positions, length - 1)[:, None], axis=1)[:, 0]
    logits, cache = decode(fed, positions, cache)
    live = np.asarray(positions) < length
    out[rows[live], np.asarray(positions)[live]] = np.asarray(logits)[live]
    positions = positions + 1
  return out


def check_teacher_forcing(specs, attention=None, prompt_lengths=(5, 17, 12), length=40, prompt_pad=24, seed=1,
                          tolerance=TOLERANCE, prepare=None, **model_overrides):
  """Asserts that teacher-forced decoding gives the forward pass's logits at every
  position from each row's last prompt token on (rows of different prompt lengths).
  prepare(model), if given, may change the model's parameters first."""
  model = model_for(specs, attention, **model_overrides)
  if prepare is not None:
    prepare(model)
  batch = len(prompt_lengths)
  tokens = jax.random.randint(jax.random.key(seed), (batch, length), 3, VOCAB)
  reference, _ = jitted(model, '__call__')(tokens, jnp.broadcast_to(jnp.arange(length), (batch, length)), None)
  decoded = teacher_forced_logits(model, tokens, list(prompt_lengths), prompt_pad)
  for b, start in enumerate(prompt_lengths):
    np.testing.assert_allclose(decoded[b, start - 1:], np.asarray(reference)[b, start - 1:], rtol=0,
                               atol=tolerance, err_msg=f'{specs}, row {b}')
