"""Runs each test file that uses Pallas or Triton interpret mode as two copies side by side,
several times, and counts hangs: interpret mode used to deadlock when the machine was busy.

    .venv/bin/python scripts/interpret_stress.py                      # 10 pairs of every such file
    .venv/bin/python scripts/interpret_stress.py --pairs 3 tests/test_block_sparse_tpu.py

A copy still running after --timeout seconds is killed and counted as a hang. Prints one
line per pair and a table per file (runs, hangs, failures, min / median / max seconds);
exits 1 if any copy hung or failed."""

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, 'tests')


def files_using_interpret_mode():
  names = sorted(n for n in os.listdir(TESTS) if n.startswith('test_') and n.endswith('.py'))
  return [os.path.join('tests', n) for n in names if 'interpret' in open(os.path.join(TESTS, n)).read()]


def start_copy(test_file, extra_args, log_path):
  command = [sys.executable, '-m', 'pytest', '-q', '-p', 'no:xdist', test_file, *extra_args]
  log = open(log_path, 'w')
  return subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True), log


def wait_for(process, started, timeout):
  """('passed' | 'failed' | 'hung', seconds)."""
  try:
    process.wait(timeout=max(0.0, started + timeout - time.monotonic()))
  except subprocess.TimeoutExpired:
    os.killpg(process.pid, 9)
    process.wait()
    return 'hung', time.monotonic() - started
  return ('passed' if process.returncode == 0 else 'failed'), time.monotonic() - started


def run_pair(test_file, extra_args, timeout, log_dir, pair):
  stem = os.path.basename(test_file)[:-3]
  started = time.monotonic()
  copies = [start_copy(test_file, extra_args, os.path.join(log_dir, f'{stem}.{pair}.{i}.log')) for i in (0, 1)]
  results = []
  for process, log in copies:
    results.append(wait_for(process, started, timeout))
    log.close()
  return results


def summary_row(test_file, results):
  times = [seconds for _, seconds in results]
  counts = {kind: sum(1 for outcome, _ in results if outcome == kind) for kind in ('hung', 'failed')}
  return (f'| {test_file} | {len(results)} | {counts["hung"]} | {counts["failed"]} | '
          f'{min(times):.1f} / {statistics.median(times):.1f} / {max(times):.1f} |')


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('files', nargs='*', help='test files (default: every tests/test_*.py that mentions interpret)')
  parser.add_argument('--pairs', type=int, default=10)
  parser.add_argument('--timeout', type=float, default=300.0, help='seconds before a copy counts as hung')
  parser.add_argument('--log-dir', default='/tmp/interpret_stress')
  parser.add_argument('--pytest-args', default='', help='extra pytest arguments, e.g. "-k interpret"')
  args = parser.parse_args()
  os.makedirs(args.log_dir, exist_ok=True)
  files = args.files or files_using_interpret_mode()
  rows, bad = [], 0
  for test_file in files:
    results = []
    for pair in range(args.pairs):
      outcome = run_pair(test_file, args.pytest_args.split(), args.timeout, args.log_dir, pair)
      results += outcome
      print(f'{test_file} pair {pair + 1}: ' + ', '.join(f'{kind} {seconds:.1f}s' for kind, seconds in outcome),
            flush=True)
    bad += sum(1 for kind, _ in results if kind != 'passed')
    rows.append(summary_row(test_file, results))
  print('\n| file | runs | hangs | failures | seconds min / median / max |\n| --- | --- | --- | --- | --- |')
  print('\n'.join(rows))
  print(f'logs in {args.log_dir}')
  return 1 if bad else 0


if __name__ == '__main__':
  sys.exit(main())
