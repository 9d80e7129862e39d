"""The training loop: resume or start, step, log, checkpoint, evaluate."""

import dataclasses
import math
import os
import signal
import time
from typing import Any

import jax
import numpy as np

from sparseformer import data, distributed, sharding
from sparseformer.data.build import check_split
from sparseformer.errors import UserError
from sparseformer.evaluation.evaluate import evaluate, format_summary, make_eval_batch_fn
from sparseformer.training import metrics as metrics_lib
from sparseformer.training import workdir as workdir_lib
from sparseformer.training.assembly import assemble_train_step
from sparseformer.training.checkpoint import Checkpointer, check_compatible, newest_readable
from sparseformer.training.init_from import load_init_from, plan_init_from
from sparseformer.training.setup import prepare_run, process_info


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)  # save and stop (Ctrl-C twice: stop at once)
PAUSE_AFTER_STEP = int(os.environ.get('SPARSEFORMER_PAUSE_AFTER_STEP', '0'))


class TrainingDiverged(Exception):
  """The loss became NaN or infinite; the last checkpoint written before it is kept."""


def finished_steps(checkpoint_dir):
  """Steps with a complete checkpoint, found without creating anything. Orbax gives a
  step directory its plain numeric name only once the step is fully written."""
  if not os.path.isdir(checkpoint_dir):
    return []
  return sorted(int(n) for n in os.listdir(checkpoint_dir)
                if n.isdigit() and os.path.isdir(os.path.join(checkpoint_dir, n)))


def train(cfg, workdir, log=print):
  """Trains to cfg.train.steps, resuming from workdir if it holds a checkpoint."""
  main_process = distributed.is_main_process()
  if not main_process:  # process 0 logs for the job
    log = lambda *args, **kwargs: None
  plan = plan_training(cfg, workdir, log)
  try:
    # Everything that can be checked has been: from here on the workdir is written.
    os.makedirs(workdir, exist_ok=True)
    lock = workdir_lib.WorkdirLock.acquire(workdir, log) if main_process else None
  except BaseException:
    close_iterator(plan.iterator)
    raise
  try:
    return run_training(plan, workdir, log)
  finally:
    if lock is not None:
      lock.release()


@dataclasses.dataclass
class TrainingPlan:
  """What plan_training found and built without writing anything."""
  cfg: Any
  setup: Any  # training.setup.RunSetup
  parts: Any  # training.assembly.TrainStepParts: optimizer, state shardings, the jitted step
  steps: list  # the finished checkpoint steps found
  init_plan: Any  # plan_init_from's (checkpointer, step, report), or None
  iterator: Any  # the train iterator, at the resumed data position
  resumed: Any  # Resumed, or None for a fresh start


def plan_training(cfg, workdir, log):
  """Checks everything that can be checked (path, lock, config against devices and data,
  splits, the checkpoint to resume, init_from) and restores the state to resume, before
  anything is written."""
  t = cfg.train
  workdir_lib.check_path(workdir)
  if distributed.is_main_process():  # one train.py per workdir; the job's processes share process 0's lock
    workdir_lib.check_unlocked(workdir)
  setup = prepare_run(cfg, seq_lens=[(cfg.data.seq_len, t.global_batch_size, t.grad_accum_steps)])
  spec = setup.spec
  parts = assemble_train_step(cfg, spec, setup.batch_sharding)
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  steps = finished_steps(checkpoint_dir)
  init_plan = None
  if not steps and cfg.init_from:
    abstract_model = {'params': spec.abstract_params.to_pure_dict(),
                      'mechanism_state': spec.abstract_mechanism_state.to_pure_dict()}
    init_plan = plan_init_from(cfg.init_from, abstract_model)
  check_splits(cfg.data)
  process_index, process_count = process_info()
  iterator = data.train_iterator(cfg.data, seq_len=cfg.data.seq_len, global_batch_size=t.global_batch_size,
                                 seed=cfg.seed, process_index=process_index, process_count=process_count)
  try:
    resumed = None
    if steps:
      resumed = restore_resumable(cfg, checkpoint_dir, steps, parts.abstract_state(cfg.seed), iterator, log)
  except BaseException:
    close_iterator(iterator)
    raise
  return TrainingPlan(cfg, setup, parts, steps, init_plan, iterator, resumed)


