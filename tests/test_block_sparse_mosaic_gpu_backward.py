"""The Mosaic GPU (sm90) block-sparse backward kernels against reference.backward and the
dense float32 oracle: dq, dk, dv and d(key_bias) on mask plans, documents, random per-head
block plans, GQA groups, ragged lengths, fully masked rows, bf16/f16 and head_dim 64/128.
Every case runs both backward paths: the deterministic dQ and dK/dV kernels
(mosaic_gpu_backward) and the fused kernel with atomic dQ (mosaic_gpu_fused_backward).

On CPU the kernels run in Mosaic GPU interpret mode on small shapes (the 64-row blocks,
one compute warpgroup). 128-row blocks run two compute warpgroups, i.e. three interpreter
threads, which can stall on a 2-core machine (seen with 128x128 blocks, two kv heads and a
key bias; the same cases pass on an H100), so those CPU cases are `slow`. The `gpu` tests
run the compiled kernels on a Hopper GPU with larger shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mask_oracle import block_mask_oracle, mask_oracle
from oracles import masked_softmax_attention
from test_block_sparse_attention import oracle_or_plan_mask, random_inputs

from pallas_kernels.block_sparse_attention import masks, plan_from_block_mask, plan_from_mask, reference
from pallas_kernels.block_sparse_attention import mosaic_gpu_backward, mosaic_gpu_fused_backward

TOLERANCE = {jnp.bfloat16: 2e-2, jnp.float16: 1e-2}  # of the largest gradient entry

MASKS = {
    'causal': masks.Causal(),
    'window': masks.causal_window(70),
    'chunked': masks.Chunked(96) & masks.Causal(),
    'bidirectional_window': masks.SlidingWindow(50, 30),
}


BACKWARDS = {'two_kernel': mosaic_gpu_backward.backward, 'fused': mosaic_gpu_fused_backward.backward}
PATHS = sorted(BACKWARDS)
FUSED_SLOW_ON_CPU = ['two_kernel', pytest.param('fused', marks=pytest.mark.slow)]  # the CI's time budget


def on_gpu():
  return jax.default_backend() == 'gpu'


def documents(length, seed, batch=1):
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.cumsum(rng.random((batch, length)) < 0.01, axis=1).astype(np.int32))


def random_block_plan(seed, length, block_q, block_kv, plan_heads, density=0.4, batch=1, **kwargs):
  """(a plan of random blocks, its element mask from mask_oracle.py)."""
  nq, nk = -(-length // block_q), -(-length // block_kv)
  chosen = jax.random.bernoulli(jax.random.key(seed), density, (batch, plan_heads, nq, nk))
  layout = dict(q_len=length, block_q=block_q, block_kv=block_kv, **kwargs)
  return plan_from_block_mask(chosen, **layout), block_mask_oracle(chosen, **layout)


def dense_gradients(q, k, v, bias, plan, scale, d_out, d_lse, allowed=None):
  """Gradients of the dense oracle for cotangents of the output and of the LSE, under
  `allowed` [B, Hp, Tq, Tk] from mask_oracle.py (None: the plan's own rendering)."""
  allowed = oracle_or_plan_mask(allowed, plan, q.shape[2])
  f32 = lambda x: None if x is None else x.astype(jnp.float32)

  @jax.jit
  def gradients(allowed, q, k, v, bias, d_out, d_lse):
    oracle = lambda q, k, v, b: masked_softmax_attention(q, k, v, allowed, key_bias=b, scale=scale, return_lse=True)
    _, vjp = jax.vjp(oracle, *map(f32, (q, k, v, bias)))
    return vjp((d_out, d_lse))

  return gradients(allowed, q, k, v, bias, d_out, d_lse)


def assert_close(got, want, tolerance, name):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert got.shape == want.shape, name
  assert np.isfinite(got).all(), name
  error = np.abs(got - want).max() / max(np.abs(want).max(), 1e-3)
  assert error < tolerance, f'{name}: relative error {error}'


def check(plan, q, k, v, bias, d_out, with_d_lse=True, interpret=None, dense=True, allowed=None, path='two_kernel'):
  """Our backward (`path` of BACKWARDS) against reference.backward and (optionally) the dense oracle."""
  interpret = not on_gpu() if interpret is None else interpret
  assert mosaic_gpu_backward.unavailable(q, k, v, bias, plan) is None
  scale = q.shape[-1] ** -0.5
  out, lse = jax.jit(reference.forward, static_argnums=5)(q, k, v, bias, plan, scale)
  d_lse = jax.random.normal(jax.random.key(7), lse.shape) if with_d_lse else None
  backward = functools.partial(BACKWARDS[path], interpret=interpret)
  got = jax.jit(backward, static_argnums=5)(q, k, v, bias, plan, scale, out, lse, d_out, d_lse)
  want = jax.jit(reference.backward, static_argnums=5)(q, k, v, bias, plan, scale, out, lse, d_out, d_lse)
  tolerance = TOLERANCE[q.dtype.type]
  for name, g, w, x in zip(('dq', 'dk', 'dv', 'dbias'), got, want, (q, k, v, bias)):
    if x is None:
      assert g is None
      continue
    assert g.dtype == x.dtype, name
    assert_close(g, w, tolerance, name)
  if dense:
    oracle = dense_gradients(q, k, v, bias, plan, scale, d_out, jnp.zeros_like(lse) if d_lse is None else d_lse,
                             allowed)
    for name, g, w in zip(('dq', 'dk', 'dv', 'dbias'), got, oracle):
      if w is not None:
        assert_close(g, w, 2 * tolerance, f'{name} (dense)')
  return got


@pytest.mark.parametrize('path', PATHS)
def test_causal_with_key_bias_and_gqa_pair(path):
  q, k, v, bias, d_out = random_inputs(0, 1, 128, 128, 2, 1, 64, jnp.bfloat16, with_bias=True)
  check(plan_from_mask(masks.Causal(), q_len=128, block_q=64, block_kv=64), q, k, v, bias, d_out,
        allowed=mask_oracle(masks.Causal(), q_len=128), path=path)


@pytest.mark.parametrize('path', FUSED_SLOW_ON_CPU)
def test_window_with_documents_ragged_float16(path):
  q, k, v, bias, d_out = random_inputs(1, 1, 160, 160, 2, 1, 64, jnp.float16, with_bias=False)
  segments = jnp.asarray(np.repeat(np.arange(4), 40)[None].astype(np.int32))
  plan = plan_from_mask(masks.causal_window(70), q_len=160, block_q=64, block_kv=64, segment_ids=segments)
  check(plan, q, k, v, bias, d_out, allowed=mask_oracle(masks.causal_window(70), q_len=160, segment_ids=segments),
        path=path)


@pytest.mark.parametrize('path', FUSED_SLOW_ON_CPU)
def test_random_per_query_head_plan_group_of_four_head_dim_128(path):
  q, k, v, bias, d_out = random_inputs(2, 1, 128, 128, 4, 1, 128, jnp.bfloat16, with_bias=True)
  plan, allowed = random_block_plan(3, 128, 64, 64, plan_heads=4, mask=masks.Chunked(96) & masks.Causal())
  check(plan, q, k, v, bias, d_out, with_d_lse=False, allowed=allowed, path=path)


@pytest.mark.parametrize('path', FUSED_SLOW_ON_CPU)
def test_fully_masked_rows_get_zero_gradients(path):
  q, k, v, bias, d_out = random_inputs(3, 1, 128, 128, 2, 2, 64, jnp.bfloat16, with_bias=True)
  chosen = jnp.zeros((1, 2, 2, 2), bool).at[:, 1, 1, :].set(True)  # plan head 0 sees nothing at all
  plan = plan_from_block_mask(chosen, q_len=128, block_q=64, block_kv=64)
  allowed = block_mask_oracle(chosen, q_len=128, block_q=64, block_kv=64)
  dq, dk, dv, dbias = check(plan, q, k, v, bias, d_out, allowed=allowed, path=path)
  assert (dq[:, :, 0] == 0).all() and (dk[:, :, 0] == 0).all() and (dv[:, :, 0] == 0).all()
  assert (dbias[:, 0] == 0).all() and (dq[:, :64, 1] == 0).all()


@pytest.mark.parametrize('path', FUSED_SLOW_ON_CPU)
def test_cross_attention_lengths_with_kv_head_plans(path):
  q, k, v, bias, d_out = random_inputs(4, 1, 100, 150, 2, 2, 64, jnp.bfloat16, with_bias=True)
  chosen = jax.random.bernoulli(jax.random.key(5), 0.6, (1, 2, 2, 3))
  layout = dict(q_len=100, kv_len=150, block_q=64, block_kv=64, mask=masks.Full())
  check(plan_from_block_mask(chosen, **layout), q, k, v, bias, d_out, allowed=block_mask_oracle(chosen, **layout),
        path=path)


def test_dkv_lists_cut_into_parts_sum_to_the_same_gradients(monkeypatch):
  """dK/dV with each kv block's list cut into 3 parts (programs of their own whose partial
  sums are added after the kernel), one of them empty: causal with documents, a GQA pair
  and a key bias (the bias gradient summed over the parts too)."""
  monkeypatch.setattr(mosaic_gpu_backward, 'dkv_splits', lambda *args, **kwargs: 3)
  q, k, v, bias, d_out = random_inputs(9, 1, 128, 128, 4, 2, 64, jnp.bfloat16, with_bias=True)
  segments = documents(128, 2)
  plan = plan_from_mask(masks.Causal(), q_len=128, block_q=64, block_kv=64, segment_ids=segments)
  check(plan, q, k, v, bias, d_out, allowed=mask_oracle(masks.Causal(), q_len=128, segment_ids=segments))


def test_dkv_splits_only_where_few_programs_walk_long_lists():
  nsa_compressed = mosaic_gpu_backward.dkv_splits(16 * 4, 16 * 256)  # 16 kv blocks x 4 kv heads, 16 heads x 256 q blocks
  assert nsa_compressed * 16 * 4 >= 4 * 132 and 16 * 256 // nsa_compressed >= mosaic_gpu_backward.MIN_PART_STEPS
  assert mosaic_gpu_backward.dkv_splits(256 * 16, 256) == 1  # dense 32k, 16 kv heads: already 4096 programs
  assert mosaic_gpu_backward.dkv_splits(4, 40) == 1  # short lists are not worth cutting
  assert mosaic_gpu_backward.dkv_splits(4, 4096, fused=True) == 1


def test_dkv_splits_cut_long_lists_of_masks_without_a_key_span():
  nsa_selection_64k = (1024 * 4, 16 * 1024)  # 1024 kv blocks x 4 kv heads; 16 heads x 1024 q blocks a list
  assert mosaic_gpu_backward.dkv_splits(*nsa_selection_64k) == mosaic_gpu_backward.LONG_LIST_PARTS > 1
  assert mosaic_gpu_backward.dkv_splits(*nsa_selection_64k, spanned=True) == 1  # a window keeps its lists short
  assert mosaic_gpu_backward.dkv_splits(*nsa_selection_64k, fused=True) == 1
  assert mosaic_gpu_backward.dkv_splits(1024 * 4, mosaic_gpu_backward.LONG_LIST_ENTRIES - 1) == 1


def test_fused_two_query_chunks_per_block_with_documents_gqa_and_bias():
  """block_q 128 over one 64-key warpgroup: each q block is two pipeline steps of the
  fused kernel, each adding its own 64 rows of dQ."""
  q, k, v, bias, d_out = random_inputs(8, 1, 200, 200, 4, 2, 64, jnp.bfloat16, with_bias=True)
  segments = documents(200, 4)
  plan = plan_from_mask(masks.causal_window(100), q_len=200, block_q=128, block_kv=64, segment_ids=segments)
  check(plan, q, k, v, bias, d_out, allowed=mask_oracle(masks.causal_window(100), q_len=200, segment_ids=segments),
        path='fused')


def test_unavailable_names_what_is_unsupported():
  q, k, v, _, _ = random_inputs(0, 1, 64, 64, 2, 1, 64, jnp.float32, with_bias=False)
  plan = plan_from_mask(masks.Causal(), q_len=64, block_q=64, block_kv=64)
  assert 'bfloat16' in mosaic_gpu_backward.unavailable(q, k, v, None, plan)
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  assert mosaic_gpu_backward.unavailable(q, k, v, None, plan) is None
  assert 'head_dim' in mosaic_gpu_backward.unavailable(q[..., :32], k[..., :32], v[..., :32], None, plan)
  small_blocks = plan_from_mask(masks.Causal(), q_len=64, block_q=32, block_kv=64)
  assert 'block_q' in mosaic_gpu_backward.unavailable(q, k, v, None, small_blocks)


SLOW_CASES = [
    # mask or plan, length, heads, kv heads, head_dim, block_q, block_kv, dtype, bias, documents
    ('causal', 256, 4, 4, 64, 128, 128, jnp.bfloat16, True, False),
    ('window', 200, 8, 1, 64, 128, 64, jnp.float16, True, True),
    ('chunked', 256, 8, 4, 128, 64, 128, jnp.bfloat16, False, False),
    ('random_1', 256, 4, 2, 64, 64, 128, jnp.bfloat16, True, True),
    ('random_kv', 200, 8, 2, 64, 64, 64, jnp.bfloat16, True, False),
    ('random_h', 256, 8, 8, 64, 128, 64, jnp.float16, True, False),
]


def build_plan(name, length, heads, kv_heads, block_q, block_kv, segments, seed=0, batch=1):
  """(the plan, its element mask from mask_oracle.py)."""
  if name in MASKS:
    plan = plan_from_mask(MASKS[name], q_len=length, block_q=block_q, block_kv=block_kv, segment_ids=segments,
                          batch=batch)
    return plan, mask_oracle(MASKS[name], q_len=length, batch=batch, segment_ids=segments)
  plan_heads = {'random_1': 1, 'random_kv': kv_heads, 'random_h': heads}[name]
  return random_block_plan(seed, length, block_q, block_kv, plan_heads, segment_ids=segments, batch=batch)


@pytest.mark.slow
@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('case', SLOW_CASES, ids=[c[0] for c in SLOW_CASES])
def test_larger_interpret_cases(case, path):
  name, length, heads, kv_heads, head_dim, block_q, block_kv, dtype, with_bias, with_documents = case
  q, k, v, bias, d_out = random_inputs(11, 1, length, length, heads, kv_heads, head_dim, dtype, with_bias)
  plan, allowed = build_plan(name, length, heads, kv_heads, block_q, block_kv,
                             documents(length, 3) if with_documents else None)
  check(plan, q, k, v, bias, d_out, allowed=allowed, path=path)


GPU_PLANS = sorted(MASKS) + ['random_1', 'random_kv', 'random_h']


GPU_BLOCKS = [(64, 64), (128, 128), (128, 64), (64, 128)]
GROUPS = [1, 2, 4, 8]
# Every plan with two GQA groups and block shapes in rotation: all groups, blocks and plans are covered.
GPU_CASES = [(name, GROUPS[(i + shift) % 4], GPU_BLOCKS[(i + shift // 2) % 4])
             for i, name in enumerate(GPU_PLANS) for shift in (0, 2)]


@pytest.mark.gpu
@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('plan_name, group, blocks', GPU_CASES, ids=lambda c: str(c))
def test_gpu_plans_blocks_and_groups(plan_name, group, blocks, path):
  length, heads = 1000, 8
  q, k, v, bias, d_out = random_inputs(group, 1, length, length, heads, heads // group, 128, jnp.bfloat16, True)
  segments = documents(length, 1) if group == 2 else None
  plan, allowed = build_plan(plan_name, length, heads, heads // group, *blocks, segments, seed=group)
  check(plan, q, k, v, bias, d_out, interpret=False, allowed=allowed, path=path)


@pytest.mark.gpu
@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize('head_dim', [64, 128])
def test_gpu_dtypes_and_head_dims(dtype, head_dim, path):
  q, k, v, bias, d_out = random_inputs(5, 1, 2048, 2048, 4, 2, head_dim, dtype, with_bias=True)
  segments = documents(2048, 2)
  plan = plan_from_mask(masks.causal_window(300), q_len=2048, block_q=128, block_kv=128, segment_ids=segments)
  check(plan, q, k, v, bias, d_out, interpret=False,
        allowed=mask_oracle(masks.causal_window(300), q_len=2048, segment_ids=segments), path=path)


@pytest.mark.gpu
def test_gpu_dkv_lists_cut_into_parts(monkeypatch):
  """NSA's compression-branch shape in small: 2048 queries against 128 compressed keys
  (spans of 32 every 16), 8 query heads on 2 kv heads, lists cut into 5 parts."""
  monkeypatch.setattr(mosaic_gpu_backward, 'dkv_splits', lambda *args, **kwargs: 5)
  mask = masks.CompressedCausal(32, 16)
  q, k, v, bias, d_out = random_inputs(10, 1, 2048, 128, 8, 2, 128, jnp.bfloat16, True)
  plan = plan_from_mask(mask, q_len=2048, kv_len=128, block_q=128, block_kv=64)
  check(plan, q, k, v, bias, d_out, interpret=False, allowed=mask_oracle(mask, q_len=2048, kv_len=128))


@pytest.mark.gpu
@pytest.mark.parametrize('path', PATHS)
def test_gpu_fully_masked_rows_and_no_bias(path):
  q, k, v, _, d_out = random_inputs(6, 1, 512, 512, 4, 2, 128, jnp.bfloat16, with_bias=False)
  chosen = jnp.zeros((1, 4, 4, 4), bool).at[:, :, 2:, :].set(True)
  plan = plan_from_block_mask(chosen, q_len=512, block_q=128, block_kv=128)
  allowed = block_mask_oracle(chosen, q_len=512, block_q=128, block_kv=128)
  dq, _, _, dbias = check(plan, q, k, v, None, d_out, interpret=False, allowed=allowed, path=path)
  assert dbias is None and (dq[:, :256] == 0).all()


LOWERING_CASES = [(64, 128, 64, False, False), (128, 64, 128, True, True)]


@pytest.mark.parametrize('path', PATHS)
@pytest.mark.parametrize('case', LOWERING_CASES, ids=lambda c: 'bq{}_bk{}_d{}_bias{}_docs{}'.format(*c))
def test_lowers_for_cuda_on_any_host(case, path):
  """Mosaic GPU lowering (layouts, transforms, pipeline) without a GPU; not ptxas."""
  block_q, block_kv, head_dim, with_bias, with_documents = case
  b, t, h, hkv = 2, 1000, 8, 2
  segments = jnp.zeros((b, t), jnp.int32) if with_documents else None
  plan = plan_from_mask(masks.Causal(), q_len=t, block_q=block_q, block_kv=block_kv, batch=b, segment_ids=segments)
  q = jax.ShapeDtypeStruct((b, t, h, head_dim), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, hkv, head_dim), jnp.bfloat16)
  bias = jax.ShapeDtypeStruct((b, hkv, t), jnp.float32) if with_bias else None
  lse = jax.ShapeDtypeStruct((b, h, t), jnp.float32)
  run = lambda q, k, v, bias, out, lse, d_out: BACKWARDS[path](q, k, v, bias, plan, 0.1, out, lse, d_out, lse)
  lowered = jax.jit(run).trace(q, kv, kv, bias, q, lse, q).lower(lowering_platforms=('cuda',))
  assert lowered.as_text().count('mosaic_gpu') >= 2
