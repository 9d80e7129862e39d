"""Gated linear attention: the chunked and recurrent references against the naive oracle
(outputs, final state and the gradients of q, k, v, g and the initial state), segment
resets (mid-chunk, on a chunk boundary, one-token segments, reused ids) against running
each document alone, bf16 inputs, extreme decays, the public api and its custom_vjp, that
neither the chunked nor the recurrent version builds a T x T array, and the Mosaic TPU
forward kernel (tpu.py) in TPU interpret mode and lowered for a TPU target."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pallas_kernels.linear_attention import gated_linear_attention, reference, tpu
from pallas_kernels.linear_attention.api import IMPLEMENTATIONS, select_implementation

# Relative to the largest magnitude of the expected array: f32 sums of up to ~200 terms;
# bf16 compares two float32 computations on the same bf16 inputs whose outputs and
# gradients are then rounded to bf16 (8 mantissa bits).
TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 1.6e-2}
VERSIONS = ('naive', 'recurrent', 'chunked')


def random_inputs(seed, b, t, h, dk, dv, dtype=jnp.float32, decay_bias=2.0):
  """q, k, v, g (log decay <= 0, mostly mild), initial state and output cotangents."""
  keys = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(keys[0], (b, t, h, dk), dtype)
  k = jax.random.normal(keys[1], (b, t, h, dk), dtype)
  v = jax.random.normal(keys[2], (b, t, h, dv), dtype)
  g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (b, t, h, dk)) * 2 + decay_bias).astype(dtype)
  state0 = jax.random.normal(keys[4], (b, h, dk, dv), jnp.float32)
  d_o = jax.random.normal(keys[5], (b, t, h, dv), jnp.float32)
  d_state = jax.random.normal(keys[6], (b, h, dk, dv), jnp.float32)
  return q, k, v, g, state0, d_o, d_state


def random_segments(seed, b, t, start_rate):
  rng = np.random.default_rng(seed)
  return jnp.asarray(np.cumsum(rng.random((b, t)) < start_rate, axis=1).astype(np.int32))


def run_version(version, q, k, v, g, state0, segment_ids, **chunking):
  function = getattr(reference, version)
  return function(q, k, v, g, scale=0.7, initial_state=state0, segment_ids=segment_ids, **chunking)


def values_and_grads(version, q, k, v, g, state0, segment_ids, d_o, d_state, **chunking):
  """((o, final state), (dq, dk, dv, dg, d_state0)) for the cotangents (d_o, d_state)."""

  def forward(q, k, v, g, state0):
    return run_version(version, q, k, v, g, state0, segment_ids, **chunking)

  outputs, pullback = jax.vjp(forward, q, k, v, g, state0)
  return outputs, pullback((d_o.astype(outputs[0].dtype), d_state))


values_and_grads_jit = jax.jit(values_and_grads, static_argnums=0, static_argnames=('chunk', 'sub_chunk'))


def assert_close(got, want, dtype, name):
  assert got.shape == want.shape and got.dtype == want.dtype, (name, got.shape, want.shape, got.dtype, want.dtype)
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  assert np.all(np.isfinite(got)), name
  scale = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, rtol=0, atol=TOLERANCE[dtype] * scale, err_msg=name)


def assert_versions_agree(inputs, segment_ids, dtype=jnp.float32, with_state=True, **chunking):
  q, k, v, g, state0, d_o, d_state = inputs
  state0 = state0 if with_state else None
  results = {}
  for version in VERSIONS:
    options = chunking if version == 'chunked' else {}
    results[version] = values_and_grads_jit(version, q, k, v, g, state0, segment_ids, d_o, d_state, **options)
  names = ('o', 'final_state', 'dq', 'dk', 'dv', 'dg', 'd_initial_state')
  want = jax.tree.leaves(results['naive'])
  for version in ('recurrent', 'chunked'):
    got = jax.tree.leaves(results[version])
    assert len(got) == len(want) == (7 if with_state else 6)
    for name, got_x, want_x in zip(names, got, want):
      assert_close(got_x, want_x, dtype, f'{version} {name}')
  return results['naive']


CASES = dict(batch=st.integers(1, 2), length=st.integers(1, 150), heads=st.integers(1, 2),
             dk=st.sampled_from([4, 8]), dv=st.sampled_from([3, 8]), start_rate=st.sampled_from([0.0, 0.02, 0.1]),
             with_state=st.booleans(), chunking=st.sampled_from([(64, 16), (32, 8), (16, 16)]),
             seed=st.integers(0, 2**16))


def check_random_case(batch, length, heads, dk, dv, start_rate, with_state, chunking, seed):
  inputs = random_inputs(seed, batch, length, heads, dk, dv)
  segment_ids = random_segments(seed, batch, length, start_rate) if start_rate else None
  assert_versions_agree(inputs, segment_ids, with_state=with_state, chunk=chunking[0], sub_chunk=chunking[1])


@settings(max_examples=2, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**CASES)
def test_chunked_and_recurrent_match_naive(**case):
  check_random_case(**case)


@pytest.mark.slow
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**CASES)
def test_chunked_and_recurrent_match_naive_wide(**case):
  check_random_case(**case)


def hand_placed_segments(t=150):
  """Resets mid-chunk (37), on a chunk boundary (64), a one-token segment (100), a reused id
  (1 again after 2) and a last segment ending mid-chunk."""
  ids = np.ones((2, t), np.int32)
  ids[0, 37:], ids[0, 64:], ids[0, 100:], ids[0, 101:] = 2, 1, 3, 4
  ids[1, 64:] = 9
  return jnp.asarray(ids)


def test_hand_placed_segments():
  assert_versions_agree(random_inputs(0, 2, 150, 2, 8, 4), hand_placed_segments())


def test_segments_match_documents_run_alone():
  """A packed row equals each document run alone (one batch row per document, left-aligned
  and zero-padded: padding is an identity transition): the first with the initial state, the
  others from zero; the final state is the last document's."""
  t, starts = 130, (0, 37, 64, 65, 120)
  q, k, v, g, state0, _, _ = random_inputs(1, 1, t, 2, 8, 4)
  ids = jnp.asarray(np.cumsum(np.isin(np.arange(t), starts[1:])).astype(np.int32)[None])
  o, final = jax.jit(reference.chunked)(q, k, v, g, initial_state=state0, segment_ids=ids)
  ends = starts[1:] + (t,)
  alone = lambda x: jnp.concatenate([jnp.pad(x[:, a:e], ((0, 0), (0, t - e + a), (0, 0), (0, 0)))
                                     for a, e in zip(starts, ends)])
  states0 = jnp.zeros((len(starts),) + state0.shape[1:]).at[0].set(state0[0])
  o_alone, final_alone = jax.jit(reference.recurrent)(alone(q), alone(k), alone(v), alone(g), initial_state=states0)
  for index, (start, end) in enumerate(zip(starts, ends)):
    assert_close(o[:, start:end], o_alone[index:index + 1, :end - start], jnp.float32, f'document {index}')
  assert_close(final, final_alone[-1:], jnp.float32, 'final state')