def run_training(plan, workdir, log):
  """Sets damaged steps aside, records the config, and runs the loop (the lock is held)."""
  cfg, resumed = plan.cfg, plan.resumed
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  checkpointer = None
  try:
    set_aside_damaged(workdir, plan.steps, resumed, log)
    if resumed:
      log(f'resumed from step {resumed.step} in {checkpoint_dir}')
    checkpointer = Checkpointer(checkpoint_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save,
                                checksums=cfg.checkpoint.checksums)
    state = resumed.state if resumed else start_state(cfg, plan.parts, plan.init_plan, log)
    if distributed.is_main_process():
      workdir_lib.record_config(workdir, cfg, resumed.step if resumed else 0, log)
  except BaseException:
    if checkpointer is not None:
      checkpointer.close()
    close_iterator(plan.iterator)
    raise
  loop = TrainLoop(cfg, workdir, plan.setup, checkpointer, plan.iterator, plan.parts.step, log)
  try:
    return loop.run(state)
  finally:
    loop.close()


def close_iterator(iterator):
  if hasattr(iterator, 'close'):  # data.workers > 0: stop the worker processes
    iterator.close()


@dataclasses.dataclass
class Resumed:
  step: int
  state: dict  # the train state, restored with its shardings
  damaged: list  # newer steps that could not be read back (checkpoint.fallback_to_readable)


def restore_resumable(cfg, checkpoint_dir, steps, abstract_state, iterator, log):
  """The newest step's train state, read before anything is written, with `iterator` set
  to its data position. UserError if the saved arrays or data position do not fit this
  config; a damaged step (checksums, unreadable files) is a UserError too, or with
  checkpoint.fallback_to_readable the next older step is tried."""
  saved = Checkpointer(checkpoint_dir, keep=1, async_save=False, read_only=True, checksums=cfg.checkpoint.checksums)
  hint = ('set --config.checkpoint.fallback_to_readable=true to resume from the newest readable step '
          f'(damaged steps are then moved to {os.path.join(os.path.dirname(checkpoint_dir), DAMAGED)}/)')
  try:
    step, state, damaged = newest_readable(
        saved, steps, lambda step: read_resumable(saved, step, abstract_state, iterator),
        fallback=cfg.checkpoint.fallback_to_readable, log=log, hint=hint, action='resuming from')
  finally:
    saved.close()
  return Resumed(step, state, damaged)


def read_resumable(saved, step, abstract_state, iterator):
  """check_saved_step, then the train state of `step` (UserErrors for a mismatch, anything
  else is the step's damage)."""
  check_saved_step(saved, step, abstract_state, iterator)
  state, _ = saved.restore(step, abstract_state)
  return state


def check_resumable(checkpoint_dir, step, abstract_state, iterator):
  """check_saved_step on the checkpoints in `checkpoint_dir`."""
  saved = Checkpointer(checkpoint_dir, keep=1, async_save=False, read_only=True)
  try:
    check_saved_step(saved, step, abstract_state, iterator)
  finally:
    saved.close()


def check_saved_step(saved, step, abstract_state, iterator):
  """UserError if the saved model arrays do not fit this config (reads their metadata
  only; the optimizer's arrays follow the parameters: the config has no field that changes
  them alone), or if the saved data position does not fit this config's data pipeline
  (then `iterator` is not positioned; otherwise it is, at the saved position)."""
  checkpoint_dir = saved.directory
  imported = saved.restore_meta(step).get('imported_from')
  if imported:
    raise UserError(f'{os.path.dirname(checkpoint_dir)} holds a model imported from {imported} (no optimizer '
                    'state or data position to resume): fine-tune it in a new workdir with '
                    f'--config.init_from={os.path.dirname(checkpoint_dir)}')
  check_compatible(saved.saved_shapes(step, 'model'),
                   {k: abstract_state[k] for k in ('params', 'mechanism_state')}, saved.step_path(step))
  data_state = distributed.own_process_state(saved.restore_data(step))
  try:
    iterator.set_state(data_state)
  except (KeyError, IndexError, TypeError, ValueError) as e:
    raise UserError(f'{saved.step_path(step)}: the saved data position ({type(e).__name__}: {e}) does not fit this '
                    'config\'s data pipeline: were data.tasks, data.task_fraction, data.task_min_len or data.workers '
                    'changed? Resume with the data settings the run had, or start a new workdir with '
                    '--config.init_from') from None


DAMAGED = 'damaged_checkpoints'


