"""python eval.py --workdir DIR [--config.eval.split=S] [--config.eval.seq_len=N] [--config.eval.step=K]

Evaluates a checkpoint of a run (the latest unless eval.step is set) and writes
DIR/eval/<split>_step<K>_len<N>.{json,png}.
"""

import os
import sys

from sparseformer import config as config_lib
from sparseformer import data, distributed, sharding
from sparseformer.cli.args import parse_args
from sparseformer.cli.main import configure_jax, run_command
from sparseformer.errors import UserError
from sparseformer.evaluation.evaluate import evaluate, format_summary, make_eval_batch_fn, write_results
from sparseformer.training.checkpoint import Checkpointer
from sparseformer.training.setup import prepare_run, process_info
from sparseformer.training.state import abstract_model_arrays
from sparseformer.training.trainer import finished_steps


def load_run_config(workdir):
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise UserError(f'{workdir} holds no config.json: is it the workdir of a training run?')
  with open(path) as f:
    return config_lib.from_json(f.read(), path)


def workdir_config(argv, doc, command):
  """The workdir and its run's config with the --config.* overrides of `argv`
  (`--workdir DIR [--config.a.b=v ...]`), or None after printing `doc` for --help."""
  loaded = workdir_config_and_flags(argv, doc, command)
  return None if loaded is None else loaded[:2]


def workdir_config_and_flags(argv, doc, command, extra=()):
  """workdir_config for a command with its own flags `extra`: (workdir, cfg, {flag: value})."""
  flags, overrides = parse_args(argv, allowed=('workdir',) + tuple(extra))
  if flags.get('help'):
    print(doc)
    return None
  if 'workdir' not in flags:
    raise UserError(f'{command} needs --workdir DIR (see --help)')
  workdir = flags['workdir']
  cfg = load_run_config(workdir)
  config_lib.apply_overrides(cfg, overrides)
  return workdir, cfg, flags


def restore_checkpoint(workdir, cfg, setup):
  """(step, model arrays) of the run's checkpoint at eval.step, or its latest."""
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  steps = finished_steps(checkpoint_dir)
  if not steps:
    raise UserError(f'no finished checkpoint in {checkpoint_dir}')
  step = cfg.eval.step or steps[-1]
  if step not in steps:
    raise UserError(f'no checkpoint for step {step}; available: {steps}')
  checkpointer = Checkpointer(checkpoint_dir, keep=cfg.checkpoint.keep, async_save=False, read_only=True)
  return step, checkpointer.restore_model(step, abstract_model_arrays(setup.spec))


def start_devices():
  configure_jax()
  distributed.initialize()  # as train.py: several processes or a no-op


def eval_command(argv):
  loaded = workdir_config(argv, __doc__, 'eval')
  if loaded is None:
    return 0
  workdir, cfg = loaded
  split, seq_len, batch_size = config_lib.eval_settings(cfg)
  start_devices()
  setup = prepare_run(cfg, seq_lens=[(seq_len, batch_size, 1)])
  step, model = restore_checkpoint(workdir, cfg, setup)
  process_index, process_count = process_info()
  batches = data.eval_batches(cfg.data, split=split, seq_len=seq_len, batch_size=batch_size // process_count,
                              process_index=process_index, process_count=process_count,
                              max_batches=cfg.eval.max_batches)
  eval_fn = sharding.with_activation_placement(make_eval_batch_fn(setup.spec.graphdef, seq_len, cfg.train.loss_chunk),
                                              setup.spec.mesh, setup.spec.rules)
  results = evaluate(eval_fn, model, batches,
                     setup.tokenizer.token_bytes, setup.batch_sharding)
  results.update(split=split, seq_len=seq_len, step=step, dataset=cfg.data.name)
  print(f'step {step} ' + format_summary(split, results))
  for bucket in results['position_buckets']:
    if bucket['nll'] is not None:
      print(f'  positions [{bucket["start"]:>6}, {bucket["end"]:>6}): nll {bucket["nll"]:.4f} ({bucket["tokens"]} tokens)')
  if distributed.is_main_process():
    paths = write_results(results, os.path.join(workdir, 'eval'), f'{split}_step{step}_len{seq_len}')
    print('wrote ' + ' and '.join(paths))
  return 0


def main(argv=None):
  sys.exit(run_command(eval_command, argv))
