"""Decoding with a cache for the block-selection mechanisms (moba, infllm_v2, nsa):
teacher-forced decoding gives the forward pass's logits at every position
(decode_helpers.py: prompts of 5, 17 and 12 tokens in one batch, block size 8, 40 tokens),
at option settings small enough that each query block chooses among several earlier
blocks; two layers where the second layer's cache is filled from the first's prefill
outputs at every prompt token. NSA's phi, position embeddings and gates are moved away
from their initial values, so that decoding must apply each. Also: after prefill and after
every step the cache holds the forward's votes and compressed keys (errors too small to
flip a choice in the logits show there); the decode choice of blocks equals the forward's
choose_blocks for every query block; the cache keeps its shapes and dtypes through
prefill and decode (one compile for every step)."""

import decode_helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from decode_helpers import check_teacher_forcing, model_for
from flax import nnx

from sparseformer.model.attention import AttentionContext, block_selection
from sparseformer.model.attention.compressed_scores import selection_scores
from sparseformer.model.attention.nsa import NativeSparseAttention

SELECT = {'select_block': 8, 'cmp_len': 4, 'cmp_stride': 2, 'select_count': 3, 'local_blocks': 1}


@pytest.mark.parametrize('specs,options', [
    (['moba', 'moba'], {'block': 8, 'top_k': 2}),
    (['moba'], {'block': 16, 'top_k': 2, 'share': 'head'}),  # a MoBA block of two query blocks, per query head
])
def test_moba_decodes_as_its_forward(specs, options):
  check_teacher_forcing(specs, {'moba': options})


@pytest.mark.parametrize('specs,options,lengths', [
    (['infllm_v2', 'infllm_v2'], {'sparse_from': 16}, {}),
    (['infllm_v2'], {'sparse_from': 16, 'cmp_len': 8, 'cmp_stride': 4, 'select_count': 4, 'local_blocks': 2}, {}),
    # sparse at the cache's length (40) though the prompts' 32 are below sparse_from: prefill runs sparse too
    (['infllm_v2', 'infllm_v2'], {'sparse_from': 36}, {'prompt_lengths': (5, 30, 12), 'prompt_pad': 32}),
    (['infllm_v2'], {'sparse_from': 41}, {}),  # a cache shorter than sparse_from: dense, as the forward
])
def test_infllm_v2_decodes_as_its_forward(specs, options, lengths):
  check_teacher_forcing(specs, {'infllm_v2': {**SELECT, **options}}, **lengths)


def with_moved_nsa_parameters(model_for):
  """model_for whose NSA layers have phi, its position embeddings and the gates moved off
  their initial values (mean pooling, zeros, zeros)."""
  def build(*args, **kwargs):
    model = model_for(*args, **kwargs)
    keys = iter(jax.random.split(jax.random.key(5), 5 * len(model.blocks)))
    for block in model.blocks:
      layer = block.attention.mechanism
      if isinstance(layer, NativeSparseAttention):
        for name, std in (('key_position', 0.3), ('key_map', 0.05), ('value_position', 0.3), ('value_map', 0.05),
                          ('gate', 0.3)):
          variable = getattr(layer, name)
          variable[...] = variable[...] + std * jax.random.normal(next(keys), variable.shape)
    return model
  return build


@pytest.mark.parametrize('specs,options', [
    (['nsa', 'nsa'], {'window': 12}),
    pytest.param(['nsa'], {'compression': 'weighted', 'cmp_len': 8, 'cmp_stride': 4, 'window': 8},
                 marks=pytest.mark.slow),
])
def test_nsa_decodes_as_its_forward(monkeypatch, specs, options):
  monkeypatch.setattr(decode_helpers, 'model_for', with_moved_nsa_parameters(model_for))
  check_teacher_forcing(specs, {'nsa': {**SELECT, **options}})


