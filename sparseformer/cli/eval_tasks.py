"""python -m sparseformer.cli.eval_tasks --workdir DIR --config.eval.tasks="('passkey', 'mqar:pairs=64')"
    [--config.eval.task_lengths="(4096, 16384)"] [--config.eval.task_depths=5]
    [--config.eval.task_samples=4] [--config.eval.task_seed=1234]
    [--config.eval.task_batch_size=N] [--config.eval.task_decode=true] [--config.eval.step=K]
    [--config.FIELD=VALUE ...]

Scores a checkpoint of a run (the latest unless eval.step is set) on synthetic
long-context tasks (sparseformer/evaluation/tasks, docs/tasks.md): for every task, length
(default data.seq_len) and needle depth (evenly spaced over [0, 1]), task_samples
validation examples, scored by exact match of the greedy answer (teacher forcing: one
forward pass per example); with eval.task_decode every answer is also generated through
the layers' caches (sparseformer.generation) and its accuracy reported beside it. Prints
the task x length accuracy and writes
DIR/eval/tasks_step<K>.json and one heat map per task, DIR/eval/tasks_step<K>_<task>.png.
Lengths beyond the training length are not clipped: the run's model.rope settings apply.
"""

import math
import os
import sys

from sparseformer import distributed, sharding
from sparseformer.cli.eval import restore_checkpoint, start_devices, workdir_config
from sparseformer.cli.main import run_command
from sparseformer.errors import UserError


def row_multiple(cfg, mesh):
  """Row lengths are multiples of the attention block size and of the sequence shards."""
  rules = tuple(cfg.mesh.rules)
  length_axes = sharding.logical_spec(('batch', 'length'), rules)[1]
  length_ways = sharding.ActivationPlacement(mesh, rules).axis_size(length_axes)
  return math.lcm(cfg.model.attention.block_size, length_ways)


def eval_tasks_command(argv):
  loaded = workdir_config(argv, __doc__, 'eval_tasks')
  if loaded is None:
    return 0
  workdir, cfg = loaded
  if not cfg.eval.tasks:
    raise UserError("eval_tasks: no tasks to score; set --config.eval.tasks, e.g. "
                    "--config.eval.tasks=\"('passkey', 'niah_single')\" (see docs/tasks.md)")
  from sparseformer import config as config_lib
  config_lib.validate(cfg)  # task specs, lengths, depths... before any device work
  start_devices()
  from sparseformer.evaluation import task_eval
  from sparseformer.training.setup import prepare_run, require_divisible_by_processes
  mesh = sharding.make_mesh(cfg.mesh)
  multiple = row_multiple(cfg, mesh)
  settings = task_eval.task_settings(cfg, multiple)
  batch_size = settings['batch_size']
  require_divisible_by_processes(batch_size, 'eval.task_batch_size (or eval.batch_size)')
  setup = prepare_run(cfg, seq_lens=[(task_eval.row_length(n, multiple), batch_size, 1) for n in settings['lengths']])
  step, model = restore_checkpoint(workdir, cfg, setup)
  logprob_fn = task_eval.model_logprob_fn(setup.spec.graphdef, model, setup.spec.mesh, setup.spec.rules,
                                          setup.batch_sharding)
  longest = max(settings['lengths'])
  if longest > cfg.data.seq_len:
    print(f'note: lengths up to {longest} exceed the training length {cfg.data.seq_len}; '
          f'positions are not clipped (model.rope.scaling={cfg.model.rope.scaling!r})')
  results = task_eval.evaluate_tasks(cfg, logprob_fn, setup.tokenizer, row_multiple=multiple,
                                     log=lambda message: print(message, flush=True),
                                     decode_fn=decode_fn(cfg, setup, model))
  results.update(step=step, dataset=cfg.data.name, train_seq_len=cfg.data.seq_len, rope=cfg.model.rope.to_dict(),
                 attention=cfg.model.attention.kind)
  print(f'step {step}: exact-match accuracy ({settings["samples"]} examples per task, length and depth)')
  for line in task_eval.format_table(results):
    print('  ' + line)
  if distributed.is_main_process():
    paths = task_eval.write_task_results(results, os.path.join(workdir, 'eval'), f'tasks_step{step}')
    print('wrote ' + ', '.join(paths))
  return 0


def decode_fn(cfg, setup, model):
  """With eval.task_decode, the generate function that decodes the answers (one process)."""
  if not cfg.eval.task_decode:
    return None
  import jax
  from sparseformer.evaluation import task_decode
  from sparseformer.generation import Generator
  if jax.process_count() > 1:
    raise UserError('eval.task_decode runs in one process; score with teacher forcing alone on several')
  generator = Generator(setup.spec.graphdef, model, vocab_size=setup.tokenizer.vocab_size, mesh=setup.mesh,
                        rules=tuple(cfg.mesh.rules))
  return task_decode.generator_fn(generator)


def main(argv=None):
  sys.exit(run_command(eval_tasks_command, argv))


if __name__ == '__main__':
  main()
