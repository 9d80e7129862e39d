"""The nsa mechanism (Native Sparse Attention, arXiv 2502.11089) against tests/oracles.py:
each branch against dense softmax attention over the same keys written out per token from
the definition (compressed keys complete at the query, the chosen blocks, the window), the
whole layer and the gradients of every parameter against the gated sum of those oracles;
GQA, packed rows with padding and a length that is not a multiple of the block; the choice
of blocks from its definition; causality of the whole layer; the compressed mask's tiles;
config errors, flops, the comparison arm and a short training run.

Tolerance: float32, |nsa - dense| <= 2e-5 + 2e-5 |dense| (as the other mechanisms')."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from mesh_helpers import layer_on_meshes
from oracles import masked_softmax_attention
from train_helpers import logged_losses, run_script, tiny_argv

from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.masks import EMPTY, FULL, PARTIAL
from sparseformer import config as config_lib
from sparseformer.cli import compare
from sparseformer.cli.compare_arms import paper_arms, suite_run
from sparseformer.config import base_config
from sparseformer.errors import UserError
from sparseformer.model import resolve_dims
from sparseformer.model.attention import AttentionContext, get_mechanism
from sparseformer.model.attention.base import layer_attention_flops
from sparseformer.model.attention.compressed_scores import selection_scores

BLOCK, CMP_LEN, CMP_STRIDE, SELECT_BLOCK, WINDOW = 16, 16, 8, 32, 32
TOL = dict(rtol=2e-5, atol=2e-5)


def make_layer(heads=4, kv_heads=2, head_dim=16, select_count=3, local_blocks=1, seed=0, branch_block=BLOCK):
  cfg = base_config().model
  cfg.num_layers, cfg.layer_attention, cfg.attention.block_size = 1, ('nsa',), BLOCK
  cfg.num_heads, cfg.num_kv_heads, cfg.d_model, cfg.dtype = heads, kv_heads, heads * head_dim, 'float32'
  n = cfg.attention.nsa
  n.cmp_len, n.cmp_stride, n.select_block, n.window = CMP_LEN, CMP_STRIDE, SELECT_BLOCK, WINDOW
  n.branch_block = branch_block  # small tiles (several per row here) unless a test says otherwise
  n.select_count, n.local_blocks = select_count, local_blocks
  layer = get_mechanism('nsa')(resolve_dims(cfg, 259), 0, nnx.Rngs(0))
  keys = iter(jax.random.split(jax.random.key(seed), 5))
  for name, std in (('key_position', 0.3), ('key_map', 0.05), ('value_position', 0.3), ('value_map', 0.05),
                    ('gate', 0.3)):  # away from the initial values, so that every parameter matters
    variable = getattr(layer, name)
    variable[...] = variable[...] + std * jax.random.normal(next(keys), variable.shape)
  return layer


def packed_segments(length):
  """Two rows: documents of 70, 60 and length - 150 tokens, then 20 of padding; one document."""
  first = np.concatenate([np.full(70, 1), np.full(60, 2), np.full(length - 150, 3), np.zeros(20)])
  return jnp.asarray(np.stack([first, np.ones(length)]), jnp.int32)


def inputs(length, heads=4, kv_heads=2, head_dim=16, seed=1):
  keys = jax.random.split(jax.random.key(seed), 5)
  q = jax.random.normal(keys[0], (2, length, heads, head_dim))
  k, v = (jax.random.normal(key, (2, length, kv_heads, head_dim)) for key in keys[1:3])
  x = jax.random.normal(keys[3], (2, length, heads * head_dim))
  return q, k, v, x, jax.random.normal(keys[4], (2, length, heads, head_dim))


def context(segments, length):
  return AttentionContext(jnp.zeros((2, length), jnp.int32), segments, None, None)


def document_ids(segments, length):
  return np.ones((2, length), int) if segments is None else np.asarray(segments)


# ---------------------------------------------------------------------------------------
# oracles written from the definitions


def compress_by_definition(x, position, weight):
  """phi of each complete span, one span at a time: (tokens + position) flattened, mapped."""
  b, length, heads, dim = x.shape
  count = (length - CMP_LEN) // CMP_STRIDE + 1
  out = []
  for j in range(count):
    span = x[:, j * CMP_STRIDE:j * CMP_STRIDE + CMP_LEN] + jnp.swapaxes(position, 0, 1)  # [B, l, Hkv, D]
    flat = jnp.moveaxis(span, 2, 1).reshape(b, heads, CMP_LEN * dim)
    out.append(jnp.einsum('bhi,hio->bho', flat, weight.reshape(heads, CMP_LEN * dim, dim)))
  return jnp.stack(out, 1)


def compressed_visible(segments, length):
  """bool [B, T, Tc]: span j complete at t (j d + l - 1 <= t), all of it in t's document."""
  ids = document_ids(segments, length)
  count = (length - CMP_LEN) // CMP_STRIDE + 1
  t = np.arange(length)[:, None]
  span = np.arange(count)[:, None] * CMP_STRIDE + np.arange(CMP_LEN)[None, :]  # [Tc, l]
  same = (ids[:, span][:, None, :, :] == ids[:, :, None, None]).all(-1)
  return same & (span[:, -1][None, None, :] <= t[None])


