"""The Mosaic GPU (Hopper) block-sparse forward against reference.forward and the dense
oracle: masks, documents, random per-head plans, key_bias, fully masked rows, GQA,
ragged lengths, bf16/f16, head_dim 64/128, block_q 64/128, block_kv 64/128.

On CPU the kernel runs in GPU interpret mode (TMA, SMEM, barriers and wgmma simulated;
the PV product is a jnp dot there, since interpret mode lacks register-A wgmma) on small
shapes; the `gpu` tests run the compiled kernel on an sm90 GPU with larger shapes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mask_oracle import block_mask_oracle, mask_oracle
from oracles import masked_softmax_attention
from test_block_sparse_attention import oracle_or_plan_mask, random_inputs

from pallas_kernels.block_sparse_attention import masks, plan_from_block_mask, plan_from_mask, reference
from pallas_kernels.block_sparse_attention import mosaic_gpu_forward
from pallas_kernels.block_sparse_attention.reference import EMPTY_ROW_LSE

# P is rounded to the input dtype before the PV product, as in every flash kernel.
OUT_TOLERANCE = {jnp.bfloat16: dict(rtol=2e-2, atol=2e-2), jnp.float16: dict(rtol=5e-3, atol=5e-3)}
LSE_TOLERANCE = dict(rtol=1e-4, atol=2e-3)


def check_forward(plan, q, k, v, bias, *, interpret, persistent=False, dense=True, allowed=None):
  """Kernel output and LSE against reference.forward (and the dense oracle when asked, under
  `allowed` [B, Hp, Tq, Tk] from mask_oracle.py; None: the plan's own rendering)."""
  dtype = q.dtype.type
  scale = q.shape[-1] ** -0.5
  assert mosaic_gpu_forward.unavailable(q, k, v, bias, plan, interpret=interpret) is None
  run = lambda *a: mosaic_gpu_forward.forward(*a, plan, scale, interpret=interpret, persistent=persistent)
  out, lse = jax.jit(run)(q, k, v, bias)
  assert out.shape == q.shape and out.dtype == q.dtype
  assert lse.shape == (q.shape[0], q.shape[2], q.shape[1]) and lse.dtype == jnp.float32
  out_f32 = np.asarray(out, np.float32)
  assert np.isfinite(out_f32).all() and np.isfinite(np.asarray(lse)).all()
  out_ref, lse_ref = jax.jit(reference.forward, static_argnums=5)(q, k, v, bias, plan, scale)
  np.testing.assert_allclose(out_f32, np.asarray(out_ref, np.float32), **OUT_TOLERANCE[dtype])
  np.testing.assert_allclose(lse, lse_ref, **LSE_TOLERANCE)
  if dense:
    allowed = oracle_or_plan_mask(allowed, plan, q.shape[2])
    dense_attention = functools.partial(masked_softmax_attention, scale=scale, return_lse=True)
    out_dense, lse_dense = jax.jit(dense_attention)(q, k, v, allowed, key_bias=bias)
    np.testing.assert_allclose(out_f32, out_dense, **OUT_TOLERANCE[dtype])
    np.testing.assert_allclose(lse, lse_dense, **LSE_TOLERANCE)
  return out, lse


def documents(rng, batch, length, rate):
  return jnp.asarray(np.cumsum(rng.random((batch, length)) < rate, axis=1).astype(np.int32))


def random_plan(seed, batch, plan_heads, length, block_q, block_kv, density, segment_ids=None):
  """(a plan of random blocks, its element mask from mask_oracle.py)."""
  rng = np.random.default_rng(seed)
  nq, nk = -(-length // block_q), -(-length // block_kv)
  chosen = rng.random((batch, plan_heads, nq, nk)) < density
  layout = dict(q_len=length, block_q=block_q, block_kv=block_kv, segment_ids=segment_ids)
  return plan_from_block_mask(jnp.asarray(chosen), **layout), block_mask_oracle(chosen, **layout)


# Each case: (mask or plan builder, B, T, H, Hkv, D, dtype, block_q, block_kv, bias).
INTERPRET_CASES = {
    # ragged T = 330 (blocks 128/64), GQA 2, bias; up to 6 steps: the 4-stage ring wraps
    'causal_ragged_gqa2_bias': (masks.Causal(), 1, 330, 2, 1, 64, jnp.bfloat16, 128, 64, True),
    # one compute warpgroup, f16, head_dim 128, window cuts inside blocks
    'window_bq64_f16_d128': (masks.causal_window(40), 1, 192, 2, 1, 128, jnp.float16, 64, 64, False),
    # block_kv 128 ring of 4 stages, GQA 8 (one kv head)
    'chunked_gqa8_bkv128': (masks.Chunked(96) & masks.Causal(), 1, 256, 8, 1, 64, jnp.bfloat16, 128, 128, False),
}


@pytest.mark.parametrize('name', sorted(INTERPRET_CASES))
def test_mask_plans_interpret(name):
  mask, b, t, h, hkv, d, dtype, bq, bkv, with_bias = INTERPRET_CASES[name]
  q, k, v, bias, _ = random_inputs(0, b, t, t, h, hkv, d, dtype, with_bias)
  check_forward(plan_from_mask(mask, q_len=t, block_q=bq, block_kv=bkv, batch=b), q, k, v, bias, interpret=True,
                allowed=mask_oracle(mask, q_len=t))


def test_documents_and_per_head_random_plan_interpret():
  """Segment ids, a per-query-head plan (Hp = H) with empty rows, batch 2, bias; the
  persistent schedule (3 CTAs, 16 tiles: the ring runs on across tiles, some empty)."""
  rng = np.random.default_rng(1)
  b, t, h, hkv = 2, 256, 4, 2
  segments = documents(rng, b, t, 0.01)
  plan, allowed = random_plan(1, b, h, t, 128, 64, 0.4, segment_ids=segments)
  q, k, v, bias, _ = random_inputs(1, b, t, t, h, hkv, 64, jnp.bfloat16, True)
  check_forward(plan, q, k, v, bias, interpret=True, persistent=True, allowed=allowed)


@pytest.mark.parametrize('persistent', [False, True])
def test_fully_masked_rows_interpret(persistent):
  """q block 0 sees nothing (kv_count 0: no pipeline step at all), q block 1 one block
  (fewer than the pipeline depth): zero output and EMPTY_ROW_LSE for the empty rows."""
  t = 256
  chosen = jnp.zeros((1, 1, 2, 4), bool).at[0, 0, 1, 3].set(True)
  plan = plan_from_block_mask(chosen, q_len=t, block_q=128, block_kv=64, mask=masks.Full())
  q, k, v, _, _ = random_inputs(2, 1, t, t, 2, 2, 64, jnp.bfloat16, False)
  allowed = block_mask_oracle(chosen, q_len=t, block_q=128, block_kv=64, mask=masks.Full())
  out, lse = check_forward(plan, q, k, v, None, interpret=True, persistent=persistent, allowed=allowed)
  assert (np.asarray(out[:, :128], np.float32) == 0).all()
  assert (np.asarray(lse[:, :, :128]) == EMPTY_ROW_LSE).all()


@pytest.mark.slow
@pytest.mark.parametrize('group', [1, 2, 4, 8])
@pytest.mark.parametrize('plan_heads', ['one', 'kv', 'all'])
def test_random_plans_gqa_interpret(group, plan_heads):
  h = 8
  hkv = h // group
  hp = {'one': 1, 'kv': hkv, 'all': h}[plan_heads]
  t = 192
  plan, allowed = random_plan(group * 10 + hp, 1, hp, t, 64, 64, 0.5)
  q, k, v, bias, _ = random_inputs(group, 1, t, t, h, hkv, 64, jnp.bfloat16, group % 2 == 0)
  check_forward(plan, q, k, v, bias, interpret=True, persistent=plan_heads != 'kv', allowed=allowed)


@pytest.mark.slow
@pytest.mark.parametrize('mask_name', ['causal', 'window', 'chunked', 'prefix_or_window'])
@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float16])
def test_more_masks_interpret(mask_name, dtype):
  mask = {'causal': masks.Causal(), 'window': masks.causal_window(70), 'chunked': masks.Chunked(100),
          'prefix_or_window': (masks.SlidingWindow(30) | masks.GlobalPrefix(10)) & masks.Causal()}[mask_name]
  t = 200
  q, k, v, bias, _ = random_inputs(3, 1, t, t, 2, 1, 128, dtype, True)
  check_forward(plan_from_mask(mask, q_len=t, block_q=128, block_kv=128), q, k, v, bias, interpret=True,
                allowed=mask_oracle(mask, q_len=t))


