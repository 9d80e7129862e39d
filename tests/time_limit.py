"""A time limit for every test: past it, faulthandler (a C thread, so it fires even when a
stuck thread holds the GIL) prints every thread's stack and ends the process, and
pytest-xdist reports the test as crashed and carries on with a new worker. A hang then
costs minutes, not CI's whole limit. `@pytest.mark.time_limit(seconds)` sets one test's
limit; SPARSEFORMER_TEST_TIME_LIMIT the default."""

import faulthandler
import os

import pytest

DEFAULT_TIME_LIMIT_S = float(os.environ.get('SPARSEFORMER_TEST_TIME_LIMIT', 300))
_STDERR_COPY = pytest.StashKey[int]()


def pytest_configure(config):
  config.addinivalue_line('markers', "time_limit(seconds): this test's limit instead of the default")
  # pytest captures fd 2 while a test runs; keep a copy of the real stderr for the stacks.
  config.stash[_STDERR_COPY] = os.dup(2)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
  marker = item.get_closest_marker('time_limit')
  limit = float(marker.args[0]) if marker else DEFAULT_TIME_LIMIT_S
  faulthandler.dump_traceback_later(limit, exit=True, file=item.config.stash[_STDERR_COPY])
  try:
    return (yield)
  finally:
    faulthandler.cancel_dump_traceback_later()
