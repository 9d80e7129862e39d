"""Runs a command and turns bad input into one line and exit code 2 (Ctrl-C: one line, 130)."""

import sys

from sparseformer.errors import UserError


def run_command(command, argv=None):
  argv = sys.argv[1:] if argv is None else argv
  quiet_libraries()
  try:
    return command(argv) or 0
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('error: interrupted (Ctrl-C); finished checkpoints are kept', file=sys.stderr)
    return 130


def quiet_libraries():
  """Orbax and TFDS log through absl at INFO/WARNING for routine events; keep errors."""
  from absl import logging
  logging.set_verbosity(logging.ERROR)


def configure_jax():
  """Compilation cache shared by runs on this machine (first runs compile, later ones reuse)."""
  import os
  import jax
  cache = os.environ.get('SPARSEFORMER_COMPILATION_CACHE', os.path.expanduser('~/.cache/sparseformer/jax'))
  if cache != 'off':
    jax.config.update('jax_compilation_cache_dir', cache)
    jax.config.update('jax_persistent_cache_min_compile_time_secs', 1.0)