def set_aside_damaged(workdir, steps, resumed, log):
  """Moves the damaged steps skipped by the resume to workdir/damaged_checkpoints/ (nothing
  is deleted; orbax would otherwise list them, and refuse to save their step numbers).
  UserError if checkpoints appeared meanwhile (a run that finished after our check)."""
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  damaged = resumed.damaged if resumed else []
  if distributed.is_main_process():
    if finished_steps(checkpoint_dir) != steps:
      raise UserError(f'{checkpoint_dir} changed while this run started (steps {steps} -> '
                      f'{finished_steps(checkpoint_dir)}): did another train.py just finish? Relaunch')
    for step in damaged:
      os.makedirs(os.path.join(workdir, DAMAGED), exist_ok=True)
      target = free_path(os.path.join(workdir, DAMAGED, str(step)))
      os.rename(os.path.join(checkpoint_dir, str(step)), target)
      log(f'moved the damaged step {step} to {target}')
  if damaged:
    distributed.sync('sparseformer_set_aside_damaged')


def free_path(path):
  """`path`, or `path-2`, `path-3`, ... whichever does not exist yet."""
  candidate, number = path, 1
  while os.path.exists(candidate):
    number += 1
    candidate = f'{path}-{number}'
  return candidate


def check_splits(data_cfg):
  """UserError naming the field when data.train_split or data.eval_split is not in the dataset
  (the evaluation at the end would otherwise fail after the whole run)."""
  builder = data.ensure_prepared(data_cfg)
  for field in ('train_split', 'eval_split'):
    try:
      check_split(data_cfg, builder, data_cfg[field])
    except UserError as e:
      raise UserError(f'data.{field}: {e}') from None


def start_state(cfg, parts, init_plan, log):
  """The train state of a fresh run: the fine-tuning start of init_from, or initialised."""
  state = parts.fresh_state(cfg.seed)
  shardings = parts.state_shardings
  if init_plan is not None:
    source, step, report = init_plan
    model = load_init_from(source, step, {'params': state['params'], 'mechanism_state': state['mechanism_state']},
                           {'params': shardings['params'], 'mechanism_state': shardings['mechanism_state']},
                           shardings['step'])
    state = {**state, **model}
    log(f'init_from {source.directory}/{step}: loaded {len(report["loaded"])} arrays, '
        f'initialised {len(report["initialised"])} fresh, skipped {len(report["skipped"])}')
    for kind in ('initialised', 'skipped'):
      for name in report[kind]:
        log(f'  {kind}: {name}')
  return state


