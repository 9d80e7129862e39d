"""Orbax checkpoints of the train state, the data iterator and the run's metadata.

Layout: workdir/checkpoints/<step>/{model, optimizer, data, meta, checksums.json}. Orbax
writes each step into a temporary directory and renames it when complete, so a step
directory that exists is whole; a save interrupted by a kill leaves only a temporary
directory, which is never restored (and is removed on the next start). Process 0 writes
the checksums of the step's files (training/checksums.py) into the temporary directory
just before the rename; every read goes through `Checkpointer.checked`, which verifies
them and turns any failure to read the step back into a `DamagedCheckpoint`.
"""

import json
import os
import re
import time

import jax
import orbax.checkpoint as ocp

from sparseformer.errors import UserError
from sparseformer.training import checksums as checksums_lib
from sparseformer.training.checksums import DamagedCheckpoint

TMP_SUFFIX = '.orbax-checkpoint-tmp'  # orbax's temporary step directory: <step>.orbax-checkpoint-tmp

PAUSE_DURING_SAVE_OF_STEP = int(os.environ.get('SPARSEFORMER_PAUSE_DURING_SAVE_OF_STEP', '0'))


class Checkpointer:

  def __init__(self, directory, *, keep, async_save, read_only=False, checksums=True):
    self.directory = os.path.abspath(directory)
    self.async_save, self.checksums = async_save, checksums
    self.saving_step = None
    write_checksums = checksums and not read_only
    # Orbax calls post_finalization_callback (process 0, after every process has written
    # its files, before the rename) only from its asynchronous checkpointer: with checksums
    # a synchronous save is an asynchronous one waited for.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save or write_checksums, create=not read_only,
        read_only=read_only, cleanup_tmp_directories=not read_only,
        async_options=ocp.AsyncOptions(post_finalization_callback=self._write_checksums) if write_checksums else None)
    handlers = {'model': ocp.StandardCheckpointHandler(), 'optimizer': ocp.StandardCheckpointHandler(),
                'data': ocp.JsonCheckpointHandler(),
                'meta': pausing_json_handler(PAUSE_DURING_SAVE_OF_STEP) if PAUSE_DURING_SAVE_OF_STEP
                        else ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, state, data_state, meta):
    step = int(jax.device_get(state['step']))
    model = {'params': state['params'], 'mechanism_state': state['mechanism_state']}
    optimizer = {'opt_state': state['opt_state'], 'step': state['step'], 'rng': state['rng']}
    self._save(step, ocp.args.Composite(
        model=ocp.args.StandardSave(model),
        optimizer=ocp.args.StandardSave(optimizer),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave({**meta, 'step': step})))
    return step

  def _save(self, step, args):
    self.manager.wait_until_finished()  # the previous save, its checksums included, is done
    self.saving_step = step
    self.manager.save(step, args=args, force=True)
    if not self.async_save:
      self.manager.wait_until_finished()

  def _write_checksums(self):
    """Orbax's post-finalization callback: the step's files are all written, the rename is next."""
    step_dir = self.step_path(self.saving_step)
    temporary = step_dir + TMP_SUFFIX
    checksums_lib.write_manifest(temporary if os.path.isdir(temporary) else step_dir)

  def save_model(self, step, model, meta):
    """A step holding only the model ({'params', 'mechanism_state'}) and meta: an
    imported checkpoint, which evaluation and --config.init_from read and training does
    not resume (it has no optimizer or data position)."""
    self._save(step, ocp.args.Composite(model=ocp.args.StandardSave(model),
                                        meta=ocp.args.JsonSave({**meta, 'step': step})))
    self.manager.wait_until_finished()

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()

  def restore(self, step, abstract_state):
    """(train state, data iterator state) of `step`, placed with the abstract state's shardings."""
    abstract_model = {'params': abstract_state['params'], 'mechanism_state': abstract_state['mechanism_state']}
    check_compatible(self.saved_shapes(step, 'model'), abstract_model, self.step_path(step))
    abstract_optimizer = {k: abstract_state[k] for k in ('opt_state', 'step', 'rng')}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract_model),
        optimizer=ocp.args.StandardRestore(abstract_optimizer),
        data=ocp.args.JsonRestore()))
    state = {**restored.model, **restored.optimizer}
    return state, restored.data

  def restore_data(self, step):
    """The data iterator state saved with `step` (JSON), without the arrays."""
    return self.manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data

  def restore_meta(self, step):
    return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def restore_model(self, step, abstract_model):
    """{'params', 'mechanism_state'} of `step` (evaluation and fine-tuning start here)."""
    check_compatible(self.saved_shapes(step, 'model'), abstract_model, self.step_path(step))
    return self.manager.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract_model))).model

  def saved_shapes(self, step, item):
    """{'a/b/c': shape} of an item as written, read from its metadata without loading it."""
    metadata = self.manager.item_metadata(step)[item]
    tree = getattr(metadata, 'tree', metadata)
    return {path: tuple(leaf.shape) for path, leaf in flatten_paths(tree).items() if hasattr(leaf, 'shape')}

  def step_path(self, step):
    return os.path.join(self.directory, str(step))

  def checked(self, step, read, log=None):
    """read() of `step` once its files match their checksums (unless checksums is off);
    DamagedCheckpoint naming the file when they do not or when the read fails (out of
    memory excepted). `log` gets a note when the step has no checksums to verify."""
    step_dir = self.step_path(step)
    if self.checksums and not checksums_lib.verify(step_dir) and log is not None:
      log(f'note: checkpoint step {step} has no {checksums_lib.MANIFEST} (saved without checksums): read unverified')
    try:
      return read()
    except UserError:
      raise
    except Exception as e:  # orbax and tensorstore raise ValueError, KeyError, OSError, bare Exception ...
      if isinstance(e, MemoryError) or 'RESOURCE_EXHAUSTED' in str(e):
        raise
      raise DamagedCheckpoint(step_dir, file_named_in(str(e), step_dir), error_line(e)) from e


