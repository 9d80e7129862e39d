"""The Triton (jax_triton) gated linear attention kernels, forward and backward, against the
jnp oracle: outputs, final state and the gradients of q, k, v, g and the initial state,
with segment resets (mid-chunk, on a chunk boundary, one-token segments), lengths not a
multiple of the chunk, bf16 and float32, Dk/Dv 64 and 128, extreme decays.

Three ways to run them:
  default suite (CPU)  the implementation is reported unavailable with its reason; the host
                       side (segment layout, shape checks) and the benchmark's --quick mode;
  `-m gpu`             the compiled kernels through jax_triton on a CUDA GPU;
  `-m slow` with TRITON_INTERPRET=1 and triton importable: the same kernels run by
                       triton's CPU interpreter over numpy (float32, small shapes), e.g.
                       TRITON_INTERPRET=1 PYTHONPATH=/path/to/triton pytest -m slow this_file
"""

import functools
import importlib
import importlib.util
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.linear_attention import gated_linear_attention, reference, triton_gpu, triton_launch
from pallas_kernels.linear_attention.api import select_implementation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Relative to the largest magnitude of the expected array. bf16: the kernel's matmuls take
# bf16 operands (scores and decayed q/k rounded to 8 mantissa bits) against a float32
# oracle on the same bf16 inputs.
TOLERANCE = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}
NAMES = ('o', 'final_state', 'dq', 'dk', 'dv', 'dg', 'd_initial_state')


def random_inputs(seed, b, t, h, dk, dv, dtype):
  keys = jax.random.split(jax.random.key(seed), 7)
  q = jax.random.normal(keys[0], (b, t, h, dk), dtype)
  k = jax.random.normal(keys[1], (b, t, h, dk), dtype)
  v = jax.random.normal(keys[2], (b, t, h, dv), dtype)
  g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (b, t, h, dk)) * 2 + 2.0).astype(dtype)
  state0 = jax.random.normal(keys[4], (b, h, dk, dv), jnp.float32)
  d_o = jax.random.normal(keys[5], (b, t, h, dv), dtype)
  d_state = jax.random.normal(keys[6], (b, h, dk, dv), jnp.float32)
  return q, k, v, g, state0, d_o, d_state


def segments_from_starts(b, t, starts):
  """[B, T] ids with a new segment at each position in starts (the same in every row)."""
  return jnp.broadcast_to(jnp.cumsum(jnp.zeros(t, jnp.int32).at[jnp.asarray(starts, jnp.int32)].set(1)), (b, t))


def values_and_grads(forward, q, k, v, g, state0, d_o, d_state):
  (o, final), pullback = jax.vjp(forward, q, k, v, g, state0)
  return [o, final, *pullback((d_o, d_state))]


def assert_matches_oracle(got, want, dtype):
  for name, x, y in zip(NAMES, got, want):
    if y is None:
      assert x is None, name
      continue
    assert x.shape == y.shape and x.dtype == y.dtype, (name, x.shape, y.shape, x.dtype, y.dtype)
    x, y = np.asarray(x, np.float32), np.asarray(y, np.float32)
    assert np.all(np.isfinite(x)), name
    np.testing.assert_allclose(x, y, rtol=0, atol=TOLERANCE[dtype] * max(1.0, float(np.abs(y).max())), err_msg=name)


def oracle(q, k, v, g, state0, segment_ids, d_o, d_state, scale):
  def forward(q, k, v, g, state0):
    return reference.chunked(q, k, v, g, scale=scale, initial_state=state0, segment_ids=segment_ids)
  return jax.jit(values_and_grads, static_argnums=0)(forward, q, k, v, g, state0, d_o, d_state)


# ----------------------------------------------------------------------------------------
# CPU: host side and availability


def test_unavailable_off_gpu_with_reason():
  q = jnp.zeros((1, 8, 1, 64))
  if jax.default_backend() == 'gpu':
    pytest.skip('the default device is a GPU')
  with pytest.raises(ValueError, match='triton runs on gpu'):
    select_implementation('triton', q, q, q, q, None, None)
  assert 'CUDA GPU' in triton_gpu.unavailable(q, q, q, q, None, None)
  assert select_implementation(None, q, q, q, q, None, None).name == 'reference'


