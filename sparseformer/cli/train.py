"""python train.py --config configs/NAME.py[:ARG] [--config.a.b=v ...] --workdir DIR"""

import sys

from sparseformer import config as config_lib
from sparseformer.cli.args import describe_fields, parse_args
from sparseformer.cli.main import configure_jax, run_command
from sparseformer.errors import UserError

USAGE = __doc__ + """
Relaunching with the same --workdir resumes from its last checkpoint (model, optimizer,
step, data position), verified against its checksums; changed config fields are printed
and kept in config_history.jsonl. SIGTERM or Ctrl-C saves and stops (Ctrl-C twice: stop
now). One train.py per workdir (train.lock). --config.init_from=PATH starts from another
run's parameters. See docs/workdir.md.
"""


def train_command(argv):
  flags, overrides = parse_args(argv)
  if flags.get('help'):
    print(USAGE + '\nfields (defaults of the base config):\n' + describe_fields(config_lib.base_config()))
    return 0
  if 'config' not in flags or 'workdir' not in flags:
    raise UserError('train needs --config PATH[:ARG] and --workdir DIR (see --help)')
  cfg = config_lib.load_config_file(flags['config'])
  config_lib.apply_overrides(cfg, overrides)
  config_lib.validate(cfg)
  configure_jax()
  from sparseformer import distributed
  distributed.initialize()  # several processes (SLURM, Open MPI, TPU pod, explicit variables) or a no-op
  from sparseformer.training.trainer import TrainingDiverged, train
  try:
    train(cfg, flags['workdir'])
  except TrainingDiverged as e:
    print(f'error: {e}', file=sys.stderr)
    return 1
  return 0


def main(argv=None):
  sys.exit(run_command(train_command, argv))