def chosen_tokens(chosen, segments, length):
  """bool [B, Hkv, T, T]: key j of a chosen block of query i's block, j <= i, same document."""
  ids = document_ids(segments, length)
  i, j = np.arange(length)[:, None], np.arange(length)[None, :]
  blocks = np.asarray(chosen)[:, :, i // BLOCK, j // BLOCK]
  return blocks & (j <= i) & (ids[:, None, :, None] == ids[:, None, None, :])


def oracle_branches(layer, q, k, v, x, segments, chosen):
  """(gates [B, T, 3, H], o_cmp, o_slc, o_win) from the oracles and the layer's parameter arrays."""
  length = q.shape[1]
  k_cmp = compress_by_definition(k, layer.key_position[...], layer.key_map[...])
  v_cmp = compress_by_definition(v, layer.value_position[...], layer.value_map[...])
  o_cmp = masked_softmax_attention(q, k_cmp, v_cmp, compressed_visible(segments, length))
  o_slc = masked_softmax_attention(q, k, v, chosen_tokens(chosen, segments, length))
  o_win = masked_softmax_attention(q, k, v, causal=True, window=WINDOW, segment_ids=segments)
  gates = jax.nn.sigmoid(jnp.einsum('btd,dnh->btnh', x, layer.gate[...]))
  return gates, o_cmp, o_slc, o_win


def layer_choice(layer, q, k, v, segments):
  scale = q.shape[-1] ** -0.5
  k_cmp, v_cmp = layer.compressed_keys(k, v)
  _, lse = layer.compressed_attention(q, k_cmp, v_cmp, segments, layer.compressed_segments(segments), scale=scale)
  return layer.choose(q, k_cmp, lse, segments, scale)[0]


# ---------------------------------------------------------------------------------------
# the mask of the compression branch


@pytest.mark.parametrize('length,stride', [(16, 8), (32, 16), (12, 4), (5, 5), (1, 1)])
@pytest.mark.parametrize('block_q,block_kv', [(16, 16), (8, 4), (7, 3)])
def test_compressed_causal_tiles_agree_with_their_elements(length, stride, block_q, block_kv):
  mask = masks.CompressedCausal(length, stride)
  q_len, kv_len = 120, 30
  q0 = np.arange(0, q_len, block_q)[:, None]
  k0 = np.arange(0, kv_len, block_kv)[None, :]
  kinds = np.asarray(mask.block_kind(q0, np.minimum(q0 + block_q, q_len), k0, np.minimum(k0 + block_kv, kv_len)))
  elements = np.asarray(mask.elements(np.arange(q_len)[:, None], np.arange(kv_len)[None, :]))
  assert np.array_equal(elements, np.arange(kv_len)[None, :] * stride + length - 1 <= np.arange(q_len)[:, None])
  for a, qs in enumerate(q0[:, 0]):
    for c, ks in enumerate(k0[0]):
      tile = elements[qs:qs + block_q, ks:ks + block_kv]
      assert kinds[a, c] == (FULL if tile.all() else PARTIAL if tile.any() else EMPTY), (a, c)


# ---------------------------------------------------------------------------------------
# each branch


def test_compression_branch_is_softmax_over_the_complete_compressed_keys():
  """Packed rows (rows of one document: the whole layer's test below)."""
  length = 200
  layer = make_layer()
  q, k, v, _, d_out = inputs(length)
  segments = packed_segments(length)
  visible = compressed_visible(segments, length)

  def ours(q, k, v):
    k_cmp, v_cmp = layer.compressed_keys(k, v)
    y, lse = layer.compressed_attention(q, k_cmp, v_cmp, segments, layer.compressed_segments(segments),
                                        scale=q.shape[-1] ** -0.5)
    return jnp.sum(y * d_out), (y, lse)

  def dense(q, k, v):
    k_cmp = compress_by_definition(k, layer.key_position[...], layer.key_map[...])
    v_cmp = compress_by_definition(v, layer.value_position[...], layer.value_map[...])
    y, lse = masked_softmax_attention(q, k_cmp, v_cmp, visible, return_lse=True)
    return jnp.sum(y * d_out), (y, lse)

  (_, (y, lse)), grads = jax.jit(jax.value_and_grad(ours, (0, 1, 2), has_aux=True))(q, k, v)
  (_, (y_dense, lse_dense)), dense_grads = jax.jit(jax.value_and_grad(dense, (0, 1, 2), has_aux=True))(q, k, v)
  np.testing.assert_allclose(y, y_dense, **TOL)
  seen = visible.any(-1)[:, None, :]  # [B, 1, T]: the LSE of a query that sees nothing is a convention
  np.testing.assert_allclose(np.where(seen, lse, 0), np.where(seen, lse_dense, 0), rtol=2e-5, atol=1e-4)
  assert not np.any(np.asarray(y)[:, :CMP_LEN - 1])  # the first l - 1 queries see no compressed key
  for name, got, want in zip(('dq', 'dk', 'dv'), grads, dense_grads):
    np.testing.assert_allclose(got, want, **TOL, err_msg=name)


def test_phi_starts_as_mean_pooling():
  cfg = base_config().model
  cfg.num_layers, cfg.layer_attention, cfg.attention.block_size, cfg.dtype = 1, ('nsa',), BLOCK, 'float32'
  dims = resolve_dims(cfg, 259)
  layer = get_mechanism('nsa')(dims, 0, nnx.Rngs(0))
  k = jax.random.normal(jax.random.key(0), (1, 100, dims.num_kv_heads, dims.head_dim))
  k_cmp, _ = layer.compressed_keys(k, k)
  n = cfg.attention.nsa
  want = jnp.stack([k[:, j * n.cmp_stride:j * n.cmp_stride + n.cmp_len].mean(1) for j in range(k_cmp.shape[1])], 1)
  np.testing.assert_allclose(k_cmp, want, rtol=1e-5, atol=1e-6)
  assert not np.any(np.asarray(layer.gate[...]))  # every gate starts at 1/2


def test_weighted_phi_is_a_learned_weight_per_span_position():
  cfg = base_config().model
  cfg.num_layers, cfg.layer_attention, cfg.attention.block_size, cfg.dtype = 1, ('nsa',), BLOCK, 'float32'
  cfg.attention.nsa.compression = 'weighted'
  dims = resolve_dims(cfg, 259)
  layer = get_mechanism('nsa')(dims, 0, nnx.Rngs(0))
  n, heads = cfg.attention.nsa, dims.num_kv_heads
  assert layer.key_map[...].shape == (heads, n.cmp_len)
  keys = jax.random.split(jax.random.key(1), 3)
  k = jax.random.normal(keys[0], (1, 100, heads, dims.head_dim))
  np.testing.assert_allclose(layer.compressed_keys(k, k)[0], jnp.stack(
      [k[:, j * n.cmp_stride:j * n.cmp_stride + n.cmp_len].mean(1) for j in range(5)], 1), rtol=1e-5, atol=1e-6)
  weight = jax.random.normal(keys[1], (heads, n.cmp_len))
  position = jax.random.normal(keys[2], (heads, n.cmp_len, dims.head_dim))
  layer.key_map[...], layer.key_position[...] = weight, position
  want = jnp.stack([jnp.einsum('blhd,hl->bhd', k[:, j * n.cmp_stride:j * n.cmp_stride + n.cmp_len]
                               + jnp.swapaxes(position, 0, 1), weight) for j in range(5)], 1)
  np.testing.assert_allclose(layer.compressed_keys(k, k)[0], want, rtol=1e-5, atol=1e-5)


def test_selection_branch_is_dense_attention_over_the_chosen_blocks():
  """Packed rows (rows of one document: the whole layer's test below)."""
  length = 200
  layer = make_layer()
  q, k, v, _, d_out = inputs(length)
  segments = packed_segments(length)
  chosen = layer_choice(layer, q, k, v, segments)
  allowed = chosen_tokens(chosen, segments, length)

  def ours(q, k, v):
    y = layer.selected_attention(q, k, v, chosen, segments, scale=q.shape[-1] ** -0.5)
    return jnp.sum(y * d_out), y

  def dense(q, k, v):
    y = masked_softmax_attention(q, k, v, allowed)
    return jnp.sum(y * d_out), y

  (_, y), grads = jax.jit(jax.value_and_grad(ours, (0, 1, 2), has_aux=True))(q, k, v)
  (_, y_dense), dense_grads = jax.jit(jax.value_and_grad(dense, (0, 1, 2), has_aux=True))(q, k, v)
  np.testing.assert_allclose(y, y_dense, **TOL)
  for name, got, want in zip(('dq', 'dk', 'dv'), grads, dense_grads):
    np.testing.assert_allclose(got, want, **TOL, err_msg=name)
  # a group shares its blocks, groups differ: each head's output is its own group's attention
  other = masked_softmax_attention(q, k, v, allowed[:, ::-1])
  assert np.abs(np.asarray(other) - np.asarray(y)).max() > 1e-2


def test_window_branch_is_dense_attention_over_the_window():
  length = 200
  layer = make_layer()
  q, k, v, _, _ = inputs(length)
  segments = packed_segments(length)
  y = layer.window_attention(q, k, v, segments, scale=q.shape[-1] ** -0.5)
  np.testing.assert_allclose(y, masked_softmax_attention(q, k, v, causal=True, window=WINDOW, segment_ids=segments),
                             **TOL)


def expected_choice(scores, segments, length, count, local):
  """bool [B, Hkv, nQ, nS] from the definition: for query block I the blocks of its queries'
  reach (a query and a key of the same document, key <= query), forced the start of I's
  first document's block and the `local` most recent up to I's own, then the best
  of the previous query block's votes (ties to the earlier block) up to `count`."""
  ids = document_ids(segments, length)
  b, kv_heads, nq, ns = scores.shape
  out = np.zeros(scores.shape, bool)
  for row in range(b):
    for i in range(nq):
      queries = range(i * BLOCK, min((i + 1) * BLOCK, length))
      reach = [any(ids[row, t] == ids[row, j] for t in queries for j in range(s * SELECT_BLOCK, min(
          (s + 1) * SELECT_BLOCK, t + 1))) for s in range(ns)]
      own = i * BLOCK // SELECT_BLOCK
      start = i * BLOCK
      while start > 0 and ids[row, start - 1] == ids[row, i * BLOCK]:
        start -= 1
      forced = {s for s in range(own - local + 1, own + 1) if s >= 0 and reach[s]} | {start // SELECT_BLOCK}
      for h in range(kv_heads):
        votes = scores[row, h, i - 1] if i > 0 else np.zeros(ns)
        ranked = sorted((s for s in range(ns) if reach[s] and s not in forced), key=lambda s: (-votes[s], s))
        keep = forced | set(ranked[:max(0, count - len(forced))])
        out[row, h, i, sorted(keep)] = True
  return out


@pytest.mark.parametrize('packed,count,local', [(True, 3, 1), (False, 3, 1), (True, 4, 2), (False, 2, 2)])
def test_the_chosen_blocks_are_the_previous_query_blocks_best_plus_the_forced_ones(packed, count, local):
  length = 200
  layer = make_layer(select_count=count, local_blocks=local)
  q, k, v, _, _ = inputs(length, seed=4)
  segments = packed_segments(length) if packed else None
  chosen = np.asarray(layer_choice(layer, q, k, v, segments))
  k_cmp, _ = layer.compressed_keys(k, v)
  scores = np.asarray(selection_scores(q, k_cmp, None, scale=0.25, cmp_len=CMP_LEN, cmp_stride=CMP_STRIDE,
                                       select_block=SELECT_BLOCK, query_block=BLOCK, segment_ids=segments,
                                       kv_segment_ids=layer.compressed_segments(segments)))
  want = expected_choice(scores, segments, length, count, local)
  assert chosen.shape == (2, 2, 13, 13)  # one choice per kv head: the heads of a group share it
  assert np.array_equal(chosen, np.repeat(want, SELECT_BLOCK // BLOCK, axis=-1)[..., :13])
  assert want.sum(-1).max() == min(count + (0 if local < count else 1), 7)


# ---------------------------------------------------------------------------------------
# the whole layer


@pytest.mark.parametrize('kv_heads,packed', [(2, True), pytest.param(4, False, marks=pytest.mark.slow)])
def test_layer_and_every_gradient_equal_the_gated_sum_of_the_oracles(kv_heads, packed):
  length = 200
  layer = make_layer(kv_heads=kv_heads)
  q, k, v, x, d_out = inputs(length, kv_heads=kv_heads)
  segments = packed_segments(length) if packed else None
  chosen = layer_choice(layer, q, k, v, segments)
  graph, params = nnx.split(layer)

  def ours(params, q, k, v, x):
    y, aux = nnx.merge(graph, params)(q, k, v, context(segments, length), layer_input=x)
    return jnp.sum(y * d_out), (y, aux['stats']['nsa_select_fraction'])

  def dense(params, q, k, v, x):
    gates, *branches = oracle_branches(nnx.merge(graph, params), q, k, v, x, segments, chosen)
    y = sum(gates[:, :, i, :, None] * branch for i, branch in enumerate(branches))
    return jnp.sum(y * d_out), y

  (_, (y, fraction)), grads = jax.jit(jax.value_and_grad(ours, range(5), has_aux=True))(params, q, k, v, x)
  (_, y_dense), dense_grads = jax.jit(jax.value_and_grad(dense, range(5), has_aux=True))(params, q, k, v, x)
  np.testing.assert_allclose(y, y_dense, **TOL)
  assert 0.3 < fraction < 1  # 3 of up to 7 selection blocks: most rows choose some of theirs
  names = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(grads)]
  assert len(names) == 9 and all(any(p in n for n in names) for p in ('key_map', 'value_position', 'gate'))
  for name, got, want in zip(names, jax.tree.leaves(grads), jax.tree.leaves(dense_grads)):
    assert np.abs(np.asarray(want)).max() > 0, name
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=5e-5, err_msg=name)


def test_the_branch_tile_changes_no_output_or_gradient():
  """The compression and window branches may tile by other blocks than the selection."""
  length = 200
  q, k, v, x, d_out = inputs(length)
  segments = packed_segments(length)

  def loss_and_grads(branch_block):
    graph, params = nnx.split(make_layer(branch_block=branch_block))
    def loss(params, q, k):
      y, _ = nnx.merge(graph, params)(q, k, v, context(segments, length), layer_input=x)
      return jnp.sum(y * d_out)
    return jax.jit(jax.value_and_grad(loss, range(3)))(params, q, k)

  (small, small_grads), (large, large_grads) = loss_and_grads(BLOCK), loss_and_grads(4 * BLOCK)
  np.testing.assert_allclose(small, large, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(large_grads), jax.tree.leaves(small_grads)):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=5e-5)


def test_no_output_depends_on_a_later_token():
  """Later keys, values, queries and layer inputs change no earlier output: no query sees
  an incomplete compressed block, and a query block's choice comes from earlier tokens."""
  length = 200
  layer = make_layer()
  q, k, v, x, _ = inputs(length)
  segments = packed_segments(length)
  run = jax.jit(lambda q, k, v, x: layer(q, k, v, context(segments, length), layer_input=x)[0])
  y = np.asarray(run(q, k, v, x))
  noise = inputs(length, seed=9)[:4]
  for t in (20, 37, 100, 141):  # inside blocks and spans, and at a document's end
    later = (jnp.arange(length) > t)[None, :, None, None]
    changed = [a + later[..., 0] * n if a.ndim == 3 else a + later * n for a, n in zip((q, k, v, x), noise)]
    y_changed = np.asarray(run(*changed))
    np.testing.assert_allclose(y_changed[:, :t + 1], y[:, :t + 1], rtol=1e-6, atol=1e-6, err_msg=str(t))
    assert np.abs(y_changed[:, t + 1:] - y[:, t + 1:]).max() > 1e-3


# ---------------------------------------------------------------------------------------
# spec, config, cost, comparison, training


def test_nsa_takes_no_argument():
  with pytest.raises(UserError, match='takes no argument'):
    get_mechanism('nsa:3')


@pytest.mark.parametrize('field,value,message', [
    ('select_block', 96, r'model.attention.nsa.select_block=96: use a multiple of model.attention.block_size \(64\)'),
    ('cmp_len', 24, r'model.attention.nsa.cmp_len=24: use a multiple of model.attention.nsa.cmp_stride \(16\)'),
    ('cmp_stride', 48, r'model.attention.nsa.cmp_len=32: use a multiple of model.attention.nsa.cmp_stride \(48\)'),
    ('window', 0, r'model.attention.nsa.window=0: use a positive length'),
    ('select_count', 0, r'model.attention.nsa.select_count=0: use a count >= 1'),
    ('branch_block', 96, r'model.attention.nsa.branch_block=96: use 64, 128, 256 or 512'),
])
def test_bad_nsa_configs_are_one_line_errors(field, value, message):
  cfg = base_config()
  cfg.model.attention.kind, cfg.model.attention.block_size = 'nsa', 64
  cfg.model.attention.nsa[field] = value
  with pytest.raises(UserError, match=message) as error:
    config_lib.validate(cfg)
  assert '\n' not in str(error.value)


def test_select_block_must_be_a_multiple_of_the_stride():
  cfg = base_config()
  cfg.model.attention.kind, cfg.model.attention.block_size = 'nsa', 64
  cfg.model.attention.nsa.cmp_len, cfg.model.attention.nsa.cmp_stride = 48, 24
  with pytest.raises(UserError, match=r'nsa.select_block=64: use a multiple of model.attention.nsa.cmp_stride'):
    config_lib.validate(cfg)


def test_flops_count_compressed_selected_and_window_keys():
  m = base_config().model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads, m.attention.kind = 256, 1, 4, 2, 'nsa'
  seq_len, n, heads, dim = 3000, m.attention.nsa, 4, 64
  t, j = np.arange(seq_len)[:, None], np.arange(seq_len)[None, :]
  compressed = (j * n.cmp_stride + n.cmp_len - 1 <= t).sum()
  blocks = np.minimum(n.select_count, t[:, 0] // n.select_block + 1)
  selected = ((blocks - 1) * n.select_block + t[:, 0] % n.select_block + 1).sum()
  window = np.minimum(t[:, 0] + 1, n.window).sum()
  # softmax reads (4 x dim FLOPs a key and head), the compressed keys scored again to choose (2 x dim),
  # phi: two maps of l x dim x dim per kv head, one span every stride tokens
  want = (4 * heads * dim * (compressed + selected + window) + 2 * heads * dim * compressed) / seq_len
  want += 2 * 2 * 2 * n.cmp_len * dim * dim / n.cmp_stride

  def flops(kind, length):
    m.attention.kind = kind
    return layer_attention_flops(resolve_dims(m, 259), length)[0]

  assert flops('nsa', seq_len) == pytest.approx(want)
  assert flops('nsa', 32768) < flops('dense', 32768) / 4


@pytest.mark.parametrize('seq_len', [256, 512, 2048, 8192])
def test_the_comparison_arm_validates_at_the_suites_lengths(seq_len):
  run = suite_run()
  run.data.seq_len = seq_len
  (name, changes), = paper_arms(seq_len, names=('nsa',))
  cfg = compare.arm_config(run, name, changes)
  assert cfg.model.attention.kind == 'nsa'
  n = cfg.model.attention.nsa
  assert n.window == min(512, seq_len // 8) and n.select_block % cfg.model.attention.block_size == 0


@pytest.mark.slow  # 20 s: a few training steps; the layer tests against the oracle run by default
def test_a_model_with_nsa_layers_trains(tmp_path, data_dir):
  result = run_script('train.py', tiny_argv(
      tmp_path / 'run', data_dir, data__seq_len=192, model__attention__block_size=64,
      model__layer_attention="('nsa', 'dense')", model__attention__nsa__window=64, model__attention__nsa__cmp_len=16,
      model__attention__nsa__cmp_stride=8, model__attention__nsa__select_count=2, train__steps=10,
      checkpoint__every_steps=10))
  assert result.returncode == 0, result.stderr[-2000:]
  losses = logged_losses(tmp_path / 'run')
  assert losses[10] < losses[1] - 0.3, losses


LAYER = r'''
B, T, H, HKV, D = 4, 128, 4, 2, 16
m = base_config().model
m.num_layers, m.layer_attention, m.attention.block_size = 1, ('nsa',), 16
m.num_heads, m.num_kv_heads, m.d_model, m.dtype = H, HKV, H * D, 'float32'
n = m.attention.nsa
n.cmp_len, n.cmp_stride, n.select_block, n.select_count, n.local_blocks, n.window = 16, 8, 32, 2, 1, 32
layer = get_mechanism('nsa')(resolve_dims(m, 259), 0, nnx.Rngs(0))
layer.gate[...] = 0.3 * jax.random.normal(jax.random.key(5), layer.gate.shape)
keys = jax.random.split(jax.random.key(1), 5)
arrays = (jax.random.normal(keys[0], (B, T, H, D)), jax.random.normal(keys[1], (B, T, HKV, D)),
          jax.random.normal(keys[2], (B, T, HKV, D)), jax.random.normal(keys[3], (B, T, H * D)))
cotangent = jax.random.normal(keys[4], (B, T, H, D))
segments = jnp.asarray(np.stack([np.ones(T), 1 + (np.arange(T) >= 40), np.ones(T), 1 + (np.arange(T) >= 100)]),
                       jnp.int32)

def loss(arrays):
  q, k, v, x = arrays
  y, _ = layer(q, k, v, AttentionContext(jnp.zeros((B, T), jnp.int32), segments, None, None), layer_input=x)
  return jnp.sum(y * cotangent), y
'''


@pytest.mark.slow
def test_the_declared_layouts_run_the_kernels_per_row_and_head_and_equal_one_device():
  """data x fsdp x tensor: each device runs the three kernels on its rows and heads (1/8
  of q); with the sequence split 2 ways, the rows are gathered whole along it (1/4 of q)."""
  meshes = [{'data': 2, 'fsdp': 2, 'tensor': 2}, {'data': 2, 'tensor': 2, 'sequence': 2}]
  results = layer_on_meshes(LAYER, 'nsa', meshes)
  for axes, ways in zip(meshes, (8, 4)):
    got = results[json.dumps(axes)]
    assert got['worst'] < 1e-5, (axes, got)
    assert len(got['whole']) == 3 and sorted(got['per_device']) == sorted(s // ways for s in got['whole']), (axes, got)