def test_head_dims_checked():
  q, v = jnp.zeros((1, 8, 1, 48)), jnp.zeros((1, 8, 1, 64))
  assert 'Dk and Dv' in triton_gpu.unavailable(q, q, v, q, None, None)
  assert 'Dk and Dv' in triton_gpu.unavailable(v, v, q, v, None, None)


def test_import_does_not_load_triton():
  code = ('import sys; import pallas_kernels.linear_attention as la; '
          'assert "triton_gpu" in la.api.IMPLEMENTATIONS["triton"].forward.__module__; '
          'print(sorted(m for m in sys.modules if m.split(".")[0] in ("triton", "jax_triton")))')
  result = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == '[]'


def test_segment_layout():
  ids = jnp.asarray([[0] * 3 + [1] * 5 + [2] * 2, [4] * 4 + [4] * 4 + [3] * 2])  # T = 10, chunks of 4
  runs, continues = triton_gpu.segment_layout(ids, 2, 10, chunk=4)
  np.testing.assert_array_equal(runs, [[0, 0, 0, 1, 1, 1, 1, 1, 2, 2, 2, 2], [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1]])
  # 1 where the token's segment was already running when its chunk began (chunk 0: the
  # row's first segment, which reads the initial state)
  np.testing.assert_array_equal(continues, [[1, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0], [1] * 8 + [0] * 4])
  runs, continues = triton_gpu.segment_layout(None, 1, 5, chunk=4)
  np.testing.assert_array_equal(runs, [[0] * 8])
  np.testing.assert_array_equal(continues, [[1] * 8])


def test_block_sizes_and_chunk_count():
  settings = triton_launch.LaunchSettings()
  assert [settings.block('chunk_dqk_kernel', 'BK', d) for d in (16, 64, 128, 256)] == [16, 64, 64, 64]
  assert [settings.block('chunk_states_kernel', 'BV', d) for d in (16, 64, 128)] == [16, 32, 32]
  assert [triton_gpu.chunk_count(t) for t in (1, 64, 65, 32768)] == [1, 1, 2, 512]


def test_launch_settings_from_environment_syntax():
  settings = triton_launch.parse(' chunk=128 ; chunk_dqk_kernel:num_warps=8,BK=32;chunk_dqk_kernel:num_stages=2;'
                                 'chunk_states_kernel:BV=64;')
  assert (settings.chunk, settings.sub_chunk) == (128, 16)
  assert settings.kernel('chunk_dqk_kernel') == triton_launch.KernelLaunch(num_warps=8, num_stages=2, BK=32, BV=64)
  assert settings.kernel('chunk_states_kernel') == triton_launch.KernelLaunch(BK=32, BV=64)  # BK keeps its default
  assert settings.kernel('chunk_dv_kernel') == triton_launch.KernelLaunch()
  assert triton_launch.parse('') == triton_launch.LaunchSettings()
  hash(settings)  # a static argument of jitted functions
  every = triton_launch.parse('*:num_warps=8,BK=128;chunk_dqk:num_warps=4')
  assert every.kernel('chunk_dqk_kernel') == triton_launch.KernelLaunch(num_warps=4, BK=128)
  assert every.kernel('chunk_scores_kernel') == triton_launch.KernelLaunch(num_warps=8, BK=128)  # takes no BV
  assert triton_launch.LaunchSettings().block('chunk_scores_kernel', 'BK', 128) == 128  # the whole Dk by default
  assert every.kernel('chunk_states_kernel') == triton_launch.KernelLaunch(num_warps=8, BK=128, BV=32)
  unrolled = triton_launch.parse('*:unroll=1')
  assert unrolled.kernel('chunk_scores_kernel').unroll == unrolled.kernel('chunk_dqk_kernel').unroll == 1
  assert triton_launch.parse('chunk_scores:blocks=1').kernel('chunk_scores_kernel').blocks == 1
  assert unrolled.kernel('chunk_dv_kernel') == triton_launch.KernelLaunch()  # takes no unroll