def test_bfloat16_inputs_match_float32_computation():
  """bf16 q, k, v, g: chunked and recurrent give bf16 outputs and gradients and a float32 final
  state, equal to the float32 oracle on the same values up to bf16 rounding."""
  inputs = random_inputs(0, 2, 150, 2, 8, 4, dtype=jnp.bfloat16)
  segment_ids = hand_placed_segments()
  as_f32 = [x.astype(jnp.float32) for x in inputs]
  want = jax.tree.leaves(values_and_grads_jit('naive', *as_f32[:5], segment_ids, *as_f32[5:]))
  for version in ('chunked', 'recurrent'):
    got = jax.tree.leaves(values_and_grads_jit(version, *inputs[:5], segment_ids, *inputs[5:]))
    assert [x.dtype for x in got] == [jnp.bfloat16, jnp.float32] + [jnp.bfloat16] * 4 + [jnp.float32], version
    for index, (got_x, want_x) in enumerate(zip(got, want)):
      assert_close(got_x.astype(jnp.float32), want_x, jnp.bfloat16, f'{version} leaf {index}')


@pytest.mark.parametrize('log_decay', [-30.0, -1e4, -1e30, -np.inf])
def test_extreme_decays_stay_finite(log_decay):
  """Strong decays on some channels and tokens, none on others: no NaN/Inf anywhere, and the
  versions still agree (a -1e30 or -inf channel forgets everything before the current token)."""
  q, k, v, g, state0, d_o, d_state = random_inputs(3, 2, 150, 2, 8, 4)
  rng = np.random.default_rng(0)
  strong = jnp.asarray(rng.random(g.shape) < 0.3)
  g = jnp.where(strong, log_decay, jnp.where(jnp.asarray(rng.random(g.shape) < 0.3), 0.0, g))
  values, grads = assert_versions_agree((q, k, v, g, state0, d_o, d_state), hand_placed_segments())
  for x in jax.tree.leaves((values, grads)):
    assert np.all(np.isfinite(np.asarray(x)))


