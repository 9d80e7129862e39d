"""Fine-tuning start: model parameters from another run's checkpoint, nothing else.

Parameters present in both with the same shape are loaded; parameters the checkpoint
lacks (say, a gate of a mechanism switched on for fine-tuning) keep their fresh
initialisation; parameters the model lacks are skipped. Both lists are reported. A
shape disagreement is an error.
"""

import jax
import orbax.checkpoint as ocp

from sparseformer.errors import UserError
from sparseformer.training.checkpoint import Checkpointer, flatten_paths, path_name, resolve_checkpoint_path


def plan_init_from(path, abstract_model):
  """Checks a checkpoint against the model before anything is written: (dir, step, report)."""
  directory, step = resolve_checkpoint_path(path)
  checkpointer = Checkpointer(directory, keep=1, async_save=False, read_only=True)
  saved = checkpointer.checked(step, lambda: checkpointer.saved_shapes(step, 'model'))  # verifies the checksums
  expected = {p: tuple(leaf.shape) for p, leaf in flatten_paths(abstract_model).items()}
  wrong = sorted(p for p in set(saved) & set(expected) if saved[p] != expected[p])
  if wrong:
    details = '; '.join(f'{p}: checkpoint {saved[p]} vs model {expected[p]}' for p in wrong[:3])
    raise UserError(f'init_from {directory}/{step}: {len(wrong)} parameters do not fit the model ({details})')
  report = {'loaded': sorted(set(saved) & set(expected)), 'initialised': sorted(set(expected) - set(saved)),
            'skipped': sorted(set(saved) - set(expected))}
  if not report['loaded']:
    raise UserError(f'init_from {directory}/{step}: no parameter of the checkpoint belongs to this model')
  return checkpointer, step, report


def load_init_from(checkpointer, step, fresh_model, model_shardings, replicated):
  """fresh_model with every parameter the checkpoint has replaced by the saved value."""
  metadata = checkpointer.manager.item_metadata(step)['model']
  metadata = getattr(metadata, 'tree', metadata)
  wanted = flatten_paths(model_shardings)

  def target(path, leaf):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=wanted.get(path_name(path), replicated))
  abstract_saved = jax.tree_util.tree_map_with_path(target, metadata, is_leaf=lambda x: hasattr(x, 'shape'))
  restored = checkpointer.checked(step, lambda: checkpointer.manager.restore(step, args=ocp.args.Composite(
      model=ocp.args.StandardRestore(abstract_saved))).model)
  saved = flatten_paths(restored)

  def pick(path, fresh):
    name = path_name(path)
    return saved[name].astype(fresh.dtype) if name in saved else fresh
  return jax.tree_util.tree_map_with_path(pick, fresh_model)