@pytest.mark.parametrize('text, message', [
    ('chunk_dq:num_warps=8', "unknown kernel 'chunk_dq'"),
    ('chunk_scores_kernel:BV=32', "chunk_scores_kernel has no setting 'BV'"),
    ('*:BW=32', "has no setting 'BW'"),
    ('chunk_dv_kernel:warps=8', "has no setting 'warps'"),
    ('chunk_dv_kernel:BV=48', 'power of two'),
    ('chunk_dv_kernel:num_warps=3', 'num_warps=3'),
    ('chunk_dv_kernel:num_stages=x', 'not an integer'),
    ('chunk_dv_kernel:unroll=1', "chunk_dv_kernel has no setting 'unroll'"),
    ('chunk_scores:unroll=2', 'unroll=2 must be 0 or 1'),
    ('chunk_scores:blocks=3', 'blocks=3 must be 0 or 1'),
    ('chunk_dqk:two_walks=2', 'two_walks=2 must be 0 or 1'),
    ('chunk_scores:halves=1', 'halves=1 needs blocks=1'),
    ('chunk_dqk_kernel:blocks=1', "chunk_dqk_kernel has no setting 'blocks'"),
    ('chunk=96', 'power of two'),
    ('chunk=256', 'at most 128'),
    ('sub_chunk=8', 'power of two >= 16'),
    ('chunks=64', 'neither'),
])
def test_launch_settings_errors(text, message):
  with pytest.raises(ValueError, match=message):
    triton_launch.parse(text)


def test_launch_settings_read_from_the_environment(monkeypatch):
  monkeypatch.setenv(triton_launch.ENV, 'chunk_dv_kernel:num_warps=8')
  assert triton_launch.from_environment().kernel('chunk_dv_kernel').num_warps == 8
  monkeypatch.delenv(triton_launch.ENV)
  assert triton_launch.from_environment() == triton_launch.LaunchSettings()