def test_unavailable_reasons():
  q, k, v, _, _ = random_inputs(0, 1, 128, 128, 2, 2, 64, jnp.bfloat16, False)
  plan = plan_from_mask(masks.Causal(), q_len=128, block_q=128, block_kv=64)
  reason = lambda *a, **kw: mosaic_gpu_forward.unavailable(*a, **kw)
  assert reason(q, k, v, None, plan, interpret=True) is None
  assert 'bfloat16 or float16' in reason(q.astype(jnp.float32), k, v, None, plan, interpret=True)
  assert 'head_dim' in reason(q[..., :32], k[..., :32], v[..., :32], None, plan, interpret=True)
  assert 'block_q' in reason(q, k, v, None, plan_from_mask(masks.Causal(), q_len=128, block_q=32), interpret=True)
  assert 'block_kv' in reason(q, k, v, None, plan_from_mask(masks.Causal(), q_len=128, block_kv=256),
                              interpret=True)
  if jax.default_backend() != 'gpu':
    assert 'sm90' in reason(q, k, v, None, plan)
    with pytest.raises(ValueError, match='sm90'):
      mosaic_gpu_forward.forward(q, k, v, None, plan, 0.125)


# Real hardware -------------------------------------------------------------------------

GPU_MASKS = {
    'causal': masks.Causal(),
    'window': masks.causal_window(300),
    'chunked': masks.Chunked(384) & masks.Causal(),
    'bidirectional': masks.SlidingWindow(200, 200),
}


