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


def state_bytes_of_the_tiny_model():
  """Parameters and two Adam moments in float32 (from shapes alone, nothing compiled)."""
  from sparseformer import config as config_lib, data, sharding
  from sparseformer.cli.args import parse_args
  from sparseformer.model import resolve_dims
  from sparseformer.training.state import model_spec
  import jax
  _, overrides = parse_args(TINY[2:])
  cfg = config_lib.load_config_file(TINY[1])
  config_lib.apply_overrides(cfg, overrides)
  dims = resolve_dims(cfg.model, data.make_tokenizer(cfg.data.tokenizer).vocab_size)
  spec = model_spec(dims, sharding.make_mesh(cfg.mesh, jax.devices()[:1]), cfg.mesh.rules)
  return 3 * 4 * spec.param_count


def test_sharding_the_state_divides_its_memory_per_device():
  result = fit('--devices', '4', '--config.mesh.data=1', '--config.mesh.fsdp=4')
  assert result.returncode == 0, result.stderr[-3000:]
  assert "mesh {'data': 1, 'fsdp': 4, 'tensor': 1, 'sequence': 1} (4 cpu devices)" in result.stdout
  sizes = printed_bytes(result.stdout)
  assert set(sizes) == {'arguments', 'outputs', 'aliased', 'temporaries', 'generated code', 'total'}, result.stdout
  # Each device holds a quarter of the state (donated, so the new state aliases it) and of the batch.
  batch_bytes = 5 * 8 * 256 * 4
  expected = (state_bytes_of_the_tiny_model() + batch_bytes) / 4
  assert abs(sizes['arguments'] - expected) < 0.01 * expected, (sizes, expected)
  assert sizes['aliased'] > 0.9 * sizes['outputs']
  assert sizes['total'] == (sizes['arguments'] + sizes['outputs'] - sizes['aliased'] + sizes['temporaries']
                            + sizes['generated code'])


def test_bad_requests_are_one_line_errors():
  for argv, fragment in ((['--devices', '3', '--config.mesh.tensor=2'], 'cannot be split'),
                         (['--platform', 'ipu'], 'use one of cpu, gpu, tpu'),
                         (['--measure', '1'], 'memory statistics'),
                         (['--devices', '1', '--measure', '1'], 'leave out --devices')):
    result = fit(*argv)
    assert result.returncode == 2 and result.stderr.strip().startswith('error: '), result.stderr[-2000:]
    assert fragment in result.stderr, result.stderr
