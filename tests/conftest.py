import os
import shutil
import sys
import tempfile

# Pallas interpret mode runs each GPU warpgroup (or TPU core) as a compiled computation on
# its own Python thread, and its barriers are host callbacks that block until the other
# threads arrive. XLA's CPU runtime hands ready work of any computation to one shared
# intra-op pool, which has one thread per core by default: on a 2-core machine the outer
# kernel callback and one blocked barrier callback fill it, the warpgroup that would
# release the barrier waits for a pool thread forever, and the test hangs (seen with
# py-spy: 2 of 12 runs of test_interpret_through_the_api hung with two copies side by side).
# PJRT_NPROC sizes that pool; it must be set before the CPU backend starts. Our kernels run
# at most 4 interpret threads at once, so 16 leaves room.
os.environ['PJRT_NPROC'] = str(max(16, os.cpu_count() or 1, int(os.environ.get('PJRT_NPROC') or 0)))

# One persistent compilation cache per test session: most tests compile the same small models
# and steps again (in both xdist workers, in child Pythons and in new jit wrappers of the same
# function), and a hit skips XLA's compile. The process that starts the session (the xdist
# controller, or plain pytest) makes the directory before any worker starts; workers and child
# processes inherit it through the environment, so they reuse each other's compiles but never
# an earlier session's or the user's (~/.cache/sparseformer/jax). A JAX_COMPILATION_CACHE_DIR
# set outside is overridden: the tests stay hermetic. Set before jax is imported, as jax reads
# these variables then.
_OWN_CACHE = 'SPARSEFORMER_TEST_COMPILATION_CACHE' not in os.environ  # not set: this process starts the session
if _OWN_CACHE:
  os.environ['SPARSEFORMER_TEST_COMPILATION_CACHE'] = tempfile.mkdtemp(prefix='sparseformer-test-jax-cache-')
_CACHE_DIR = os.environ['SPARSEFORMER_TEST_COMPILATION_CACHE']
os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE_DIR
os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'  # the tiny compiles are the ones repeated
os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '-1'
# train.py / eval.py in this process (run_in_process) call cli.main.configure_jax, which would
# point this process's cache at ~/.cache/sparseformer/jax; children get it from child_env too.
os.environ['SPARSEFORMER_COMPILATION_CACHE'] = _CACHE_DIR

import jax  # noqa: E402  (after PJRT_NPROC and the cache variables)
import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Without async dispatch the outer kernel call runs on its caller's thread instead of
# holding a pool thread as well.
jax.config.update('jax_cpu_enable_async_dispatch', False)
# The same as the variables above, for a jax imported before this file (another plugin).
jax.config.update('jax_compilation_cache_dir', _CACHE_DIR)
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)

pytest_plugins = ['time_limit']


@pytest.fixture(autouse=True)
def _cache_every_compile():
  """configure_jax (train.py / eval.py run in this process) raises the minimum compile time
  of a cached entry to 1 s; put it back for the tests that follow."""
  yield
  if jax.config.jax_persistent_cache_min_compile_time_secs != 0:
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """The shipped tinyshakespeare dataset, prepared once per test session."""
  from sparseformer import data
  directory = tmp_path_factory.mktemp('tensorflow_datasets')
  cfg = data.default_data_config()
  cfg.data_dir = str(directory)
  data.ensure_prepared(cfg)
  return directory
