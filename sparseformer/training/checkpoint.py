"""Orbax checkpoints of the train state, the data iterator and the run's metadata.

Layout: workdir/checkpoints/<step>/{model, optimizer, data, meta}. Orbax writes each
step into a temporary directory and renames it when complete, so a step directory that
exists is whole; a save interrupted by a kill leaves only a temporary directory, which
is never restored (and is removed on the next start).
"""

import json
import os
import time

import jax
import orbax.checkpoint as ocp

from sparseformer.errors import UserError

PAUSE_DURING_SAVE_OF_STEP = int(os.environ.get('SPARSEFORMER_PAUSE_DURING_SAVE_OF_STEP', '0'))


class Checkpointer:

  def __init__(self, directory, *, keep, async_save, read_only=False):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=not read_only,
        read_only=read_only, cleanup_tmp_directories=not read_only)
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
    self.manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model),
        optimizer=ocp.args.StandardSave(optimizer),
        data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave({**meta, 'step': step})), force=True)
    return step

  def save_model(self, step, model, meta):
    """A step holding only the model ({'params', 'mechanism_state'}) and meta: an
    imported checkpoint, which evaluation and --config.init_from read and training does
    not resume (it has no optimizer or data position)."""
    self.manager.save(step, args=ocp.args.Composite(
        model=ocp.args.StandardSave(model), meta=ocp.args.JsonSave({**meta, 'step': step})), force=True)
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
