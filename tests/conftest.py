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

# The tests' arrays are tiny: XLA's CPU backend spends far longer optimising the machine code
# (LLVM) than running it. Without LLVM's expensive passes the suite takes about a quarter
# less time, and the computations are the same (the HLO passes and the float semantics do
# not change). (--xla_backend_optimization_level=0 saves twice that, but there a dense
# oracle's gradients came out inf where the default build gives finite ones.) Set in the
# environment, so every xdist worker and child process inherits it (children that set
# their own device count keep it: sparseformer.distributed.host_device_flags).
TEST_XLA_FLAGS = ('--xla_llvm_disable_expensive_passes=true',)
os.environ['XLA_FLAGS'] = ' '.join([os.environ.get('XLA_FLAGS', '')] + [
    flag for flag in TEST_XLA_FLAGS if flag.split('=')[0] not in os.environ.get('XLA_FLAGS', '')]).strip()

import jax  # noqa: E402  (after PJRT_NPROC)
import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Without async dispatch the outer kernel call runs on its caller's thread instead of
# holding a pool thread as well.
jax.config.update('jax_cpu_enable_async_dispatch', False)

pytest_plugins = ['time_limit']

# Child processes (train.py, benchmark scripts) share a compilation cache made for this run:
# the tiny runs compile the same steps again and again. Set here, in the process that starts
# the xdist workers, so that every worker and child inherits it.
_OWN_CACHE = 'SPARSEFORMER_TEST_COMPILATION_CACHE' not in os.environ
if _OWN_CACHE:
  os.environ['SPARSEFORMER_TEST_COMPILATION_CACHE'] = tempfile.mkdtemp(prefix='sparseformer-test-jax-cache-')
# Runs made in a test's own process (train.py's main, called in-process) would otherwise use
# the user's cache (~/.cache/sparseformer/jax) and reuse compiles of earlier test runs.
os.environ['SPARSEFORMER_COMPILATION_CACHE'] = os.environ['SPARSEFORMER_TEST_COMPILATION_CACHE']


def pytest_unconfigure(config):
  if _OWN_CACHE:
    shutil.rmtree(os.environ['SPARSEFORMER_TEST_COMPILATION_CACHE'], ignore_errors=True)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """The shipped tinyshakespeare dataset, prepared once per test session."""
  from sparseformer import data
  directory = tmp_path_factory.mktemp('tensorflow_datasets')
  cfg = data.default_data_config()
  cfg.data_dir = str(directory)
  data.ensure_prepared(cfg)
  return directory