@pytest.mark.gpu
@pytest.mark.parametrize('mask_name', sorted(GPU_MASKS))
@pytest.mark.parametrize('blocks', [(128, 128), (128, 64), (64, 64), (64, 128)])
def test_mask_plans_gpu(mask_name, blocks):
  t = 1000  # ragged for every block size
  dtype = jnp.float16 if mask_name == 'causal' else jnp.bfloat16
  q, k, v, bias, _ = random_inputs(4, 2, t, t, 8, 2, 128, dtype, mask_name == 'window')
  plan = plan_from_mask(GPU_MASKS[mask_name], q_len=t, block_q=blocks[0], block_kv=blocks[1], batch=2)
  check_forward(plan, q, k, v, bias, interpret=False, persistent=blocks[0] != blocks[1])


@pytest.mark.gpu
@pytest.mark.parametrize('head_dim', [192, 256])
def test_large_head_dims_gpu(head_dim):
  t = 640
  q, k, v, bias, _ = random_inputs(6, 1, t, t, 4, 2, head_dim, jnp.bfloat16, True)
  plan = plan_from_mask(masks.causal_window(200), q_len=t, block_q=128, block_kv=64)
  check_forward(plan, q, k, v, bias, interpret=False, persistent=True)


@pytest.mark.gpu
@pytest.mark.parametrize('group', [1, 2, 4, 8])
@pytest.mark.parametrize('plan_heads', ['one', 'kv', 'all'])
def test_random_plans_documents_gqa_gpu(group, plan_heads):
  h, t = 8, 777
  hkv = h // group
  hp = {'one': 1, 'kv': hkv, 'all': h}[plan_heads]
  segments = documents(np.random.default_rng(group), 2, t, 0.004)
  plan, allowed = random_plan(group + hp, 2, hp, t, 128, 64, 0.3, segment_ids=segments)
  head_dim = 64 if plan_heads == 'kv' else 128
  q, k, v, bias, _ = random_inputs(group, 2, t, t, h, hkv, head_dim, jnp.bfloat16, True)
  check_forward(plan, q, k, v, bias, interpret=False, persistent=group % 2 == 0, allowed=allowed)


@pytest.mark.gpu
@pytest.mark.parametrize('persistent', [False, True])
def test_fully_masked_rows_gpu(persistent):
  t = 1024
  chosen = jnp.zeros((1, 1, 8, 8), bool).at[0, 0, 4:, :].set(True).at[0, 0, 2, 0].set(True)
  plan = plan_from_block_mask(chosen, q_len=t, block_q=128, block_kv=128, mask=masks.Full())
  q, k, v, _, _ = random_inputs(5, 1, t, t, 4, 4, 128, jnp.bfloat16, False)
  allowed = block_mask_oracle(chosen, q_len=t, block_q=128, block_kv=128, mask=masks.Full())
  out, lse = check_forward(plan, q, k, v, None, interpret=False, persistent=persistent, allowed=allowed)
  empty = np.r_[0:256, 384:512]
  assert (np.asarray(out[:, empty], np.float32) == 0).all()
  assert (np.asarray(lse[:, :, empty]) == EMPTY_ROW_LSE).all()


# Lowering for CUDA on any host: catches what Mosaic GPU cannot lower (not ptxas errors) ---

LOWERING_CASES = {
    'causal_grid': (masks.Causal(), 128, 128, 128, False, False, False),
    'causal_persistent_bias': (masks.Causal(), 128, 128, 128, True, True, False),
    'chunked_documents_bq64': (masks.Chunked(200) & masks.Causal(), 64, 64, 64, True, False, True),
    'window_prefix_d256': ((masks.SlidingWindow(90) | masks.GlobalPrefix(7)) & masks.Causal(), 128, 64, 256, False,
                           True, True),
}


@pytest.mark.parametrize('name', sorted(LOWERING_CASES))
def test_lowers_for_cuda(name, monkeypatch):
  mask, bq, bkv, d, persistent, with_bias, with_documents = LOWERING_CASES[name]
  monkeypatch.setattr(mosaic_gpu_forward.common, 'is_hopper_gpu', lambda: True)
  b, t, h, hkv = 2, 4000, 8, 2
  segments = jnp.zeros((b, t), jnp.int32) if with_documents else None
  plan = plan_from_mask(mask, q_len=t, block_q=bq, block_kv=bkv, batch=b, segment_ids=segments)
  q = jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16)
  kv = jax.ShapeDtypeStruct((b, t, hkv, d), jnp.bfloat16)
  bias = jax.ShapeDtypeStruct((b, hkv, t), jnp.float32) if with_bias else None
  run = lambda q, k, v, bias: mosaic_gpu_forward.forward(q, k, v, bias, plan, 0.1, persistent=persistent)
  lowered = jax.jit(run).trace(q, kv, kv, bias).lower(lowering_platforms=('cuda',))
  assert 'mosaic_gpu' in lowered.as_text()
