"""When the platform's preferred kernel cannot take a call, the api falls back with one
UserWarning per distinct reason, naming the skipped kernel; runs on CPU by faking the
platform's preference order (and, for the TPU kernel, its platforms)."""

import dataclasses
import warnings

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.block_sparse_attention import api as block_sparse_api
from pallas_kernels.block_sparse_attention import masks
from pallas_kernels.block_sparse_attention.plan import plan_from_mask
from pallas_kernels.implementations import KERNELS_ENV
from pallas_kernels.linear_attention import api as linear_api


def fallback_warnings(call):
  """The messages of the fallback UserWarnings `call()` emits (every one, no filtering)."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    call()
  return [str(w.message) for w in caught if issubclass(w.category, UserWarning) and 'falls back' in str(w.message)]


@pytest.fixture
def gpu_preference_on_cpu(monkeypatch):
  """block_sparse_attention's registry as on a GPU, with the interpret-mode Mosaic GPU kernel
  (it runs on CPU and rejects the same inputs) in front of the reference."""
  registry = block_sparse_api.REGISTRY
  monkeypatch.setattr(registry, 'preference', {'cpu': ('mosaic_gpu_interpret', 'reference')})
  monkeypatch.setattr(registry, 'warned_fallbacks', set())
  return registry


def block_sparse_inputs(block):
  q = jnp.ones((1, 256, 2, 64), jnp.bfloat16)
  plan = plan_from_mask(masks.Causal(), q_len=256, block_q=block, block_kv=block)
  return q, plan


def test_block_size_the_gpu_kernel_rejects_falls_back_to_reference_with_one_warning(gpu_preference_on_cpu):
  q, plan = block_sparse_inputs(256)
  select = lambda: block_sparse_api.select_implementation(None, q, q, q, None, plan)
  first = fallback_warnings(select)
  assert len(first) == 1
  assert "falls back to 'reference'" in first[0] and 'mosaic_gpu_interpret' in first[0]
  assert 'block_q must be 64 or 128, got 256' in first[0]
  assert select().name == 'reference'
  out = block_sparse_api.block_sparse_attention(q, q, q, plan)
  np.testing.assert_allclose(np.asarray(out, np.float32), 1.0)  # v is all ones
  assert fallback_warnings(select) == []  # the same reason again: no second warning
  q32 = q.astype(jnp.float32)
  other = fallback_warnings(lambda: block_sparse_api.select_implementation(None, q32, q32, q32, None, plan))
  assert len(other) == 1 and 'float32' in other[0]  # a different reason warns once more


def test_a_call_the_gpu_kernel_takes_does_not_warn(gpu_preference_on_cpu):
  q, plan = block_sparse_inputs(64)
  messages = fallback_warnings(lambda: block_sparse_api.select_implementation(None, q, q, q, None, plan))
  assert messages == []
  assert block_sparse_api.select_implementation(None, q, q, q, None, plan).name == 'mosaic_gpu_interpret'


def test_kernels_env_reference_skips_the_kernels_silently(gpu_preference_on_cpu, monkeypatch):
  monkeypatch.setenv(KERNELS_ENV, 'reference')
  q, plan = block_sparse_inputs(64)
  select = lambda: block_sparse_api.select_implementation(None, q, q, q, None, plan)
  assert fallback_warnings(select) == []
  assert select().name == 'reference'
  monkeypatch.setenv(KERNELS_ENV, 'fastest')
  with pytest.raises(ValueError, match=KERNELS_ENV):
    select()


def test_head_dim_the_tpu_kernel_rejects_falls_back_with_one_warning(monkeypatch):
  registry = linear_api.REGISTRY
  tpu_everywhere = dataclasses.replace(registry.implementations['tpu'], platforms=('cpu', 'gpu', 'tpu'))
  monkeypatch.setitem(registry.implementations, 'tpu', tpu_everywhere)
  monkeypatch.setattr(registry, 'preference', {'cpu': ('tpu', 'reference')})
  monkeypatch.setattr(registry, 'warned_fallbacks', set())
  x = jnp.zeros((1, 8, 1, 4), jnp.float32)
  select = lambda: linear_api.select_implementation(None, x, x, x, x, None, None)
  first = fallback_warnings(select)
  assert len(first) == 1
  assert "falls back to 'reference'" in first[0] and 'tpu: Mosaic TPU needs Dk and Dv multiples of 128' in first[0]
  assert select().name == 'reference'
  assert fallback_warnings(select) == []


def hang_warnings(call):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    call()
  return [str(w.message) for w in caught if 'can hang' in str(w.message)]


def test_interpret_mode_warns_when_the_cpu_pool_is_too_small(gpu_preference_on_cpu, monkeypatch):
  q, plan = block_sparse_inputs(64)
  select = lambda: block_sparse_api.select_implementation('mosaic_gpu_interpret', q, q, q, None, plan)
  monkeypatch.setenv('PJRT_NPROC', '2')
  first = hang_warnings(select)
  assert len(first) == 1 and 'PJRT_NPROC=16' in first[0] and 'with 2 XLA CPU threads' in first[0]
  assert hang_warnings(select) == []  # once
  monkeypatch.setattr(gpu_preference_on_cpu, 'warned_fallbacks', set())
  monkeypatch.setenv('PJRT_NPROC', '16')  # what tests/conftest.py sets
  assert hang_warnings(select) == []
