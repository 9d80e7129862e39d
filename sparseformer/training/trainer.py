"""The training loop: resume or start, step, log, checkpoint, evaluate."""

import math
import os
import signal
import time

import jax
import numpy as np

from sparseformer import config as config_lib
from sparseformer import data, distributed, sharding
from sparseformer.data.build import check_split
from sparseformer.errors import UserError
from sparseformer.evaluation.evaluate import evaluate, format_summary, make_eval_batch_fn
from sparseformer.training import metrics as metrics_lib
from sparseformer.training.checkpoint import Checkpointer, check_compatible
from sparseformer.training.init_from import load_init_from, plan_init_from
from sparseformer.training.optimizer import make_optimizer
from sparseformer.training.setup import prepare_run, process_info
from sparseformer.training.state import abstract_train_state, make_train_state, state_shardings
from sparseformer.training.step import jit_train_step, make_train_step


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
  t = cfg.train
  if not distributed.is_main_process():  # process 0 logs for the job
    log = lambda *args, **kwargs: None
  setup = prepare_run(cfg, seq_lens=[(cfg.data.seq_len, t.global_batch_size, t.grad_accum_steps)])
  spec = setup.spec
  tx, schedule = make_optimizer(t, spec.abstract_params)
  shardings = state_shardings(spec, tx)
  checkpoint_dir = os.path.join(workdir, 'checkpoints')
  resume_step = (finished_steps(checkpoint_dir) or [None])[-1]
  init_plan = None
  if resume_step is None and cfg.init_from:
    abstract_model = {'params': spec.abstract_params.to_pure_dict(),
                      'mechanism_state': spec.abstract_mechanism_state.to_pure_dict()}
    init_plan = plan_init_from(cfg.init_from, abstract_model)
  check_splits(cfg.data)
  process_index, process_count = process_info()
  iterator = data.train_iterator(cfg.data, seq_len=cfg.data.seq_len, global_batch_size=t.global_batch_size,
                                 seed=cfg.seed, process_index=process_index, process_count=process_count)
  if resume_step is not None:
    check_resumable(checkpoint_dir, resume_step, abstract_train_state(spec, tx, shardings, cfg.seed), iterator)

  # Everything that can be checked has been: from here on the workdir is written.
  os.makedirs(workdir, exist_ok=True)
  checkpointer = Checkpointer(checkpoint_dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
  state, data_state = start_state(cfg, spec, tx, shardings, checkpointer, resume_step, init_plan, log)
  if distributed.is_main_process():
    with open(os.path.join(workdir, 'config.json'), 'w') as f:
      f.write(config_lib.to_json(cfg))

  if data_state is not None:
    iterator.set_state(data_state)
  step_fn = jit_train_step(make_train_step(spec.graphdef, tx, schedule, t.grad_accum_steps, t.lm_loss_weight,
                                           t.loss_chunk),
                           shardings, setup.batch_sharding, setup.mesh, spec.rules)
  loop = TrainLoop(cfg, workdir, setup, checkpointer, iterator, step_fn, log)
  try:
    return loop.run(state)
  finally:
    loop.close()


def check_resumable(checkpoint_dir, step, abstract_state, iterator):
  """UserError if the saved model arrays do not fit this config (reads their metadata
  only; the optimizer's arrays follow the parameters: the config has no field that changes
  them alone), or if the saved data position does not fit this config's data pipeline
  (then `iterator` is not positioned; otherwise it is, at the saved position)."""
  saved = Checkpointer(checkpoint_dir, keep=1, async_save=False, read_only=True)
  try:
    imported = saved.restore_meta(step).get('imported_from')
    if imported:
      raise UserError(f'{os.path.dirname(checkpoint_dir)} holds a model imported from {imported} (no optimizer '
                      'state or data position to resume): fine-tune it in a new workdir with '
                      f'--config.init_from={os.path.dirname(checkpoint_dir)}')
    check_compatible(saved.saved_shapes(step, 'model'),
                     {k: abstract_state[k] for k in ('params', 'mechanism_state')}, saved.step_path(step))
    data_state = distributed.own_process_state(saved.restore_data(step))
    where = saved.step_path(step)
  finally:
    saved.close()
  try:
    iterator.set_state(data_state)
  except (KeyError, IndexError, TypeError, ValueError) as e:
    raise UserError(f'{where}: the saved data position ({type(e).__name__}: {e}) does not fit this config\'s '
                    'data pipeline: were data.tasks, data.task_fraction, data.task_min_len or data.workers '
                    'changed? Resume with the data settings the run had, or start a new workdir with '
                    '--config.init_from') from None


def check_splits(data_cfg):
  """UserError naming the field when data.train_split or data.eval_split is not in the dataset
  (the evaluation at the end would otherwise fail after the whole run)."""
  builder = data.ensure_prepared(data_cfg)
  for field in ('train_split', 'eval_split'):
    try:
      check_split(data_cfg, builder, data_cfg[field])
    except UserError as e:
      raise UserError(f'data.{field}: {e}') from None


def start_state(cfg, spec, tx, shardings, checkpointer, resume_step, init_plan, log):
  """(train state, data iterator state or None): resumed, fine-tuning start, or fresh."""
  if resume_step is not None:
    abstract = abstract_train_state(spec, tx, shardings, cfg.seed)
    state, data_state = checkpointer.restore(resume_step, abstract)
    log(f'resumed from step {resume_step} in {checkpointer.directory}')
    return state, distributed.own_process_state(data_state)
  state = make_train_state(spec, tx, shardings, cfg.seed)
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
  return state, None


class TrainLoop:

  def __init__(self, cfg, workdir, setup, checkpointer, iterator, step_fn, log):
    self.cfg, self.workdir, self.setup = cfg, workdir, setup
    self.checkpointer, self.iterator, self.step_fn, self.log = checkpointer, iterator, step_fn, log
    self.stop_requested = False
    self.previous_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
    self.is_main_process = distributed.is_main_process()
    self.writer = None
    self.progress = None
    self.eval_fn = None
    self.first_step_done = False
    self.flops_per_token = metrics_lib.train_flops_per_token(setup.dims, cfg.data.seq_len)
    self.peak_flops = metrics_lib.peak_flops_per_device()

  def _on_sigterm(self, signum, frame):
    self.stop_requested = True

  def run(self, state):
    cfg, t = self.cfg, self.cfg.train
    step = int(jax.device_get(state['step']))
    self.writer = metrics_lib.MetricWriter(self.workdir, resume_step=step, enabled=self.is_main_process)
    self.log(f'model: {self.setup.spec.param_count / 1e6:.2f}M parameters, {self.setup.dims.dtype} compute, '
             f'mesh {dict(self.setup.mesh.shape)}; training steps {step} -> {t.steps}')
    if step >= t.steps:
      self.log(f'already trained to step {step}')
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
        self.log(f'SIGTERM: saved step {step} and stopped; relaunch with the same workdir to continue')
        return None
    self.checkpointer.wait()
    self.progress.close()
    self.progress = None
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

  def close(self):
    signal.signal(signal.SIGTERM, self.previous_handler)
    if self.progress is not None:
      self.progress.close()
    if self.writer is not None:
      self.writer.close()
    self.checkpointer.close()
    if hasattr(self.iterator, 'close'):  # data.workers > 0: stop the worker processes
      self.iterator.close()