def newest_readable(checkpointer, steps, read, *, fallback, log, hint, action):
  """(step, read(step), damaged steps) for the newest of `steps` that reads back whole.
  Without `fallback` a damaged newest step is a UserError ending in `hint`; with it the
  next older step is tried, and one line says which steps were damaged and `action`
  ('resuming from', 'evaluating') the step used."""
  problems = []
  for step in sorted(steps, reverse=True):
    try:
      value = checkpointer.checked(step, lambda: read(step), log)
    except DamagedCheckpoint as e:
      if not fallback:
        raise UserError(f'{e}; {hint}') from None
      problems.append((step, str(e)))
      continue
    if problems:
      log('; '.join(text for _, text in problems) +
          f'; {action} step {step}, the newest readable one (checkpoint.fallback_to_readable)')
    return step, value, [damaged for damaged, _ in problems]
  raise UserError(f'no readable checkpoint in {checkpointer.directory}: ' + '; '.join(text for _, text in problems))


def file_named_in(message, step_dir):
  """The file of `step_dir` that an error message names (relative), or None."""
  match = re.search(re.escape(step_dir.rstrip(os.sep) + os.sep) + r'([^"\'\s:]+)', message)
  return match.group(1).rstrip(os.sep) if match else None


def error_line(error, limit=200):
  """`Type: first line of the message`, cut to `limit` characters (tensorstore appends its spec)."""
  first = (str(error).strip().splitlines() or [''])[0]
  text = f'{type(error).__name__}: {first}'
  return text if len(text) <= limit else text[:limit - 3] + '...'


def pausing_json_handler(step):
  """Fault-injection hook for tests (SPARSEFORMER_PAUSE_DURING_SAVE_OF_STEP): a JSON handler
  whose save of `step` writes its item into orbax's temporary directory and then never
  commits, so the process can be killed with the save half done. (The instance's method
  is replaced, not subclassed: orbax finds a handler for JsonSave by its exact class.)"""
  handler = ocp.JsonCheckpointHandler()
  save = handler.async_save

  async def async_save(directory, item=None, args=None):
    commits = await save(directory, item, args)
    if args is not None and args.item.get('step') == step:
      return [PausedCommit(commits, directory.parent)]
    return commits

  handler.async_save = async_save
  return handler


class PausedCommit:
  """An orbax commit future: result(), awaited before orbax renames the temporary
  directory (on its background thread when saves are asynchronous), finishes the given
  commits, then waits to be killed."""

  def __init__(self, commits, step_directory):
    self.commits, self.step_directory = commits, step_directory

  def result(self, timeout=None):
    for commit in self.commits:
      commit.result(timeout)
    print(f'paused during the save into {self.step_directory} (SPARSEFORMER_PAUSE_DURING_SAVE_OF_STEP)', flush=True)
    while True:
      time.sleep(60)

  def cancel(self):
    return False


def path_name(path):
  """'a/b/0/c' for a jax key path."""
  return '/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path)


def flatten_paths(tree):
  """{'a/b/c': leaf} for a nested tree of dicts/lists."""
  leaves = jax.tree_util.tree_leaves_with_path(tree, is_leaf=lambda x: hasattr(x, 'shape'))
  return {path_name(path): leaf for path, leaf in leaves}


def check_compatible(saved_shapes, abstract_tree, where):
  """UserError naming the first mismatches if a checkpoint does not fit the model."""
  expected = {path: tuple(leaf.shape) for path, leaf in flatten_paths(abstract_tree).items()}
  missing = sorted(set(expected) - set(saved_shapes))
  unexpected = sorted(set(saved_shapes) - set(expected))
  wrong = sorted(p for p in set(expected) & set(saved_shapes) if expected[p] != saved_shapes[p])
  if not (missing or unexpected or wrong):
    return
  problems = [f'{p}: checkpoint {saved_shapes[p]} vs model {expected[p]}' for p in wrong[:3]]
  problems += [f'{p} missing from checkpoint' for p in missing[:3]]
  problems += [f'{p} not in the model' for p in unexpected[:3]]
  count = len(missing) + len(unexpected) + len(wrong)
  raise UserError(f'checkpoint {where} does not match the model ({count} differences: {"; ".join(problems)})')


def resolve_checkpoint_path(path):
  """A workdir, its checkpoints/ directory, or one step directory -> (checkpoints dir, step)."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    path = os.path.join(path, 'checkpoints')
  base = os.path.basename(path)
  if base.isdigit() and os.path.isdir(os.path.join(path, 'model')):
    return os.path.dirname(path), int(base)
  if not os.path.isdir(path):
    raise UserError(f'no checkpoint at {path}')
  steps = [int(name) for name in os.listdir(path) if name.isdigit() and os.path.isdir(os.path.join(path, name, 'model'))]
  if not steps:
    raise UserError(f'no finished checkpoint in {path}')
  return path, max(steps)


def read_json(path):
  with open(path) as f:
    return json.load(f)