@pytest.mark.parametrize('first,local,count', [(True, 1, 3), (False, 1, 2), (True, 2, 4)])
def test_the_decode_choice_is_the_forwards_for_every_query_block(first, local, count):
  block, select_block, length, batch, heads = 8, 16, 96, 2, 3
  nq, ns = length // block, length // select_block
  scores = jax.random.normal(jax.random.key(0), (batch, heads, nq, ns))
  allowed, start = block_selection.selection_documents(None, batch, length, block, select_block)
  forward = block_selection.choose_blocks(scores, allowed, start if first else None, block=block,
                                          select_block=select_block, count=count, local=local)
  for index in range(nq):
    positions = jnp.asarray([index * block, index * block + block - 1])
    chosen = block_selection.decode_choice(scores[:, :, index], positions, block=block, select_block=select_block,
                                           count=count, local=local, first=first)
    np.testing.assert_array_equal(jnp.repeat(chosen, select_block // block, axis=-1), forward[:, :, index])


@pytest.mark.slow  # 6-13 s a case; the teacher-forcing tests above cover decoding by default
@pytest.mark.parametrize('spec,attention', [
    ('moba', {'moba': {'block': 8}}), ('infllm_v2', {'infllm_v2': {**SELECT, 'sparse_from': 16}}),
    ('nsa', {'nsa': SELECT}),
])
def test_the_cache_keeps_its_shapes_through_prefill_and_decode(spec, attention):
  model = model_for([spec], attention)
  shapes = lambda cache: jax.tree.map(lambda x: (x.shape, x.dtype), cache)  # noqa: E731
  empty = model.init_cache(2, 40)
  tokens, lengths = jnp.ones((2, 16), jnp.int32), jnp.asarray([9, 16])
  _, filled = model.prefill(tokens, lengths, empty)
  _, stepped = model.decode(tokens[:, 0], lengths, filled)
  assert shapes(filled) == shapes(empty) == shapes(stepped)


def cached_states(layer, q, k, v, lengths, **inputs):
  """Yields (positions [B] of each row's newest token, cache) after prefilling q, k, v
  [B, T, ...] (and the layer's inputs) to `lengths` and after each teacher-forced decode
  step of the layer."""
  batch, length = q.shape[:2]
  positions = jnp.broadcast_to(jnp.arange(length), (batch, length))
  ctx = AttentionContext(positions, (positions < lengths[:, None]).astype(jnp.int32), None, None)
  cache = layer.init_cache(batch, length, k.shape[2], k.shape[3], jnp.float32)
  _, cache = layer.prefill(q, k, v, ctx, cache, lengths, **inputs)
  yield lengths - 1, cache

  @nnx.jit
  def step(layer, q, k, v, position, cache, inputs):
    return layer.decode(q, k, v, AttentionContext(position[:, None], None, None, None), cache, **inputs)[1]

  for position in lengths + np.arange(length - min(lengths))[:, None]:
    at = lambda x: x[np.arange(batch), np.minimum(position, length - 1)][:, None]  # noqa: B023, E731
    cache = step(layer, at(q), at(k), at(v), jnp.asarray(position), cache, {n: at(x) for n, x in inputs.items()})
    yield position, cache


def block_sums(x, block):
  """x [B, T, ...] summed per query block of `block` tokens -> [B, nQ, ...]."""
  return x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:]).sum(2)


@pytest.mark.parametrize('spec,attention', [
    ('moba', {'moba': {'block': 16}}), ('infllm_v2', {'infllm_v2': {**SELECT, 'sparse_from': 16}}),
    ('nsa', {'nsa': SELECT}),
])
def test_the_cache_holds_the_forwards_votes_and_compressed_keys(spec, attention):
  """After prefill and after every decode step: 'previous_votes' the forward's scores of
  the query block before the newest token's (MoBA: the sum of its queries), 'votes' the
  scores of the newest token's block once it is complete, and every span complete at the
  newest token compressed as the forward compresses it."""
  layer = with_moved_nsa_parameters(model_for)([spec], attention).blocks[0].attention.mechanism
  batch, length, block = 3, 40, 8
  keys = jax.random.split(jax.random.key(2), 4)
  q = jax.random.normal(keys[0], (batch, length, 4, 16))
  k, v = (jax.random.normal(key, (batch, length, 2, 16)) for key in keys[1:3])
  inputs = {'layer_input': jax.random.normal(keys[3], (batch, length, 64))} if spec == 'nsa' else {}
  if spec == 'moba':
    scores = block_sums(q, block)  # [B, nQ, H, D]
    compressed = {}
  else:
    o = attention[spec]
    compressed = layer.compress(k, v)
    scores = jnp.moveaxis(selection_scores(q, compressed['k_cmp'], None, scale=16 ** -0.5, cmp_len=o['cmp_len'],
                                           cmp_stride=o['cmp_stride'], select_block=o['select_block'],
                                           query_block=block, segment_ids=None, kv_segment_ids=None), 2, 1)
  previous = jnp.pad(scores, [(0, 0), (1, 0)] + [(0, 0)] * (scores.ndim - 2))  # block I - 1's at I
  checked = 0
  for positions, cache in cached_states(layer, q, k, v, jnp.asarray([5, 17, 12]), **inputs):
    for row, p in enumerate(np.asarray(positions)):
      if p >= length:
        continue
      np.testing.assert_allclose(cache['previous_votes'][row], previous[row, p // block], rtol=1e-5, atol=1e-5)
      if p % block == block - 1:
        np.testing.assert_allclose(cache['votes'][row], scores[row, p // block], rtol=1e-5, atol=1e-5)
      for name, x in compressed.items():
        complete = (np.arange(x.shape[1]) * o['cmp_stride'] + o['cmp_len'] - 1) <= p
        np.testing.assert_allclose(cache[name][row, complete], x[row, complete], rtol=1e-5, atol=1e-5)
      checked += 1
  assert checked == sum(length - n + 1 for n in (5, 17, 12))
