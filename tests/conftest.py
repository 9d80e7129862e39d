import os
import sys

import jax
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# Pallas interpret mode runs each GPU warpgroup (or TPU core) as a jitted computation on its
# own Python thread, and their barriers are host callbacks that block. Those callbacks run
# on XLA's CPU thread pool, which has one thread per core: on a 2-core machine two blocked
# callbacks can hold the whole pool while the warpgroup that would release them waits for
# a thread, and the test hangs (seen in CI: test_interpret_through_the_api, 2 of 3 runs side
# by side). Without async dispatch the outer kernel call runs on its caller's thread
# instead of holding a pool thread too: that test then passed 7 of 7 runs, and the default
# suite passed twice on 2 cores. It makes the hang rarer, not impossible: a kernel with more
# interpret threads than cores can still starve the pool (a slow 128-key-block backward case
# hung on 2 cores). It must be set before the backend starts.
jax.config.update('jax_cpu_enable_async_dispatch', False)


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """The shipped tinyshakespeare dataset, prepared once per test session."""
  from sparseformer import data
  directory = tmp_path_factory.mktemp('tensorflow_datasets')
  cfg = data.default_data_config()
  cfg.data_dir = str(directory)
  data.ensure_prepared(cfg)
  return directory
