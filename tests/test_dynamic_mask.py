"""Dynamic mask attention against dense attention under the explicit top-w mask (built
T x T here, small shapes) with the same key bias: the plan's mask, outputs and gradients
including d(A) and d(W_dt), rows with fewer than w keys, ties, documents, causality with
respect to future tokens, a fresh init, decoding, and a model that trains."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from train_helpers import logged_losses, run_script, tiny_argv

from pallas_kernels.block_sparse_attention.plan import EMPTY, FULL, PARTIAL, dense_mask
from sparseformer.config import base_config
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


def make_mechanism(window, kv_heads=2, heads=4, head_dim=16, block=64, seed=0, init_scale=None):
  cfg = base_config().model
  cfg.num_layers, cfg.layer_attention, cfg.attention.block_size = 1, (f'dynamic_mask:{window}',), block
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
  d, hkv = v.shape[-1], v.shape[2]
  delta = oracle_scores(v, dt_weight, dt_scale)
  group = q.shape[2] // hkv
  keep = jnp.repeat(keep, group, axis=1)
  s = jnp.einsum('bqhd,bkhd->bhqk', q, jnp.repeat(k, group, axis=2)) / d ** 0.5
  s = jnp.where(keep, s + jnp.repeat(delta, group, axis=1)[:, :, None, :], -jnp.inf)
  return jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(s, axis=-1), jnp.repeat(v, group, axis=2))


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
  q, k, v, d_out = qkv(3, b, t, heads, kv_heads, d)
  graph, params = nnx.split(mechanism)

  def ours(params, q, k, v):
    y, _ = nnx.merge(graph, params)(q, k, v, context(segments, b, t))
    return jnp.sum(y * d_out)

  keep = jnp.asarray(explicit_topw_mask(oracle_scores(v, mechanism.dt_weight[...], mechanism.dt_scale[...]), window,
                                        segments))

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


def test_fresh_init_gives_finite_outputs_and_gradients():
  b, t, heads, kv_heads, d = 2, 130, 4, 1, 16
  mechanism = make_mechanism(8, kv_heads, heads, d)
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


def test_changing_a_future_token_never_changes_a_past_output():
  b, t, heads, kv_heads, d, cut = 1, 140, 2, 2, 16, 90
  mechanism = make_mechanism(6, kv_heads, heads, d, init_scale=0.5)
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


@pytest.mark.parametrize('spec', ['dynamic_mask', 'dynamic_mask:0', 'dynamic_mask:x'])
def test_bad_specs_are_user_errors(spec):
  with pytest.raises(UserError, match='positive keep count'):
    get_mechanism(spec)


def test_model_with_dynamic_mask_layers_trains(tmp_path, data_dir):
  spec = "('dynamic_mask:8', 'dense')"
  result = run_script('train.py', tiny_argv(tmp_path / 'run', data_dir, model__layer_attention=spec,
                                            model__attention__block_size=64, train__steps=12))
  assert result.returncode == 0, result.stderr[-2000:]
  losses = logged_losses(tmp_path / 'run')
  assert losses[12] < losses[1] - 0.5, losses
