"""pallas_kernels.compressed_mass: the Pallas Triton kernel (in Pallas interpret mode on the
CPU, compiled on a GPU) against the jnp reference, which test_compressed_scores.py checks
against the definition; and its lowering for CUDA from any host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.compressed_mass import compressed_mass, triton_gpu
from sparseformer.model.attention.compressed_scores import compressed_key_segments, num_compressed

CMP_LEN, CMP_STRIDE = 32, 16


def inputs(length, heads, kv_heads, dim, seed=0, batch=2, documents=True, given_lse=True):
  keys = jax.random.split(jax.random.key(seed), 3)
  count = num_compressed(length, CMP_LEN, CMP_STRIDE)
  q = jax.random.normal(keys[0], (batch, length, heads, dim), jnp.bfloat16)
  k_cmp = jax.random.normal(keys[1], (batch, count, kv_heads, dim), jnp.bfloat16)
  lse = jax.random.normal(keys[2], (batch, heads, length)) + 4.0 if given_lse else None
  q_seg = k_seg = None
  if documents:
    starts = np.random.default_rng(seed).random((batch, length)) < 0.01
    q_seg = jnp.asarray(np.cumsum(starts, axis=1).astype(np.int32) + 1).at[:, -length // 10:].set(0)  # trailing padding
    k_seg = compressed_key_segments(q_seg, CMP_LEN, CMP_STRIDE)
  return q, k_cmp, lse, q_seg, k_seg


def both(args, query_block, implementation):
  options = dict(scale=0.125, cmp_len=CMP_LEN, cmp_stride=CMP_STRIDE, query_block=query_block)
  return (compressed_mass(*args, implementation='reference', **options),
          compressed_mass(*args, implementation=implementation, **options))


@pytest.mark.parametrize('given_lse', [True, False])
@pytest.mark.parametrize('documents', [True, False])
def test_interpreted_kernel_matches_the_reference(given_lse, documents):
  args = inputs(300, 4, 2, 64, documents=documents, given_lse=given_lse)  # 300: a ragged last block
  want, got = both(args, 64, 'triton_interpreted')
  assert got.shape == want.shape == (2, 2, 5, num_compressed(300, CMP_LEN, CMP_STRIDE)) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
  if not given_lse:  # every voting query that sees a key gives mass 1 per head
    assert float(want.sum()) > 0


@pytest.mark.parametrize('given_lse', [True, False])
@pytest.mark.parametrize('documents', [True, False])
def test_long_rows_match_where_tiles_need_no_causal_mask(given_lse, documents):
  """2100 tokens: 130 compressed keys in 3 tiles, so later query blocks walk tiles that every
  query of the block sees whole (the kernel skips the causal mask there) before the tiles
  at their causal bound."""
  args = inputs(2100, 2, 1, 64, batch=1, documents=documents, given_lse=given_lse)
  want, got = both(args, 64, 'triton_interpreted')
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
  assert triton_gpu.KEY_TILE * 2 < num_compressed(2100, CMP_LEN, CMP_STRIDE)


def test_no_compressed_key_gives_an_empty_mass():
  q = jnp.ones((1, 20, 2, 64), jnp.bfloat16)
  k_cmp = jnp.zeros((1, 0, 1, 64), jnp.bfloat16)
  want, got = both((q, k_cmp, None, None, None), 64, 'triton_interpreted')
  assert want.shape == got.shape == (1, 1, 1, 0)


def test_bad_inputs_are_refused_with_the_reason():
  q, k_cmp, lse, q_seg, k_seg = inputs(128, 4, 2, 64)
  options = dict(scale=0.1, cmp_len=CMP_LEN, cmp_stride=CMP_STRIDE, query_block=64)
  with pytest.raises(ValueError, match='lse must be'):
    compressed_mass(q, k_cmp, lse[:, :, :10], q_seg, k_seg, **options)
  with pytest.raises(ValueError, match='come together'):
    compressed_mass(q, k_cmp, lse, q_seg, None, **options)
  with pytest.raises(ValueError, match='head_dim'):
    compressed_mass(q[..., :48], k_cmp[..., :48], lse, q_seg, k_seg, implementation='triton_interpreted', **options)


def test_carries_no_gradient():
  q, k_cmp, lse, _, _ = inputs(128, 2, 1, 64, documents=False)
  loss = lambda q: compressed_mass(q, k_cmp, lse, None, None, scale=0.1, cmp_len=CMP_LEN, cmp_stride=CMP_STRIDE,
                                   query_block=64).sum()
  assert not np.any(np.asarray(jax.grad(loss)(q.astype(jnp.float32))))


@pytest.mark.parametrize('given_lse', [True, False])
def test_lowers_for_cuda_on_any_host(monkeypatch, given_lse):
  """Pallas's Triton lowering (not Triton's compile) at NSA's shape, for an H100."""
  from jax._src.pallas.triton import gpu_info, pallas_call_registration
  monkeypatch.setattr(pallas_call_registration.gpu_info_lib, 'get_gpu_info',
                      lambda: gpu_info._get_gpu_info_impl(gpu_info.GpuVersion.H100))
  length, count = 32768, num_compressed(32768, CMP_LEN, CMP_STRIDE)
  q = jax.ShapeDtypeStruct((1, length, 64, 128), jnp.bfloat16)
  k_cmp = jax.ShapeDtypeStruct((1, count, 4, 128), jnp.bfloat16)
  lse = jax.ShapeDtypeStruct((1, 64, length), jnp.float32) if given_lse else None
  segments = (jax.ShapeDtypeStruct((1, length), jnp.int32), jax.ShapeDtypeStruct((1, count), jnp.int32))
  run = lambda q, k, lse, s, t: triton_gpu.compressed_mass(q, k, lse, s, t, scale=0.1, cmp_len=CMP_LEN,
                                                           cmp_stride=CMP_STRIDE, query_block=128)
  lowered = jax.jit(run).trace(q, k_cmp, lse, *segments).lower(lowering_platforms=('cuda',))
  assert 'triton' in lowered.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize('given_lse', [True, False])
@pytest.mark.parametrize('query_block', [64, 128])
def test_gpu_kernel_matches_the_reference(given_lse, query_block):
  args = inputs(4000, 16, 4, 128, seed=3, documents=query_block == 64, given_lse=given_lse)
  want, got = both(args, query_block, 'triton')
  np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * float(jnp.abs(want).max()))
