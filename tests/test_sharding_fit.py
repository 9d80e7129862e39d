"""The ahead-of-time memory command: per-device figures that follow the mesh."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ['--config', os.path.join(ROOT, 'configs', 'default.py'), '--config.model.d_model=64',
        '--config.model.num_layers=2', '--config.data.seq_len=256', '--config.train.global_batch_size=8',
        "--config.model.layer_attention=('window:64', 'dense')", '--config.model.attention.block_size=64']


def fit(*argv):
  env = {**os.environ, 'PYTHONPATH': ROOT}
  return subprocess.run([sys.executable, '-m', 'sparseformer.cli.fit', *TINY, *argv], capture_output=True,
                        text=True, cwd=ROOT, env=env)


def printed_bytes(output):
  return {name: int(size) for name, size in re.findall(r'^  (\w[\w ]*?)\s+[\d.]+ GiB  \((\d+) bytes\)$', output, re.M)}


def test_sharding_the_state_divides_its_memory_per_device():
  replicated = fit('--devices', '4', '--config.mesh.data=4')
  sharded = fit('--devices', '4', '--config.mesh.data=1', '--config.mesh.fsdp=4')
  assert replicated.returncode == 0 and sharded.returncode == 0, replicated.stderr + sharded.stderr
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1, 'sequence': 1} (4 cpu devices)" in sharded.stdout
  replicated_sizes, sharded_sizes = printed_bytes(replicated.stdout), printed_bytes(sharded.stdout)
  assert set(sharded_sizes) == {'arguments', 'outputs', 'aliased', 'temporaries', 'generated code', 'total'}
  # The state (parameters and Adam moments, donated) is split four ways under fsdp.
  assert 3.5 < replicated_sizes['arguments'] / sharded_sizes['arguments'] < 4.5, (replicated_sizes, sharded_sizes)
  assert sharded_sizes['total'] >= sharded_sizes['arguments'] + sharded_sizes['temporaries']


def test_bad_requests_are_one_line_errors():
  for argv, fragment in ((['--devices', '3', '--config.mesh.tensor=2'], 'cannot be split'),
                         (['--platform', 'ipu'], 'use one of cpu, gpu, tpu'),
                         (['--devices', '1', '--measure', '1'], 'memory statistics')):
    result = fit(*argv)
    assert result.returncode == 2 and result.stderr.strip().startswith('error: '), result.stderr[-2000:]
    assert fragment in result.stderr, result.stderr
