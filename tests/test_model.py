"""The language model: document isolation, causality, grouped-query attention, remat,
parameter metadata and the mechanism registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracles import masked_softmax_attention

from sparseformer.config import base_config
from sparseformer.errors import UserError
from sparseformer.model import LanguageModel, resolve_dims
from sparseformer.model.attention import get_mechanism
from sparseformer.model.attention.dense import DenseAttention
from sparseformer.model.attention.base import AttentionContext
from sparseformer.sharding import logical_spec

KNOWN_AXES = {'vocab', 'embed', 'heads', 'kv_heads', 'head_dim', 'mlp'}


def small_model(**overrides):
  cfg = base_config()
  m = cfg.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.dtype = 64, 2, 4, 2, 'float32'
  for key, value in overrides.items():
    m[key] = value
  return LanguageModel(resolve_dims(m, 259), nnx.Rngs(0))


def row(*documents, length):
  """tokens, positions, segment_ids [1, length] for documents packed into one row."""
  tokens, positions, segments = [], [], []
  for index, doc in enumerate(documents, start=1):
    tokens += list(doc)
    positions += list(range(len(doc)))
    segments += [index] * len(doc)
  pad = length - len(tokens)
  as_row = lambda xs: jnp.asarray([xs + [0] * pad], jnp.int32)
  return as_row(tokens), as_row(positions), as_row(segments)


def test_packed_documents_do_not_attend_across_boundaries():
  model = small_model()
  rng = np.random.default_rng(0)
  doc_a, doc_b = list(rng.integers(3, 259, 11)), list(rng.integers(3, 259, 9))
  other_a = list(rng.integers(3, 259, 11))
  logits, _ = model(*row(doc_a, doc_b, length=24))
  logits_changed_a, _ = model(*row(other_a, doc_b, length=24))
  b = slice(11, 20)
  assert not np.allclose(logits[0, :11], logits_changed_a[0, :11])
  np.testing.assert_allclose(logits[0, b], logits_changed_a[0, b], rtol=0, atol=1e-6)
  # B packed after A sees exactly what B alone at the start of a row sees.
  logits_alone, _ = model(*row(doc_b, length=24))
  np.testing.assert_allclose(logits[0, b], logits_alone[0, :9], rtol=1e-5, atol=1e-5)


def test_future_tokens_never_change_past_logits():
  model = small_model()
  tokens, positions, segments = row(list(range(3, 19)), length=16)
  logits, _ = model(tokens, positions, segments)
  changed = tokens.at[0, 10:].set(200)
  logits_changed, _ = model(changed, positions, segments)
  np.testing.assert_allclose(logits[0, :10], logits_changed[0, :10], rtol=0, atol=1e-6)
  assert not np.allclose(logits[0, 10:], logits_changed[0, 10:])


@pytest.mark.parametrize('heads,kv_heads', [(4, 4), (4, 2), (8, 1)])
def test_dense_mechanism_matches_naive_reference(heads, kv_heads):
  key = jax.random.split(jax.random.key(1), 3)
  b, t, d = 2, 12, 16
  q = jax.random.normal(key[0], (b, t, heads, d))
  k = jax.random.normal(key[1], (b, t, kv_heads, d))
  v = jax.random.normal(key[2], (b, t, kv_heads, d))
  segments = jnp.asarray([[1] * 5 + [2] * 7, [1] * 12], jnp.int32)
  positions = jnp.zeros((b, t), jnp.int32)
  ctx = AttentionContext(positions, segments, None, None)
  dims = resolve_dims(base_config().model, 259)
  y, aux = DenseAttention(dims, 0, nnx.Rngs(0))(q, k, v, ctx)
  np.testing.assert_allclose(y, masked_softmax_attention(q, k, v, causal=True, segment_ids=segments),
                             rtol=1e-5, atol=1e-5)
  assert aux == {'losses': {}, 'stats': {}}


def loss_and_grads(model, tokens, positions, segments):
  graphdef, params = nnx.split(model, nnx.Param)

  def loss(params):
    logits, _ = nnx.merge(graphdef, params)(tokens, positions, segments)
    return jnp.mean(jax.nn.logsumexp(logits, axis=-1))
  return jax.value_and_grad(loss)(params)


def test_remat_gives_the_same_loss_and_gradients():
  tokens, positions, segments = row(list(range(3, 20)), length=20)
  loss_plain, grads_plain = loss_and_grads(small_model(), tokens, positions, segments)
  for remat in ('full', 'dots'):
    loss_remat, grads_remat = loss_and_grads(small_model(remat=remat), tokens, positions, segments)
    np.testing.assert_allclose(loss_plain, loss_remat, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads_plain, grads_remat)


def randomized(model, seed=1):
  """The model with every parameter (biases and norm scales included) drawn at random."""
  graphdef, params = nnx.split(model, nnx.Param)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  drawn = [1.0 + 0.1 * jax.random.normal(key, x.shape) if x.ndim == 1 else 0.1 * jax.random.normal(key, x.shape)
           for key, x in zip(keys, leaves)]
  return nnx.merge(graphdef, jax.tree.unflatten(treedef, drawn))


@pytest.mark.parametrize('overrides', [
    {},
    {'qkv_bias': True},  # Qwen2
    {'qk_norm': True, 'norm_eps': 1e-5},  # Qwen3
    {'qkv_bias': True, 'out_bias': True, 'tie_embeddings': False},  # Llama with attention_bias
    {'num_kv_heads': 1, 'head_dim': 32, 'mlp_dim': 80, 'rope.theta': 500000.0},  # head_dim != d_model / heads
    {'rope.scaling': 'llama3', 'rope.factor': 8.0, 'rope.original_seq_len': 16},
    {'rope.scaling': 'yarn', 'rope.factor': 4.0, 'rope.original_seq_len': 8},
], ids=lambda o: ','.join(o) or 'plain')
def test_the_model_matches_a_numpy_decoder(overrides):
  import reference_lm
  from sparseformer.model import rope
  cfg = base_config()
  m = cfg.model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.dtype = 64, 2, 4, 2, 'float32'
  for key, value in overrides.items():
    section, _, field = key.rpartition('.')
    (m[section] if section else m)[field] = value
  dims = resolve_dims(m, 259)
  model = randomized(LanguageModel(dims, nnx.Rngs(0)))
  tokens = np.random.default_rng(0).integers(3, 259, 24)
  got, _ = model(jnp.asarray(tokens[None], jnp.int32), jnp.arange(24, dtype=jnp.int32)[None], None)
  inv_freq, logit_scale = rope.inverse_frequencies(dims.head_dim, dims.rope)
  want = reference_lm.logits(nnx.state(model, nnx.Param).to_pure_dict(), tokens, np.asarray(inv_freq, np.float64),
                             dims.norm_eps, logit_scale)
  np.testing.assert_allclose(np.asarray(got[0], np.float64), want, rtol=2e-4, atol=2e-4)


def test_optional_parts_add_exactly_their_parameters():
  def names(**overrides):
    flat = nnx.state(small_model(**overrides), nnx.Param).flat_state()
    return {'/'.join(map(str, path)) for path, _ in flat}
  plain = names()
  assert names(qkv_bias=True) - plain == {f'blocks/{i}/attention/{p}/bias' for i in (0, 1)
                                          for p in ('query', 'key', 'value')}
  assert names(out_bias=True) - plain == {f'blocks/{i}/attention/out/bias' for i in (0, 1)}
  assert names(qk_norm=True) - plain == {f'blocks/{i}/attention/{p}_norm/scale' for i in (0, 1)
                                         for p in ('query', 'key')}


def test_every_parameter_has_logical_axes():
  for tied in (True, False):
    params = nnx.state(small_model(tie_embeddings=tied, qkv_bias=True, out_bias=True, qk_norm=True), nnx.Param)
    for path, variable in jax.tree_util.tree_leaves_with_path(params, is_leaf=lambda x: isinstance(x, nnx.Variable)):
      axes = variable.get_metadata().get('logical_axes')
      assert axes is not None and len(axes) == variable.ndim, path
      assert set(axes) <= KNOWN_AXES, (path, axes)


def test_bf16_compute_keeps_float32_parameters():
  model = small_model(dtype='bfloat16')
  params = nnx.state(model, nnx.Param)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits, _ = model(*row(list(range(3, 13)), length=10))
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_unknown_mechanism_is_a_user_error():
  with pytest.raises(UserError, match="did you mean 'dense'"):
    get_mechanism('dnese')


def test_logical_rules_map_to_mesh_axes():
  rules = base_config().mesh.rules
  assert logical_spec(('batch', 'length'), rules) == jax.sharding.PartitionSpec(('data', 'fsdp'), 'sequence')
  assert logical_spec(('embed', 'heads', 'head_dim'), rules) == jax.sharding.PartitionSpec('fsdp', 'tensor', None)
  # a mesh axis is used once per array: vocab and heads both want 'tensor'
  assert logical_spec(('vocab', 'heads'), rules) == jax.sharding.PartitionSpec('tensor', None)