def test_long_mild_decay_has_no_overflow():
  """Cumulative log decay far below exp's range (-1 x 1000 tokens) with no decay on some
  channels: the chunked version never exponentiates a large positive number."""
  q, k, v, g, state0, d_o, d_state = random_inputs(4, 1, 1000, 1, 4, 4)
  g = jnp.full_like(g, -1.0).at[..., 0].set(0.0)
  (o, final), grads = values_and_grads_jit('chunked', q, k, v, g, state0, None, d_o, d_state)
  (o_rec, final_rec), grads_rec = values_and_grads_jit('recurrent', q, k, v, g, state0, None, d_o, d_state)
  for name, got, want in zip(('o', 'final', 'dq', 'dk', 'dv', 'dg', 'ds'), (o, final, *grads),
                             (o_rec, final_rec, *grads_rec)):
    assert_close(got, want, jnp.float32, name)


def test_no_length_squared_arrays():
  """No intermediate of the chunked or recurrent forward or backward has two axes of length >= T."""
  t = 512
  q, k, v, g, state0, d_o, d_state = random_inputs(5, 1, t, 1, 8, 8)
  segment_ids = jnp.zeros((1, t), jnp.int32)
  for version in ('chunked', 'recurrent'):
    jaxpr = jax.make_jaxpr(values_and_grads, static_argnums=0)(version, q, k, v, g, state0, segment_ids, d_o,
                                                               d_state)
    shapes = [var.aval.shape for eqn in _all_equations(jaxpr.jaxpr) for var in eqn.outvars]
    assert shapes, version
    assert not [s for s in shapes if sum(d >= t for d in s) >= 2], version
  naive_jaxpr = jax.make_jaxpr(lambda *a: reference.naive(*a))(q, k, v, g)
  assert any(sum(d >= t for d in var.aval.shape) >= 2 for eqn in _all_equations(naive_jaxpr.jaxpr)
             for var in eqn.outvars)  # the check above can see a T x T array


def _all_equations(jaxpr):
  for eqn in jaxpr.eqns:
    yield eqn
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      yield from _all_equations(sub)


@pytest.mark.parametrize('implementation,with_state', [('reference', True), ('reference_recurrent', False)])
def test_api_matches_naive(implementation, with_state):
  q, k, v, g, state0, d_o, d_state = random_inputs(6, 2, 150, 2, 8, 4)
  state0 = state0 if with_state else None
  segment_ids = hand_placed_segments()

  def api(q, k, v, g, state0):
    return gated_linear_attention(q, k, v, g, scale=0.7, initial_state=state0, segment_ids=segment_ids,
                                  implementation=implementation, return_final_state=True)

  outputs, pullback = jax.vjp(jax.jit(api), q, k, v, g, state0)
  grads = pullback((d_o, d_state))
  want_outputs, want_grads = values_and_grads_jit('naive', q, k, v, g, state0, segment_ids, d_o, d_state)
  for index, (got, want) in enumerate(zip(jax.tree.leaves((outputs, grads)), jax.tree.leaves((want_outputs,
                                                                                             want_grads)))):
    assert_close(got, want, jnp.float32, f'leaf {index}')
  assert (grads[4] is None) == (not with_state)


def test_api_defaults_and_output_only():
  q, k, v, g = random_inputs(7, 1, 20, 1, 4, 4)[:4]
  o = gated_linear_attention(q, k, v, g)
  want, _ = jax.jit(reference.naive)(q, k, v, g, scale=4 ** -0.5)
  assert_close(o, want, jnp.float32, 'o')
  assert select_implementation(None, q, k, v, g, None, None).name == 'reference'
  assert {'reference', 'reference_recurrent'} <= set(IMPLEMENTATIONS)


def test_api_rejects_bad_inputs():
  q, k, v, g, state0 = random_inputs(8, 2, 10, 2, 4, 3)[:5]
  with pytest.raises(ValueError, match='v must be'):
    gated_linear_attention(q, k, v[:, :5], g)
  with pytest.raises(ValueError, match='q, k, g'):
    gated_linear_attention(q, k, v, g[..., :2])
  with pytest.raises(ValueError, match='initial_state'):
    gated_linear_attention(q, k, v, g, initial_state=state0[:1])
  with pytest.raises(ValueError, match='segment_ids'):
    gated_linear_attention(q, k, v, g, segment_ids=jnp.zeros((2, 9), jnp.int32))
  with pytest.raises(ValueError, match='unknown implementation'):
    gated_linear_attention(q, k, v, g, implementation='nope')
  with pytest.raises(ValueError, match='multiple of sub_chunk'):
    reference.chunked(q, k, v, g, chunk=24, sub_chunk=16)


