"""The per-test time limit (tests/time_limit.py): a test stuck past its limit fails within
seconds of it, with the stack of every thread, and the rest of the run goes on."""

import os
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))

STUCK = textwrap.dedent('''
    import threading
    import pytest

    def wait_forever():
      threading.Event().wait()

    @pytest.mark.time_limit(3)
    def test_stuck():
      helper = threading.Thread(target=wait_forever, name='helper', daemon=True)
      helper.start()
      helper.join()

    def test_fine():
      pass
''')


def test_a_stuck_test_fails_with_every_threads_stack_and_the_run_goes_on(tmp_path):
  (tmp_path / 'test_stuck.py').write_text(STUCK)
  result = subprocess.run(
      [sys.executable, '-m', 'pytest', '-q', '-p', 'time_limit', '-n', '2', '--dist', 'worksteal', '-o', 'addopts=',
       str(tmp_path / 'test_stuck.py')],
      cwd=tmp_path, env={**os.environ, 'PYTHONPATH': TESTS}, capture_output=True, text=True, timeout=60)
  output = result.stdout + result.stderr
  assert result.returncode == 1, output
  assert 'Timeout (0:00:03)!' in output
  assert 'in wait_forever' in output and 'in test_stuck' in output  # both threads' stacks
  assert "crashed while running 'test_stuck.py::test_stuck'" in output
  assert '1 failed, 1 passed' in output
