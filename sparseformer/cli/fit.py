"""python -m sparseformer.cli.fit --config configs/NAME.py[:ARG] [--config.a.b=v ...] [--devices N] [--platform P]

Will it fit? Compiles the train step ahead of time for the config's mesh and prints the
memory each device needs (XLA's buffer assignment: arguments, outputs, temporaries,
generated code), before anyone rents a pod. No data is read and no array is allocated.

  --devices N     simulate N devices on this machine's CPU (--xla_force_host_platform_device_count);
                  default: the devices jax sees
  --platform P    the platform the model is sized for: gpu | tpu | cpu (compute dtype and
                  attention kernels as there; default: this machine's)
  --measure S     then run S train steps on synthetic batches on this machine's devices
                  and print the measured peak memory (GPU/TPU), beside the estimate

Example (a 125M model at 32k tokens on an 8-device mesh, sized for GPUs):
  python -m sparseformer.cli.fit --config configs/default.py --devices 8 --platform gpu \\
      --config.model.d_model=768 --config.model.num_layers=12 --config.model.num_heads=12 \\
      --config.data.seq_len=32768 --config.train.global_batch_size=8 --config.mesh.fsdp=8 \\
      --config.mesh.data=1 --config.model.remat=full

The estimate is XLA's for the CPU compilation of the same program: kernels run as their
reference implementations there, so GPU/TPU temporaries differ (docs/scaling.md compares
an estimate with the measured peak of a GPU run).
"""

import os
import sys

from sparseformer import config as config_lib
from sparseformer.cli.args import describe_fields, parse_args
from sparseformer.cli.main import run_command
from sparseformer.distributed import host_device_flags
from sparseformer.errors import UserError

PLATFORMS = ('cpu', 'gpu', 'tpu')
# Found in training/assembly.py (imported on first use: --devices must be set before JAX starts).
ASSEMBLY_NAMES = ('TrainStepParts', 'abstract_batch', 'build_train_step', 'compile_train_step', 'synthetic_batch')


def __getattr__(name):
  if name in ASSEMBLY_NAMES:
    from sparseformer.training import assembly
    return getattr(assembly, name)
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def memory_per_device(compiled):
  """{name: bytes} of one device's share, from XLA's buffer assignment. Donated state
  outputs reuse their arguments' buffers (aliases), so they are counted once."""
  analysis = compiled.memory_analysis()
  sizes = {
      'arguments': analysis.argument_size_in_bytes,
      'outputs': analysis.output_size_in_bytes,
      'aliased': analysis.alias_size_in_bytes,
      'temporaries': analysis.temp_size_in_bytes,
      'generated code': analysis.generated_code_size_in_bytes,
  }
  sizes['total'] = (sizes['arguments'] + sizes['outputs'] - sizes['aliased'] + sizes['temporaries']
                    + sizes['generated code'])
  return sizes


def format_memory(sizes):
  return '\n'.join(f'  {name:<15} {size / 2**30:10.3f} GiB  ({size} bytes)' for name, size in sizes.items())


def require_memory_statistics():
  import jax
  stats = jax.local_devices()[0].memory_stats()
  if not stats or 'peak_bytes_in_use' not in stats:
    raise UserError(f'--measure needs devices that report memory statistics (GPU/TPU), not {jax.default_backend()}')


def measure_peak(parts, compiled, steps, vocab_size, seed=0):
  """(peak bytes in use on the busiest device, last loss) after `steps` real train steps."""
  import jax
  from sparseformer.training.assembly import synthetic_batch
  state = parts.fresh_state(seed)
  batch = synthetic_batch(parts, vocab_size, seed)
  for _ in range(steps):
    state, metrics = compiled(state, batch)
  loss = float(jax.device_get(metrics['loss']))
  return max(device.memory_stats()['peak_bytes_in_use'] for device in jax.local_devices()), loss


def simulate_devices(count):
  """Make jax see `count` CPU devices; must run before jax initialises its backends."""
  os.environ['XLA_FLAGS'] = host_device_flags(count, os.environ.get('XLA_FLAGS', ''))
  os.environ['JAX_PLATFORMS'] = 'cpu'


def sized_for(cfg, platform):
  """The config as it would run on `platform`: packed rows of dense layers go through the
  block-sparse kernels on GPU/TPU (dense_backend auto), not a T x T mask."""
  if platform in ('gpu', 'tpu') and cfg.model.attention.dense_backend == 'auto':
    cfg.model.attention.dense_backend = 'block_sparse'
  return cfg


def fit_command(argv):
  flags, overrides = parse_args(argv, allowed=('config', 'devices', 'platform', 'measure'))
  if flags.get('help'):
    print(__doc__ + '\nfields (defaults of the base config):\n' + describe_fields(config_lib.base_config()))
    return 0
  if 'config' not in flags:
    raise UserError('fit needs --config PATH[:ARG] (see --help)')
  platform = flags.get('platform')
  if platform is not None and platform not in PLATFORMS:
    raise UserError(f'--platform={platform}: use one of {", ".join(PLATFORMS)}')
  for name in ('devices', 'measure'):
    if name in flags and (not flags[name].isdigit() or int(flags[name]) < 1):
      raise UserError(f'--{name}={flags[name]}: use a positive number')
  if 'devices' in flags and 'measure' in flags:
    raise UserError('--measure runs on the real devices: leave out --devices')
  if 'devices' in flags:
    simulate_devices(int(flags['devices']))
  if 'measure' in flags:
    require_memory_statistics()
  cfg = config_lib.load_config_file(flags['config'])
  config_lib.apply_overrides(cfg, overrides)
  config_lib.validate(cfg)
  sized_for(cfg, platform)
  from sparseformer import sharding
  from sparseformer.training.assembly import build_train_step, compile_train_step
  mesh = sharding.make_mesh(cfg.mesh)
  parts = build_train_step(cfg, mesh, platform)
  parts.spec.shardings(parts.spec.abstract_params)  # every parameter splits evenly, or a UserError
  compiled = compile_train_step(parts, cfg.seed)
  sizes = memory_per_device(compiled)
  print(f'model: {parts.spec.param_count / 1e6:.1f}M parameters, {parts.spec.dims.dtype} compute, '
        f'batch {parts.batch_rows} x {parts.seq_len} tokens, mesh {dict(mesh.shape)} '
        f'({mesh.devices.size} {mesh.devices.flat[0].platform} devices), sized for {platform or "this platform"}')
  print('train step memory per device (estimate):\n' + format_memory(sizes))
  if 'measure' in flags:
    from sparseformer import data
    vocab_size = data.make_tokenizer(cfg.data.tokenizer).vocab_size
    peak, loss = measure_peak(parts, compiled, int(flags['measure']), vocab_size, cfg.seed)
    print(f'measured peak after {flags["measure"]} steps (loss {loss:.3f}): {peak / 2**30:.3f} GiB per device '
          f'({peak / sizes["total"]:.2f} x the estimate)')
  return 0


def main(argv=None):
  sys.exit(run_command(fit_command, argv))


if __name__ == '__main__':
  main()
