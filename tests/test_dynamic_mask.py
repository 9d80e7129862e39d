"""Dynamic mask attention against dense attention under the explicit top-w mask (built
T x T here, small shapes) with the same key bias: the plan's mask, outputs and gradients
including d(A) and d(W_dt), rows with fewer than w keys, ties, documents, causality with
respect to future tokens, a fresh init, decoding, and a model that trains; the same for
block smoothing against the block-constant mask built from its definition."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracles import masked_softmax_attention
from train_helpers import logged_losses, run_script, tiny_argv

from pallas_kernels.block_sparse_attention.plan import EMPTY, FULL, PARTIAL, dense_mask
from sparseformer.config import base_config, validate
from sparseformer.errors import UserError
from sparseformer.model import resolve_dims
from sparseformer.model.attention import AttentionContext, dynamic_mask, get_mechanism
from sparseformer.model.attention import dynamic_mask_plan as dmp


def explicit_topw_mask(scores, window, segments=None):
  """[B, H, T, T] bool: query i keeps the `window` largest scores among the keys j <= i of
  its document, ties to the earlier key."""
  scores = np.asarray(scores, np.float64)
  b, h, t = scores.shape
  segments = np.zeros((b, t), int) if segments is None else np.asarray(segments)
  keep = np.zeros((b, h, t, t), bool)
  for bi in range(b):
    for hi in range(h):
      for i in range(t):
        past = [j for j in range(i + 1) if segments[bi, j] == segments[bi, i]]
        chosen = sorted(past, key=lambda j: (-scores[bi, hi, j], j))[:window]
        keep[bi, hi, i, chosen] = True
  return keep


def explicit_smoothed_mask(scores, window, smoothing, block, segments=None):
  """[B, H, T, T] bool of block smoothing, from its definition (docs/dynamic_mask.md): per
  query block with first query f (document start s), the key blocks holding a key of the
  block's queries >= f, the block holding s, and among the blocks strictly between those
  the voted ones, by how many of their keys f keeps; causal and documents inside."""
  top_w = explicit_topw_mask(scores, window, segments)
  b, h, t = top_w.shape[:3]
  segments = np.zeros((b, t), int) if segments is None else np.asarray(segments)
  n = -(-t // block)
  keep = np.zeros((b, h, t, t), bool)
  element = (np.arange(t)[None, :] <= np.arange(t)[:, None]) & (segments[:, :, None] == segments[:, None, :])
  for bi, hi, qb in np.ndindex(b, h, n):
    f, last = qb * block, min(qb * block + block, t) - 1
    start = f
    while start > 0 and segments[bi, start - 1] == segments[bi, f]:
      start -= 1
    forced = {kb for kb in range(n) if kb * block <= last and (kb + 1) * block > f} | {start // block}
    between = [kb for kb in range(start // block + 1, n) if (kb + 1) * block <= f]
    counts = {kb: top_w[bi, hi, f, kb * block:(kb + 1) * block].sum() for kb in between}
    if smoothing == 'majority':
      chosen = [kb for kb in between if 2 * counts[kb] > block]
    else:
      slots = max(0, -(-window // block) - len(forced))
      chosen = sorted(between, key=lambda kb: (-counts[kb], -kb))[:slots]
    for kb in forced | set(chosen):
      keep[bi, hi, f:last + 1, kb * block:(kb + 1) * block] = True
  return keep & element[:, None]


def plan_mask(plan):
  b, hp = plan.kv_count.shape[:2]
  return np.stack([np.stack([dense_mask(plan, i, j) for j in range(hp)]) for i in range(b)])


def random_documents(rng, b, t, rate=0.06):
  return jnp.asarray(np.cumsum(rng.random((b, t)) < rate, axis=1).astype(np.int32))


@pytest.mark.parametrize('window,block,documents', [(5, 8, True), (1, 8, False), (12, 16, True), (40, 8, False),
                                                    (100, 8, True)])
def test_plan_keeps_exactly_the_top_w_with_ties_to_the_earlier_key(window, block, documents):
  rng = np.random.default_rng(window)
  b, h, t = 2, 2, 45
  scores = jnp.asarray(rng.integers(0, 3, (b, h, t)).astype(np.float32))  # many ties
  segments = random_documents(rng, b, t) if documents else None
  build = jax.jit(lambda scores, segments: dmp.dynamic_mask_plan(scores, window, block_q=block, block_kv=block,
                                                                  segment_ids=segments))
  plan, thresholds = build(scores, segments)
  expected = explicit_topw_mask(scores, window, segments)
  np.testing.assert_array_equal(plan_mask(plan), expected)
  prefix = np.asarray(dmp.document_prefix_lengths(segments, t, b))[:, None, :]
  # every row keeps min(w, its prefix): all of it when it has fewer than w keys
  np.testing.assert_array_equal(expected.sum(-1), np.broadcast_to(np.minimum(window, prefix), (b, h, t)))
  assert float(dmp.kept_fraction(thresholds, window, segments)) == pytest.approx(
      expected.sum() / (prefix.sum() * h), rel=1e-6)


@pytest.mark.parametrize('window,chunk', [(37, 32), (5, 64), (200, 16)])
def test_thresholds_are_the_w_th_largest_rank_of_the_document_prefix(window, chunk):
  rng = np.random.default_rng(chunk)
  b, h, t = 2, 3, 300
  ranks = np.stack([np.stack([rng.permutation(t) for _ in range(h)]) for _ in range(b)])
  segments = np.cumsum(rng.random((b, t)) < 0.01, axis=1)
  got = np.asarray(dmp.query_thresholds(jnp.asarray(ranks, jnp.int32), window, jnp.asarray(segments), chunk))
  for bi, hi, i in np.ndindex(b, h, t):
    prefix = ranks[bi, hi, :i + 1][segments[bi, :i + 1] == segments[bi, i]]
    want = np.sort(prefix)[-window] if len(prefix) >= window else dmp.KEEP_ALL
    assert got[bi, hi, i] == want, (bi, hi, i)


def test_plan_skips_tiles_that_hold_no_kept_key():
  t, window, block = 256, 16, 16
  scores = jnp.where(jnp.arange(t) < window, 1.0, 0.0)[None, None]  # the first 16 keys win every row
  plan, _ = dmp.dynamic_mask_plan(scores, window, block_q=block, block_kv=block)
  kinds = np.asarray(plan.block_kinds())[0, 0]
  assert kinds[0, 0] == PARTIAL and (kinds[1:, 0] == FULL).all()  # key block 0 below the diagonal is full
  assert (kinds[:, 1:] == EMPTY).all()  # no other tile holds a kept key
  assert float(dmp.active_tile_fraction(plan, None)) == pytest.approx(16 / (16 * 17 / 2))


def make_mechanism(window, kv_heads=2, heads=4, head_dim=16, block=64, seed=0, init_scale=None, smoothing='none'):
  cfg = base_config().model
  cfg.num_layers, cfg.layer_attention, cfg.attention.block_size = 1, (f'dynamic_mask:{window}',), block
  cfg.attention.dynamic_mask.block_smooth = smoothing
  cfg.num_heads, cfg.num_kv_heads, cfg.d_model = heads, kv_heads, heads * head_dim
  dims = resolve_dims(cfg, 259)
  mechanism = get_mechanism(f'dynamic_mask:{window}')(dims, 0, nnx.Rngs(seed))
  if init_scale is not None:  # larger parameters than the init, so that the bias and the selection matter
    keys = jax.random.split(jax.random.key(seed + 1), 2)
    mechanism.dt_weight[...] = init_scale * jax.random.normal(keys[0], mechanism.dt_weight.shape)
    mechanism.dt_scale[...] = 2.0 * jax.random.normal(keys[1], mechanism.dt_scale.shape)
  return mechanism


def context(segments, b, t):
  return AttentionContext(jnp.zeros((b, t), jnp.int32), segments, None, None)


def oracle_scores(v, dt_weight, dt_scale):
  """delta [B, Hkv, T] = A softplus(V_flat W_dt), written independently of the mechanism
  (A multiplies the kv-head axis before the transpose)."""
  b, t, hkv, d = v.shape
  z = v.reshape(b, t, hkv * d) @ dt_weight.reshape(hkv * d, hkv)  # [B, T, Hkv]
  return jnp.transpose(dt_scale * jax.nn.softplus(z), (0, 2, 1))


@jax.jit
def oracle_attention(q, k, v, dt_weight, dt_scale, keep):
  """Dense float32 attention under the explicit mask keep [B, Hkv, T, T] with the bias."""
  return masked_softmax_attention(q, k, v, keep, key_bias=oracle_scores(v, dt_weight, dt_scale))


def qkv(seed, b, t, heads, kv_heads, d):
  keys = jax.random.split(jax.random.key(seed), 4)
  q = jax.random.normal(keys[0], (b, t, heads, d))
  k = jax.random.normal(keys[1], (b, t, kv_heads, d))
  v = jax.random.normal(keys[2], (b, t, kv_heads, d))
  return q, k, v, jax.random.normal(keys[3], (b, t, heads, d))


@pytest.mark.parametrize('window,documents', [(9, True), (30, False)])
def test_mechanism_matches_dense_top_w_attention_with_all_gradients(window, documents):
  b, t, heads, kv_heads, d = 2, 150, 4, 2, 16
  mechanism = make_mechanism(window, kv_heads, heads, d, init_scale=0.5)
  segments = random_documents(np.random.default_rng(1), b, t, 0.02) if documents else None
  assert_matches_dense_oracle(mechanism, lambda scores: explicit_topw_mask(scores, window, segments), segments,
                              qkv(3, b, t, heads, kv_heads, d))


def assert_matches_dense_oracle(mechanism, explicit_mask, segments, inputs):
  """Loss and gradients (q, k, v, W_dt, A) of the mechanism against dense attention under
  explicit_mask(scores) [B, Hkv, T, T] with the bias."""
  q, k, v, d_out = inputs
  b, t = q.shape[:2]
  graph, params = nnx.split(mechanism)

  def ours(params, q, k, v):
    y, _ = nnx.merge(graph, params)(q, k, v, context(segments, b, t))
    return jnp.sum(y * d_out)

  keep = jnp.asarray(explicit_mask(oracle_scores(v, mechanism.dt_weight[...], mechanism.dt_scale[...])))

  def oracle(dt_weight, dt_scale, q, k, v):
    return jnp.sum(oracle_attention(q, k, v, dt_weight, dt_scale, keep) * d_out)

  loss, (d_params, dq, dk, dv) = jax.jit(jax.value_and_grad(ours, (0, 1, 2, 3)))(params, q, k, v)
  loss_ref, (d_weight, d_scale, dq_ref, dk_ref, dv_ref) = jax.jit(jax.value_and_grad(oracle, (0, 1, 2, 3, 4)))(
      mechanism.dt_weight[...], mechanism.dt_scale[...], q, k, v)
  tol = dict(rtol=2e-4, atol=2e-4)
  np.testing.assert_allclose(loss, loss_ref, **tol)
  pairs = (('dq', dq, dq_ref), ('dk', dk, dk_ref), ('dv', dv, dv_ref),
           ('d W_dt', d_params['dt_weight'][...], d_weight), ('d A', d_params['dt_scale'][...], d_scale))
  for name, got, want in pairs:
    np.testing.assert_allclose(got, want, err_msg=name, **tol)
  assert float(jnp.abs(d_scale).max()) > 1e-3  # the bias path carries a gradient


@pytest.mark.parametrize('smoothing,block', [('none', 64), ('budget', 16)])
def test_fresh_init_gives_finite_outputs_and_gradients(smoothing, block):
  b, t, heads, kv_heads, d = 2, 130, 4, 1, 16
  mechanism = make_mechanism(8, kv_heads, heads, d, block=block, smoothing=smoothing)
  segments = jnp.asarray([[1] * 60 + [2] * 60 + [0] * 10, [1] * 130], jnp.int32)
  q, k, v, d_out = qkv(4, b, t, heads, kv_heads, d)
  graph, params = nnx.split(mechanism)

  def loss(params, q, k, v):
    y, aux = nnx.merge(graph, params)(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16),
                                      context(segments, b, t))
    return jnp.sum(y.astype(jnp.float32) * d_out), aux

  (value, aux), grads = jax.jit(jax.value_and_grad(loss, (0, 1, 2, 3), has_aux=True))(params, q, k, v)
  assert bool(jnp.isfinite(value))
  for leaf in jax.tree.leaves(grads):
    assert bool(jnp.isfinite(leaf[...] if hasattr(leaf, 'get_value') else leaf).all())
  assert 0 < float(aux['stats']['dma_kept_fraction']) < 1
  assert 0 < float(aux['stats']['dma_tile_fraction']) <= 1


@pytest.mark.parametrize('window,options', [
    (6, {}),
    (40, {'block': 16, 'smoothing': 'budget'}),  # smoothed: the cut is inside query block 5
])
def test_changing_a_future_token_never_changes_a_past_output(window, options):
  b, t, heads, kv_heads, d, cut = 1, 140, 2, 2, 16, 90
  mechanism = make_mechanism(window, kv_heads, heads, d, init_scale=0.5, **options)
  q, k, v, _ = qkv(5, b, t, heads, kv_heads, d)
  graph, params = nnx.split(mechanism)
  attend = jax.jit(lambda q, k, v: nnx.merge(graph, params)(q, k, v, context(None, b, t))[0])
  y = attend(q, k, v)
  future = jax.random.normal(jax.random.key(9), (b, t - cut, kv_heads, d)) * 5
  y2 = attend(q, k.at[:, cut:].set(future), v.at[:, cut:].set(-future))
  np.testing.assert_allclose(y2[:, :cut], y[:, :cut], rtol=1e-6, atol=1e-6)
  assert not np.allclose(y2[:, cut:], y[:, cut:])


def test_decoding_matches_the_prefill_selection():
  b, t, kv_heads, d, window = 2, 40, 2, 8, 7
  rng = np.random.default_rng(0)
  v = jnp.asarray(rng.normal(size=(b, t, kv_heads, d)), jnp.float32)
  dt_weight = jnp.asarray(rng.normal(size=(kv_heads, d, kv_heads)), jnp.float32)
  dt_scale = jnp.asarray([1.0, -0.5])
  scores = dynamic_mask.key_scores(v, dt_weight, dt_scale)
  scores = jnp.round(scores * 2) / 2  # ties
  keep = explicit_topw_mask(scores, window)
  cache = jnp.zeros((b, kv_heads, t + 5))
  for i in range(t):
    new = dynamic_mask.decode_key_score(v[:, i], dt_weight, dt_scale)
    np.testing.assert_allclose(new, dynamic_mask.key_scores(v, dt_weight, dt_scale)[:, :, i], rtol=1e-5, atol=1e-6)
    cache = cache.at[:, :, i].set(scores[:, :, i])
    chosen = np.asarray(dynamic_mask.decode_keep(cache, i + 1, window))
    np.testing.assert_array_equal(chosen[:, :, :t], keep[:, :, i])
    assert not chosen[:, :, t:].any()


@pytest.mark.parametrize('smoothing', ['majority', 'budget'])
@pytest.mark.parametrize('window,block,documents', [(5, 8, True), (20, 8, False), (12, 16, True), (36, 8, False)])
def test_smoothed_plan_keeps_the_block_constant_mask_of_its_definition(smoothing, window, block, documents):
  rng = np.random.default_rng(window)
  b, h, t = 2, 2, 75
  scores = jnp.asarray(rng.integers(0, 4, (b, h, t)).astype(np.float32))  # ties
  segments = random_documents(rng, b, t, 0.04) if documents else None
  build = jax.jit(lambda scores, segments: dmp.smoothed_plan(scores, window, smoothing, block_q=block, block_kv=block,
                                                             segment_ids=segments))
  plan, keep = build(scores, segments)
  expected = explicit_smoothed_mask(scores, window, smoothing, block, segments)
  assert not plan.has_rank_rule
  np.testing.assert_array_equal(plan_mask(plan), expected)
  prefix = np.asarray(dmp.document_prefix_lengths(segments, t, b))[:, None, :]
  assert float(dmp.smoothed_kept_fraction(keep, t, block, block, segments)) == pytest.approx(
      expected.sum() / (prefix.sum() * h), rel=1e-6)
  # visited tiles need no element mask except on the diagonal, the ragged end and document boundaries
  kinds = np.asarray(plan.block_kinds())
  single = np.asarray(segments if segments is not None else np.zeros((b, t), int))
  single = np.pad(single, ((0, 0), (0, -t % block)), mode='edge').reshape(b, -1, block)
  single = single.min(-1) == single.max(-1)  # [B, n] blocks inside one document
  n = kinds.shape[-1]
  interior = (np.arange(n)[:, None] > np.arange(n)[None, :]) & single[:, :, None] & single[:, None, :]
  interior[:, -1] = (t % block == 0) & interior[:, -1]
  assert ((kinds != PARTIAL) | ~interior[:, None]).all()
  kept, prefix = expected.sum(-1), np.broadcast_to(prefix, expected.shape[:3])
  if smoothing == 'majority' or not documents:  # rows with fewer than w keys keep all of them
    np.testing.assert_array_equal(kept[prefix < window], prefix[prefix < window])
  if smoothing == 'budget' and not documents:  # every row keeps min(w, its prefix) to within one block
    assert (np.abs(kept - np.minimum(window, prefix)) < block).all()


def test_block_start_thresholds_are_those_of_the_first_queries():
  rng = np.random.default_rng(2)
  b, h, t, window, block = 2, 2, 300, 37, 32
  ranks = jnp.asarray(np.stack([np.stack([rng.permutation(t) for _ in range(h)]) for _ in range(b)]), jnp.int32)
  segments = jnp.asarray(np.cumsum(rng.random((b, t)) < 0.01, axis=1))
  every = dmp.query_thresholds(ranks, window, segments, block)
  np.testing.assert_array_equal(dmp.block_start_thresholds(ranks, window, segments, block), every[:, :, ::block])


def test_majority_smoothing_keeps_the_key_blocks_where_the_kept_keys_cluster():
  t, window, block = 128, 24, 16
  scores = jnp.where((jnp.arange(t) // block) % 3 == 1, 5.0, 0.0) + jnp.arange(t) * 1e-3  # blocks 1, 4, 7 win
  _, keep = dmp.smoothed_plan(scores[None, None], window, 'majority', block_q=block, block_kv=block)
  rows = np.asarray(keep)[0, 0].astype(int)
  # query 48 keeps block 1 and keys 41..48: block 2 holds 7 of them, no majority; block 0 and 3 are forced
  assert rows[3].tolist() == [1, 1, 0, 1, 0, 0, 0, 0]
  # query 80 keeps block 4 and the later half of block 1: half is not a majority
  assert rows[5].tolist() == [1, 0, 0, 0, 1, 1, 0, 0]
  assert rows[7].tolist() == [1, 0, 0, 0, 1, 0, 0, 1]


@pytest.mark.parametrize('smoothing', ['majority', 'budget'])
def test_smoothed_mechanism_matches_dense_attention_under_the_block_mask(smoothing):
  b, t, heads, kv_heads, d, block, window = 2, 160, 4, 2, 16, 16, 72
  mechanism = make_mechanism(window, kv_heads, heads, d, block=block, init_scale=0.5, smoothing=smoothing)
  segments = random_documents(np.random.default_rng(1), b, t, 0.01)
  explicit = lambda scores: explicit_smoothed_mask(scores, window, smoothing, block, segments)  # noqa: E731
  inputs = qkv(3, b, t, heads, kv_heads, d)
  scores = oracle_scores(inputs[2], mechanism.dt_weight[...], mechanism.dt_scale[...])
  smoothed, top_w = explicit(scores), explicit_topw_mask(scores, window, segments)
  assert (smoothed & ~top_w).any() and (top_w & ~smoothed).any()  # the smoothing changes the kept set here
  assert_matches_dense_oracle(mechanism, explicit, segments, inputs)


@pytest.mark.parametrize('smoothing', ['majority', 'budget'])
def test_smoothed_decoding_matches_the_prefill_rows(smoothing):
  b, t, kv_heads, window, block = 2, 70, 2, 20, 8
  scores = jnp.round(jnp.asarray(np.random.default_rng(3).normal(size=(b, kv_heads, t)), jnp.float32) * 2) / 2
  keep = explicit_smoothed_mask(scores, window, smoothing, block)
  cache = jnp.zeros((b, kv_heads, t + 5)).at[:, :, :t].set(scores)
  chosen = jax.jit(lambda length: dynamic_mask.decode_keep(cache, length, window, smoothing, block))
  for i in range(t):
    got = np.asarray(chosen(i + 1))
    np.testing.assert_array_equal(got[:, :, :t], keep[:, :, i], err_msg=str(i))
    assert not got[:, :, t:].any()


def test_bad_block_smooth_is_a_user_error():
  cfg = base_config()
  cfg.model.attention.dynamic_mask.block_smooth = 'vote'
  with pytest.raises(UserError, match='block_smooth'):
    validate(cfg)
  with pytest.raises(UserError, match='block_smooth'):
    dmp.smoothed_plan(jnp.zeros((1, 1, 8)), 2, 'none', block_q=4, block_kv=4)
  with pytest.raises(UserError, match='block_smooth'):
    dynamic_mask.decode_keep(jnp.zeros((1, 1, 8)), 5, 2, 'vote', 4)


@pytest.mark.parametrize('spec', ['dynamic_mask', 'dynamic_mask:0', 'dynamic_mask:x'])
def test_bad_specs_are_user_errors(spec):
  with pytest.raises(UserError, match='positive keep count'):
    get_mechanism(spec)


@pytest.mark.slow  # 18 s: a few training steps; the layer tests against the oracle run by default
def test_model_with_dynamic_mask_layers_trains(tmp_path, data_dir):
  spec = "('dynamic_mask:8', 'dense')"
  result = run_script('train.py', tiny_argv(tmp_path / 'run', data_dir, model__layer_attention=spec,
                                            model__attention__block_size=64, train__steps=12))
  assert result.returncode == 0, result.stderr[-2000:]
  losses = logged_losses(tmp_path / 'run')
  assert losses[12] < losses[1] - 0.5, losses