def test_benchmark_quick_mode(tmp_path):
  output = tmp_path / 'linear_attention.json'
  result = subprocess.run([sys.executable, '-m', 'benchmarks.linear_attention', '--quick', '--json', str(output)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ,
                                                                                      'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'reference' in result.stdout and 'ratio' in result.stdout
  rows = __import__('json').loads(output.read_text())['rows']
  assert {row['implementation'] for row in rows} == {'reference'}
  assert {row['direction'] for row in rows} == {'fwd', 'fwd+bwd'}
  assert all(row['ms'] > 0 for row in rows)


def test_benchmark_packed_documents_and_rows_that_cannot_run(capsys):
  """--documents packs the row (segment ids for ours; cu_seqlens for FLA's chunk_gla); the
  FLA and cuDNN rows that cannot run here say why instead of stopping the run."""
  from benchmarks import linear_attention as bench
  assert bench.document_starts(10, 3) == [0, 3, 6, 10]
  np.testing.assert_array_equal(bench.segment_ids(10, 3)[0], [0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
  assert bench.segment_ids(10, 1) is None
  args = bench.parse_args(['--length', '128', '--heads', '2', '--head-dim', '16', '--documents', '3',
                           '--iterations', '1'])
  rows = {(r.implementation, r.direction): r for r in bench.run(args)}
  assert rows['reference', 'fwd+bwd'].ms > 0 and rows['reference', 'fwd'].vs_reference == 1.0
  if importlib.util.find_spec('torch') is None:
    assert 'unavailable' in rows['fla', 'fwd'].note and np.isnan(rows['fla', 'fwd'].ms)
  with pytest.raises(SystemExit):
    bench.parse_args(['--documents', '0'])


def test_benchmark_shapes_list():
  """--shapes runs several shapes in one process (FLA tunes once); a bad entry is an error."""
  from benchmarks import linear_attention as bench
  assert bench.parse_args(['--shapes', '32768:128, 8192:64:8']).shape_list == [(32768, 128, 1), (8192, 64, 8)]
  assert bench.parse_args(['--length', '128', '--head-dim', '16']).shape_list == [(128, 16, 1)]
  for bad in ('8192', '8192:64:8:2', '8192:x', '0:64', ','):
    with pytest.raises(SystemExit):
      bench.parse_args(['--shapes', bad])


@pytest.mark.slow  # 36 s on 2 cores: the sweep compiles the reference twice per shape
def test_sweep_quick_mode(tmp_path):
  output = tmp_path / 'sweep.json'
  result = subprocess.run([sys.executable, '-m', 'benchmarks.linear_attention_sweep', '--quick', '--out', str(output),
                           'chunk=128;chunk_dqk_kernel:num_warps=8'], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert result.returncode == 0, result.stderr[-2000:]
  rows = __import__('json').loads(output.read_text())['rows']
  setting, shapes = 'chunk=128;chunk_dqk_kernel:num_warps=8', ['S256_D32', 'S256_D32', 'S256_D16_x4', 'S256_D16_x4']
  passes = 2 * ['fwd', 'fwd+bwd']
  assert [(r['setting'], r['shape'], r['direction']) for r in rows] == [
      (name, shape, direction) for name in ('reference', 'default', setting) for shape, direction in zip(shapes, passes)]
  assert all(r['ms'] > 0 and r['err'] < 1e-2 and not r['note'] for r in rows), rows
  assert all(r['vs_default'] == 1 for r in rows if r['setting'] == 'default')
  assert all(r['vs_default'] > 0 for r in rows if r['setting'] == setting)


def test_sweep_reports_a_failing_setting_and_cuts_off_a_slow_one(monkeypatch):
  from benchmarks import linear_attention_sweep as sweep
  args = sweep.parse_args(['--quick'])
  shape, inputs = sweep.QUICK_SHAPES[0], None

  def failing(settings, segments):
    raise RuntimeError('no kernel for you')
  monkeypatch.setattr(sweep, 'reference_functions', failing)
  rows = sweep.measure_setting('chunk_dv_kernel:num_warps=8', shape, inputs, args, {})
  assert [(r.direction, r.note) for r in rows] == [('fwd', 'RuntimeError: no kernel for you'),
                                                   ('fwd+bwd', 'RuntimeError: no kernel for you')]
  monkeypatch.setattr(sweep, 'reference_functions', lambda settings, segments: time.sleep(5))
  args.guard = 1
  rows = sweep.measure_setting('default', shape, inputs, args, {})
  assert all(r.note == 'TimeoutError: cut off after 1 s' and np.isnan(r.ms) for r in rows)
  with pytest.raises(ValueError, match='unknown kernel'):
    sweep.parse_args(['chunk_dq:BK=32'])


# ----------------------------------------------------------------------------------------
# GPU cases: (name, B, T, H, Dk, Dv, segment starts, dtype); lengths are run-time scalars of
# the kernels, so the cases compile once per (dtype, Dk, Dv)

CASES = [
    ('resets_f32', 2, 150, 2, 64, 64, (1, 37, 64, 100, 101), jnp.float32),
    ('one_segment_bf16', 1, 200, 2, 128, 128, (), jnp.bfloat16),
    ('odd_length_resets_bf16', 1, 77, 2, 64, 128, (10, 70), jnp.bfloat16),
]


def kernel_values_and_grads(launch, q, k, v, g, state0, segment_ids, d_o, d_state, scale, settings=None):
  o, final = triton_gpu.forward_with(launch, q, k, v, g, state0, segment_ids, scale, settings)
  grads = triton_gpu.backward_with(launch, q, k, v, g, state0, segment_ids, scale, o, final, d_o, d_state, settings)
  return [o, final, *grads]


# ----------------------------------------------------------------------------------------
# GPU: the compiled kernels through the api


def triton_values_and_grads(q, k, v, g, state0, segment_ids, d_o, d_state, scale):
  def forward(q, k, v, g, state0):
    return gated_linear_attention(q, k, v, g, scale=scale, initial_state=state0, segment_ids=segment_ids,
                                  implementation='triton', return_final_state=True)
  return jax.jit(values_and_grads, static_argnums=0)(forward, q, k, v, g, state0, d_o, d_state)


@pytest.mark.gpu
@pytest.mark.parametrize('with_state', [True, False], ids=['state', 'no_state'])
@pytest.mark.parametrize('case', CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_oracle_gpu(case, with_state):
  _, b, t, h, dk, dv, starts, dtype = case
  q, k, v, g, state0, d_o, d_state = random_inputs(len(starts) + t, b, t, h, dk, dv, dtype)
  state0 = state0 if with_state else None
  segment_ids = segments_from_starts(b, t, starts) if starts else None
  got = triton_values_and_grads(q, k, v, g, state0, segment_ids, d_o, d_state, 0.3)
  want = oracle(q, k, v, g, state0, segment_ids, d_o, d_state, 0.3)
  assert_matches_oracle(got, want, dtype)


@pytest.mark.gpu
def test_extreme_decays_gpu():
  """g of -30, -1e4, -1e30 and -inf: no NaN, and the same values and gradients."""
  q, k, v, g, state0, d_o, d_state = random_inputs(3, 1, 130, 2, 64, 64, jnp.float32)
  g = g.at[0, 5].set(-30.0).at[0, 40].set(-1e4).at[0, 70].set(-1e30).at[0, 100, 0].set(-jnp.inf)
  segment_ids = segments_from_starts(1, 130, (64, 90))
  got = triton_values_and_grads(q, k, v, g, state0, segment_ids, d_o, d_state, 0.125)
  want = oracle(q, k, v, g, state0, segment_ids, d_o, d_state, 0.125)
  assert_matches_oracle(got, want, jnp.float32)


@pytest.mark.gpu
def test_triton_is_the_gpu_default():
  q = jnp.zeros((1, 8, 1, 64))
  assert select_implementation('triton', q, q, q, q, None, None).name == 'triton'
  assert select_implementation(None, q, q, q, q, None, None).name == 'triton'


# ----------------------------------------------------------------------------------------
# CPU: the same kernels in triton's interpreter (slow; needs TRITON_INTERPRET=1 and triton)


class HostArray:
  """What triton's interpreter reads of a torch tensor, over a numpy array in host memory
  (the interpreter's loads and stores then touch the array itself)."""

  def __init__(self, array=None):
    self.array = array
    self.dtype = None if array is None else 'torch.' + str(array.dtype)

  def data_ptr(self):
    return self.array.ctypes.data

  def untyped_storage(self):
    return self

  def cpu(self):
    return self

  def new_empty(self, *args, **kwargs):
    return HostArray()

  def set_(self, storage, *args):
    self.array, self.dtype = storage.array, storage.dtype
    return self

  def storage_offset(self):
    return 0

  def size(self):
    return self.array.shape

  def stride(self):
    return tuple(step // self.array.itemsize for step in self.array.strides)

  def copy_(self, other):
    return self


def whole_number_index(patch_lang_tensor):
  """The interpreter holds a scalar argument as a 1-element array, which numpy 2 refuses to
  turn into an int for `range(n)`; take its element instead."""
  def patch(tensor, scope):
    patch_lang_tensor(tensor, scope)
    scope.set_attr(tensor, '__index__', lambda self: int(self.handle.data.reshape(-1)[0]))
  return patch


def interpreter_launch(kernel_name, grid, inputs, out_shapes, **meta):
  kernels = importlib.import_module('pallas_kernels.linear_attention.triton_gpu_kernels')
  single = not isinstance(out_shapes, (tuple, list))
  outputs = [np.full(s.shape, np.nan, s.dtype) for s in ([out_shapes] if single else out_shapes)]
  arrays = [x if isinstance(x, int) else HostArray(np.ascontiguousarray(np.asarray(x))) for x in inputs]
  getattr(kernels, kernel_name)[grid](*arrays, *[HostArray(a) for a in outputs], **meta)
  results = [jnp.asarray(a) for a in outputs]
  return results[0] if single else tuple(results)


def float32_dots(launch):
  """The interpreter's dot on bf16 operands is wrong (it multiplies their bit patterns), so
  bf16 inputs are checked there with the float32-input dots (PRECISE) instead."""
  def launch_precise(kernel_name, grid, inputs, out_shapes, **meta):
    return launch(kernel_name, grid, inputs, out_shapes, **{**meta, **({'PRECISE': True} if 'PRECISE' in meta else {})})
  return launch_precise


# (..., launch settings in SPARSEFORMER_GLA_LAUNCH's syntax; blocks of 16: the loops and
# grids over Dk / Dv blocks take several steps at head dims of 32)
INTERPRETER_CASES = [
    ('resets_and_state', 1, 80, 2, 16, 16, (5, 37, 64), True, jnp.float32, ''),
    ('odd_length_dk_ne_dv', 2, 70, 1, 32, 16, (63,), False, jnp.float32, ''),
    ('bf16_inputs', 1, 77, 2, 32, 16, (10, 70), True, jnp.bfloat16, ''),
    ('blocks_of_16_chunk_32', 1, 100, 1, 32, 32, (5, 33, 64), True, jnp.float32, 'chunk=32;*:BK=16,BV=16'),
    ('chunk_128_sub_chunk_32', 1, 150, 1, 32, 16, (3, 100, 140), True, jnp.float32, 'chunk=128;sub_chunk=32'),
    ('rows_unrolled', 1, 80, 2, 16, 16, (5, 37, 64), True, jnp.float32, 'chunk_scores:unroll=1;chunk_dqk:unroll=1'),
    ('scores_in_dk_parts', 1, 90, 2, 32, 16, (5, 37, 64), True, jnp.float32, 'chunk_scores:BK=16'),
    ('scores_by_block_dk_loop', 1, 90, 2, 32, 16, (5, 37, 64), True, jnp.float32, 'chunk_scores:blocks=1,BK=16'),
    ('scores_by_block_unrolled', 2, 70, 1, 16, 16, (33,), False, jnp.float32, 'chunk_scores:blocks=1,unroll=1'),
    ('scores_by_halves', 1, 90, 2, 32, 16, (5, 37, 64), True, jnp.float32, 'chunk_scores:blocks=1,halves=1,BK=16'),
    ('scores_by_halves_sub_32', 2, 70, 1, 16, 16, (33,), False, jnp.float32, 'sub_chunk=32;chunk_scores:blocks=1,halves=1'),
    ('grads_in_two_walks', 1, 90, 2, 32, 16, (5, 37, 64), True, jnp.float32, 'chunk_dqk:two_walks=1,BK=16'),
    ('grads_in_two_walks_unrolled', 2, 70, 1, 16, 32, (33,), False, jnp.float32, 'chunk_dqk:two_walks=1,unroll=1'),
]


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') != '1', reason='needs TRITON_INTERPRET=1 (and triton)')
@pytest.mark.parametrize('case', INTERPRETER_CASES, ids=[c[0] for c in INTERPRETER_CASES])
def test_kernels_in_triton_interpreter(case, monkeypatch):
  interpreter = pytest.importorskip('triton.runtime.interpreter')
  monkeypatch.setattr(interpreter, '_patch_lang_tensor', whole_number_index(interpreter._patch_lang_tensor))
  _, b, t, h, dk, dv, starts, with_state, dtype, settings = case
  q, k, v, g, state0, d_o, d_state = random_inputs(t, b, t, h, dk, dv, dtype)
  g = g.at[0, 20].set(-1e4).at[0, 30, 0].set(-1e30)
  state0 = state0 if with_state else None
  segment_ids = segments_from_starts(b, t, starts)
  got = kernel_values_and_grads(float32_dots(interpreter_launch), q, k, v, g, state0, segment_ids, d_o, d_state,
                                0.3, triton_launch.parse(settings))
  want = oracle(q, k, v, g, state0, segment_ids, d_o, d_state, 0.3)
  assert_matches_oracle(got, want, dtype)


# ----------------------------------------------------------------------------------------
# CPU: every kernel launch compiled for sm90 (Hopper) without a GPU, as jax_triton compiles
# it (slow; needs triton, whose bundled ptxas runs on the host; triton 3.6's compiler API)

TRITON_TYPES = {'float32': '*fp32', 'bfloat16': '*bf16', 'int32': '*i32'}


def compile_launch(compiled, kernel_name, grid, inputs, out_shapes, num_warps, num_stages, **meta):
  """Compiles the launch to a cubin as jax_triton would (16-byte aligned arrays, 32-bit
  scalars, a scalar equal to 1 specialised to a constant), appends (kernel name, cubin) to
  `compiled` and returns zero outputs."""
  import triton
  from triton.backends.compiler import GPUTarget
  from triton.compiler.compiler import ASTSource
  kernel = getattr(importlib.import_module('pallas_kernels.linear_attention.triton_gpu_kernels'), kernel_name)
  outputs = [out_shapes] if not isinstance(out_shapes, (tuple, list)) else list(out_shapes)
  arguments = list(inputs) + outputs
  signature, constants, attrs = {}, dict(meta), {}
  for index, argument in enumerate(arguments):
    name = kernel.arg_names[index]
    if isinstance(argument, int):
      signature[name] = 'constexpr' if argument == 1 else 'i32'
      if argument == 1:
        constants[name] = 1
    else:
      signature[name] = TRITON_TYPES[str(argument.dtype)]
      attrs[(index,)] = [['tt.divisibility', 16]]
  signature.update({name: 'constexpr' for name in meta})
  binary = triton.compile(ASTSource(kernel, signature, constexprs=constants, attrs=attrs),
                          target=GPUTarget('cuda', 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))
  compiled.append((kernel_name, binary.asm['cubin']))
  zeros = [jnp.zeros(o.shape, o.dtype) for o in outputs]
  return zeros[0] if len(outputs) == 1 and not isinstance(out_shapes, (tuple, list)) else tuple(zeros)


def resource_usage(cubin, tmp_path):
  """(registers, stack bytes) per thread of a cubin's kernel, from triton's bundled cuobjdump
  (a stack > 0 here means register spills)."""
  import triton
  path = tmp_path / 'kernel.cubin'
  path.write_bytes(cubin)
  tool = os.path.join(os.path.dirname(triton.__file__), 'backends', 'nvidia', 'bin', 'cuobjdump')
  text = subprocess.run([tool, '--dump-resource-usage', str(path)], capture_output=True, text=True, check=True).stdout
  usage = dict(re.findall(r'(REG|STACK):(\d+)', text))
  return int(usage['REG']), int(usage['STACK'])


def compile_forward_and_backward(dtype, t, dk, dv, settings=None):
  compiled = []
  launch = functools.partial(compile_launch, compiled)
  q, v = jnp.zeros((1, t, 2, dk), dtype), jnp.zeros((1, t, 2, dv), dtype)
  o, final = triton_gpu.forward_with(launch, q, q, v, q, jnp.zeros((1, 2, dk, dv)), None, 0.1, settings)
  triton_gpu.backward_with(launch, q, q, v, q, None, None, 0.1, o, final, o, final, settings)
  return compiled


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get('TRITON_INTERPRET') == '1', reason='kernels are interpreted, not compiled')
@pytest.mark.parametrize('dtype, t, dk, dv', [(jnp.float32, 77, 64, 64), (jnp.bfloat16, 40, 128, 128),
                                              (jnp.bfloat16, 70, 64, 64)],
                         ids=['f32_two_chunks', 'bf16_one_chunk', 'bf16_d64'])
def test_kernels_compile_for_hopper(dtype, t, dk, dv, tmp_path):
  """Every launch compiles; in bf16 (the fast path) at the default settings no kernel spills
  registers (issue 25: chunk_dqk spilled ~1 KB per thread at D=128)."""
  pytest.importorskip('triton')
  compiled = compile_forward_and_backward(dtype, t, dk, dv)
  recompute = ['decayed_qk_kernel', 'chunk_states_kernel', 'chunk_scores_kernel']
  assert [name for name, _ in compiled] == recompute + ['chunk_output_kernel'] + recompute + [
      'state_grads_kernel', 'chunk_dscores_kernel', 'chunk_dqk_kernel', 'chunk_dv_kernel', 'log_decay_grads_kernel']
  assert all(len(cubin) > 0 for _, cubin in compiled)
  if dtype == jnp.bfloat16:
    stacks = {name: resource_usage(cubin, tmp_path)[1] for name, cubin in compiled}
    assert not any(stacks.values()), stacks