def check_tpu_interpret(seed, b, t, h, dk, dv, dtype, segment_ids, with_state, strong_decay=None, chunking=(64, 16)):
  """tpu.forward in interpret mode against the naive oracle: output and final state."""
  q, k, v, g, state0 = random_inputs(seed, b, t, h, dk, dv, dtype=dtype)[:5]
  if strong_decay is not None:
    g = jnp.where(jax.random.bernoulli(jax.random.key(seed), 0.2, g.shape), strong_decay, g).astype(dtype)
  state0 = state0 if with_state else None
  o, final = tpu.forward(q, k, v, g, state0, segment_ids, 0.7, chunk=chunking[0], sub_chunk=chunking[1],
                         interpret=True)
  o_want, final_want = jax.jit(reference.naive, static_argnames='scale')(q, k, v, g, scale=0.7,
                                                                        initial_state=state0,
                                                                        segment_ids=segment_ids)
  assert_close(o, o_want, dtype, 'o')
  assert_close(final, final_want, dtype, 'final state')


def test_tpu_interpret_forward():
  """Three chunks (the last one partial), resets mid-chunk, on a boundary, one-token segments,
  an initial state and -1e30 decays on a fifth of the channels and tokens."""
  check_tpu_interpret(0, 2, 150, 1, 8, 4, jnp.float32, hand_placed_segments(), True, strong_decay=-1e30)


def test_tpu_interpret_through_api():
  """implementation='tpu_interpret': the kernel's forward and the reference's backward under the
  custom_vjp, against the naive oracle's gradients."""
  q, k, v, g, state0, d_o, d_state = random_inputs(9, 1, 40, 2, 8, 4)
  segment_ids = jnp.asarray(np.repeat([1, 2], [23, 17])[None].astype(np.int32))

  def api(q, k, v, g, state0):
    return gated_linear_attention(q, k, v, g, scale=0.7, initial_state=state0, segment_ids=segment_ids,
                                  implementation='tpu_interpret', return_final_state=True)

  def values_and_grads_of_api(*inputs):
    outputs, pullback = jax.vjp(api, *inputs)
    return outputs, pullback((d_o, d_state))

  got = jax.tree.leaves(jax.jit(values_and_grads_of_api)(q, k, v, g, state0))
  want = jax.tree.leaves(values_and_grads_jit('naive', q, k, v, g, state0, segment_ids, d_o, d_state))
  for index, (got_x, want_x) in enumerate(zip(got, want)):
    assert_close(got_x, want_x, jnp.float32, f'leaf {index}')
  with pytest.warns(UserWarning, match="falls back to 'tpu_interpret'"):
    assert select_implementation(['tpu', 'tpu_interpret'], q, k, v, g, None, None).name == 'tpu_interpret'


def test_tpu_kernel_lowers_to_mosaic_for_a_tpu_target():
  """Lowering for a TPU v5e from this host: block shapes and every op of the kernel body pass
  Pallas's Mosaic lowering (libtpu's own compile needs a TPU and is not run)."""
  b, t, h, d = 1, 300, 2, 128
  x = jnp.zeros((b, t, h, d), jnp.bfloat16)
  state0, segment_ids = jnp.zeros((b, h, d, d), jnp.float32), jnp.ones((b, t), jnp.int32)
  target = jax.sharding.AbstractDevice(device_kind='TPU v5e', num_cores=1, platform='tpu')
  with jax.sharding.use_abstract_mesh(jax.sharding.AbstractMesh((1,), ('x',), abstract_device=target)):
    exported = jax.export.export(jax.jit(lambda *a: tpu.forward(*a, 0.1)), platforms=['tpu'])(
        x, x, x, x, state0, segment_ids)
  assert exported.mlir_module().count('tpu_custom_call') == 1
  assert 'Dk and Dv multiples of 128' in tpu.IMPLEMENTATIONS[0].unavailable(x[..., :8], x, x, x, None, None)


@pytest.mark.slow
@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.integers(1, 2), length=st.integers(1, 140), heads=st.integers(1, 2), dk=st.sampled_from([4, 8]),
       dv=st.sampled_from([3, 8]), start_rate=st.sampled_from([0.0, 0.05]), with_state=st.booleans(),
       bf16=st.booleans(), chunking=st.sampled_from([(64, 16), (32, 8)]), seed=st.integers(0, 2**16))
def test_tpu_interpret_forward_wide(batch, length, heads, dk, dv, start_rate, with_state, bf16, chunking, seed):
  segment_ids = random_segments(seed, batch, length, start_rate) if start_rate else None
  check_tpu_interpret(seed, batch, length, heads, dk, dv, jnp.bfloat16 if bf16 else jnp.float32, segment_ids,
                      with_state, chunking=chunking)