class TrainLoop:

  def __init__(self, cfg, workdir, setup, checkpointer, iterator, step_fn, log):
    self.cfg, self.workdir, self.setup = cfg, workdir, setup
    self.checkpointer, self.iterator, self.step_fn, self.log = checkpointer, iterator, step_fn, log
    self.stop_requested = None  # the name of the signal that asked to stop
    self.is_main_process = distributed.is_main_process()
    self.previous_handlers = {signum: signal.signal(signum, self._on_stop_signal) for signum in STOP_SIGNALS}
    self.writer = None
    self.progress = None
    self.eval_fn = None
    self.first_step_done = False
    self.flops_per_token = metrics_lib.train_flops_per_token(setup.dims, cfg.data.seq_len)
    self.peak_flops = metrics_lib.peak_flops_per_device()

  def _on_stop_signal(self, signum, frame):
    """SIGTERM or a first Ctrl-C: save after this step and stop. A second Ctrl-C stops at
    once (KeyboardInterrupt), without saving: the last finished checkpoint is kept."""
    if signum == signal.SIGINT and self.stop_requested:
      raise KeyboardInterrupt
    self.stop_requested = signal.Signals(signum).name
    if signum == signal.SIGINT and self.is_main_process:  # os.write: safe inside a handler, unlike print
      os.write(2, b'\nCtrl-C: saving after this step, then stopping (Ctrl-C again: stop now, '
               b'without saving)\n')

  def run(self, state):
    cfg, t = self.cfg, self.cfg.train
    step = int(jax.device_get(state['step']))
    self.writer = metrics_lib.MetricWriter(self.workdir, resume_step=step, enabled=self.is_main_process)
    self.log(f'model: {self.setup.spec.param_count / 1e6:.2f}M parameters, {self.setup.dims.dtype} compute, '
             f'mesh {dict(self.setup.mesh.shape)}; training steps {step} -> {t.steps}')
    if step >= t.steps:
      self.log(f'already trained to step {step}')
      self.restore_signal_handlers()  # nothing left to save: Ctrl-C stops the evaluation
      return self.evaluate(state, step)
    self.progress = metrics_lib.Progress(t.steps, step, t.log_every, enabled=self.is_main_process)
    self.log('compiling the train step (the first step takes longer) ...')
    last_saved = self.checkpointer.latest_step()
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    last_time = time.perf_counter()
    while step < t.steps:
      if PAUSE_AFTER_STEP and step == PAUSE_AFTER_STEP:
        self.pause(step)
      data_start = time.perf_counter()
      batch = next(self.iterator)
      data_time = time.perf_counter() - data_start
      data_state = self.iterator.get_state()
      device_batch = {k: jax.make_array_from_process_local_data(self.setup.batch_sharding, v)
                      for k, v in batch.items()}
      state, metrics = self.step_fn(state, device_batch)
      metrics = jax.device_get(metrics)
      now = time.perf_counter()
      step_time, last_time = now - last_time, now
      step += 1
      if not math.isfinite(float(metrics['loss'])):
        self.checkpointer.wait()
        raise TrainingDiverged(f'non-finite loss ({float(metrics["loss"])}) at step {step}; '
                               f'last good checkpoint: step {last_saved} in {self.checkpointer.directory}')
      self.record(step, metrics, step_time, data_time, tokens_per_step)
      if step % cfg.checkpoint.every_steps == 0 or step == t.steps or self.stop_requested:
        last_saved = self.checkpointer.save(state, distributed.gather_process_states(data_state),
                                            {'config': cfg.to_dict()})
      if t.eval_every and step % t.eval_every == 0 and step < t.steps:
        self.evaluate(state, step)
      if self.stop_requested:
        self.checkpointer.wait()
        self.log(f'{self.stop_requested}: saved step {step} and stopped; relaunch with the same workdir to continue')
        return None
    self.checkpointer.wait()
    self.progress.close()
    self.progress = None
    self.restore_signal_handlers()  # the last step is saved: Ctrl-C stops the evaluation
    return self.evaluate(state, step)

  def pause(self, step):
    """Fault-injection hook for tests: with `step` done and its checkpoints written, wait to
    be killed. A SIGTERM ends the wait: the next step is then the one that saves and stops."""
    self.checkpointer.wait()
    print(f'paused after step {step} (SPARSEFORMER_PAUSE_AFTER_STEP)', flush=True)
    while not self.stop_requested:
      time.sleep(0.05)

  def record(self, step, metrics, step_time, data_time, tokens_per_step):
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    scalars['perplexity'] = math.exp(min(scalars['loss'], 50.0))
    scalars['step_time'] = step_time
    # The host waits for the batch, then for the step it dispatched (metrics are fetched
    # every step): step_time - data_time is the step itself, free of input stalls.
    scalars['data_time'] = data_time
    scalars['tokens_per_second'] = tokens_per_step / step_time
    if self.peak_flops:
      scalars['mfu'] = self.flops_per_token * tokens_per_step / step_time / (self.peak_flops * jax.device_count())
    if step == 1 or step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps:
      self.writer.write(step, scalars, prefix='train/')
    self.progress.update(step, {'loss': f'{scalars["loss"]:.4f}', 'lr': f'{scalars["learning_rate"]:.2e}',
                                'tok/s': f'{scalars["tokens_per_second"]:.0f}'})
    if not self.first_step_done:
      self.first_step_done = True
      self.progress.message(f'step {step} done in {step_time:.1f}s (compilation included)')

  def evaluate(self, state, step):
    cfg = self.cfg
    split = cfg.data.eval_split
    if self.eval_fn is None:
      spec = self.setup.spec
      self.eval_fn = sharding.with_activation_placement(make_eval_batch_fn(spec.graphdef, cfg.data.seq_len, cfg.train.loss_chunk),
                                                        spec.mesh, spec.rules)
    process_index, process_count = process_info()
    batches = data.eval_batches(cfg.data, split=split, seq_len=cfg.data.seq_len,
                                batch_size=cfg.train.global_batch_size // process_count,
                                process_index=process_index, process_count=process_count,
                                max_batches=cfg.train.eval_batches)
    results = evaluate(self.eval_fn, state, batches, self.setup.tokenizer.token_bytes, self.setup.batch_sharding)
    self.writer.write(step, {k: results[k] for k in ('nll', 'perplexity', 'bits_per_byte', 'nats_per_byte')},
                      prefix=f'eval/{split}/')
    message = f'step {step} ' + format_summary(split, results)
    if self.progress is not None:
      self.progress.message(message)
    else:
      self.log(message)
    return results

  def restore_signal_handlers(self):
    for signum, handler in self.previous_handlers.items():
      signal.signal(signum, handler)

  def close(self):
    self.restore_signal_handlers()
    if self.progress is not None:
      self.progress.close()
    if self.writer is not None:
      self.writer.close()
    self.checkpointer.close()
    close_iterator(self.iterator)
