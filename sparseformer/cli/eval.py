"""python eval.py --workdir DIR [--config.data.name=D] [--config.eval.split=S] [--config.eval.seq_len=N]
    [--config.eval.step=K] [--config.FIELD=VALUE ...]

Evaluates a checkpoint of a run (the newest unless eval.step is set) on a split of a
dataset (the run's data.name and data.eval_split unless data.name or eval.split is set)
and writes DIR/eval/<dataset>_<split>_step<K>_len<N>.{json,png}, the dataset's name with
'/' and ':' written as '-'. A file of that name that holds an evaluation with other
settings is kept: this one is then written as <name>-2 (-3, ...); the same evaluation run
again replaces its file. A damaged checkpoint (checksums that do not match, files that do
not read back) is an error naming the step and the file; with
--config.checkpoint.fallback_to_readable=true the newest readable step is evaluated instead.
"""

import json
import os
import sys

from sparseformer import config as config_lib
from sparseformer import data, distributed, sharding
from sparseformer.cli.args import parse_args
from sparseformer.cli.main import configure_jax, run_command
from sparseformer.data.build import check_split
from sparseformer.errors import UserError
from sparseformer.evaluation.evaluate import (evaluate, format_summary, make_eval_batch_fn, result_name,
                                              unused_result_name, write_results)
from sparseformer.training.checkpoint import Checkpointer, newest_readable
from sparseformer.training.checksums import model_digest
from sparseformer.training.setup import prepare_run, process_info
from sparseformer.training.state import abstract_model_arrays
from sparseformer.training.trainer import finished_steps


def load_run_config(workdir):
  path = os.path.join(workdir, 'config.json')
  if not os.path.isfile(path):
    raise UserError(f'{workdir} holds no config.json: is it the workdir of a training run?')
  try:
    with open(path) as f:
      return config_lib.from_json(f.read(), path)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f'{path} is unreadable ({type(e).__name__}: {e}); config_history.jsonl beside it holds '
                    'the config of every launch') from None


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


def restore_checkpoint(workdir, cfg, setup, log=print):
  """(step, model arrays) of the run's checkpoint at eval.step, or its newest; a damaged
  step is a UserError naming it and its file, or with checkpoint.fallback_to_readable
  (and no eval.step) the newest readable step is used, saying so."""
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  steps = finished_steps(checkpoint_dir)
  if not steps:
    raise UserError(f'no finished checkpoint in {checkpoint_dir}')
  if cfg.eval.step and cfg.eval.step not in steps:
    raise UserError(f'no checkpoint for step {cfg.eval.step}; available: {steps}')
  checkpointer = Checkpointer(checkpoint_dir, keep=cfg.checkpoint.keep, async_save=False, read_only=True,
                              checksums=cfg.checkpoint.checksums)
  abstract = abstract_model_arrays(setup.spec)
  read = lambda step: checkpointer.restore_model(step, abstract)  # noqa: E731
  try:
    if cfg.eval.step:
      return cfg.eval.step, checkpointer.checked(cfg.eval.step, lambda: read(cfg.eval.step), log)
    hint = ('set --config.checkpoint.fallback_to_readable=true to evaluate the newest readable step instead, '
            f'or --config.eval.step=K (steps: {steps})')
    step, model, _ = newest_readable(checkpointer, steps, read, fallback=cfg.checkpoint.fallback_to_readable,
                                           log=log, hint=hint, action='evaluating')
  finally:
    checkpointer.close()
  return step, model


def evaluation_settings(cfg, split, seq_len, batch_size, step, setup, step_dir):
  """What makes two evaluations the same: a result file is replaced only by an evaluation
  with equal settings (the model's fields: a mechanism or RoPE changed for evaluation)."""
  return json.loads(json.dumps({
      'dataset': cfg.data.name, 'split': split, 'seq_len': seq_len, 'step': step, 'batch_size': batch_size,
      'max_batches': cfg.eval.max_batches, 'tokenizer': cfg.data.tokenizer, 'text_key': cfg.data.text_key,
      'compute_dtype': str(setup.dims.dtype), 'checkpoint_sha256': model_digest(step_dir),
      'model': config_lib.flatten(cfg.model)}))


def check_eval_split(cfg, split):
  """UserError before the checkpoint is read if the split is not in the dataset."""
  try:
    check_split(cfg.data, data.ensure_prepared(cfg.data), split)
  except UserError as e:
    field = 'eval.split' if cfg.eval.split else 'data.eval_split'
    raise UserError(f'{field}: {e}') from None


def start_devices():
  configure_jax()
  distributed.initialize()  # as train.py: several processes or a no-op


def eval_command(argv):
  evaluate_workdir(argv)
  return 0


def evaluate_workdir(argv):
  """eval.py's work: the results as written to the JSON (None after --help)."""
  loaded = workdir_config(argv, __doc__, 'eval')
  if loaded is None:
    return None
  workdir, cfg = loaded
  split, seq_len, batch_size = config_lib.eval_settings(cfg)
  start_devices()
  setup = prepare_run(cfg, seq_lens=[(seq_len, batch_size, 1)])
  check_eval_split(cfg, split)
  step, model = restore_checkpoint(workdir, cfg, setup)
  print(f'evaluating step {step} on {cfg.data.name}, split {split}, length {seq_len}')
  process_index, process_count = process_info()
  batches = data.eval_batches(cfg.data, split=split, seq_len=seq_len, batch_size=batch_size // process_count,
                              process_index=process_index, process_count=process_count,
                              max_batches=cfg.eval.max_batches)
  eval_fn = sharding.with_activation_placement(make_eval_batch_fn(setup.spec.graphdef, seq_len, cfg.train.loss_chunk),
                                              setup.spec.mesh, setup.spec.rules)
  results = evaluate(eval_fn, model, batches, setup.tokenizer.token_bytes, setup.batch_sharding)
  settings = evaluation_settings(cfg, split, seq_len, batch_size, step, setup,
                                 os.path.join(workdir, 'checkpoints', str(step)))
  results.update(dataset=cfg.data.name, split=split, seq_len=seq_len, step=step, settings=settings)
  print(f'step {step} ' + format_summary(split, results))
  for bucket in results['position_buckets']:
    if bucket['nll'] is not None:
      print(f'  positions [{bucket["start"]:>6}, {bucket["end"]:>6}): nll {bucket["nll"]:.4f} ({bucket["tokens"]} tokens)')
  if distributed.is_main_process():
    out_dir = os.path.join(workdir, 'eval')
    name = unused_result_name(out_dir, result_name(cfg.data.name, split, step, seq_len), settings, log=print)
    paths = write_results(results, out_dir, name)
    print('wrote ' + ' and '.join(paths))
  return json.loads(json.dumps(results))


def main(argv=None):
  sys.exit(run_command(eval_command, argv))
