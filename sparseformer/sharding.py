"""Device meshes and the logical-axis rules that place parameters and activations on them.

Parameters carry logical axis names (`embed`, `heads`, ...); `config.mesh.rules` maps
each name to mesh axes. Changing parallelism is a config change only.
"""

import contextlib
import dataclasses
import math
import threading

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sparseformer.config import MESH_AXES
from sparseformer.errors import UserError


def mesh_shape(mesh_cfg, num_devices):
  """Axis sizes with the one -1 axis filling the devices the others leave."""
  sizes = {axis: mesh_cfg[axis] for axis in MESH_AXES}
  fill = [axis for axis, size in sizes.items() if size == -1]
  if len(fill) > 1:
    raise UserError(f'mesh: only one axis may be -1, got {", ".join(fill)}')
  fixed = math.prod(size for size in sizes.values() if size != -1)
  if fill:
    if num_devices % fixed:
      raise UserError(f'mesh: {num_devices} devices cannot be split into axes of sizes {sizes}')
    sizes[fill[0]] = num_devices // fixed
  if math.prod(sizes.values()) != num_devices:
    raise UserError(f'mesh: axis sizes {sizes} multiply to {math.prod(sizes.values())}, '
                    f'but there are {num_devices} devices')
  return sizes


def make_mesh(mesh_cfg, devices=None):
  """The mesh of the config's axis sizes. jax orders the devices by the physical topology
  (TPU ICI links, hosts) so the last axes (tensor, sequence) stay within fast links."""
  devices = jax.devices() if devices is None else devices
  sizes = [mesh_shape(mesh_cfg, len(devices))[a] for a in MESH_AXES]
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  try:
    return jax.make_mesh(sizes, MESH_AXES, auto, devices=devices)
  except (ValueError, NotImplementedError):  # a shape the topology cannot be cut into: devices in order
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES, axis_types=auto)


def logical_spec(logical_axes, rules):
  """PartitionSpec for logical axis names; a mesh axis is used at most once."""
  table = dict(rules)
  used, spec = set(), []
  for name in logical_axes:
    target = table.get(name)
    targets = (target,) if isinstance(target, str) else tuple(target or ())
    targets = tuple(t for t in targets if t not in used)
    used.update(targets)
    spec.append(targets[0] if len(targets) == 1 else (targets or None))
  return PartitionSpec(*spec)


def _axis_size(mesh, entry):
  names = (entry,) if isinstance(entry, str) else tuple(entry or ())
  return math.prod(mesh.shape[n] for n in names)


def variable_sharding(variable, mesh, rules, path=''):
  """NamedSharding of one nnx Variable from its `logical_axes` metadata."""
  axes = variable.get_metadata().get('logical_axes')
  if axes is None:
    return NamedSharding(mesh, PartitionSpec())
  spec = logical_spec(axes, rules)
  for dim, entry in zip(variable.shape, spec):
    if dim % _axis_size(mesh, entry):
      raise UserError(f'parameter {path} of shape {variable.shape} (axes {axes}) cannot be split over '
                      f'mesh axes {spec} of sizes {dict(mesh.shape)}; change config.mesh')
  return NamedSharding(mesh, spec)


def state_shardings(state, mesh, rules):
  """A tree like `state` (an nnx.State of Variables) whose values are NamedShardings."""
  def one(path, variable):
    name = '.'.join(str(getattr(k, 'key', k)) for k in path)
    return variable.replace(variable_sharding(variable, mesh, rules, name))
  return jax.tree_util.tree_map_with_path(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh, rules):
  """Sharding of [batch, length] input arrays."""
  return NamedSharding(mesh, logical_spec(('batch', 'length'), rules))


def replicated(mesh):
  return NamedSharding(mesh, PartitionSpec())


def check_batch_fits(global_batch, micro_batches, seq_len, mesh, rules):
  """Batch and length must split evenly over the mesh axes they are sharded on."""
  spec = logical_spec(('batch', 'length'), rules)
  batch_ways, length_ways = _axis_size(mesh, spec[0]), _axis_size(mesh, spec[1])
  micro = global_batch // micro_batches
  if micro % batch_ways:
    raise UserError(f'train.global_batch_size={global_batch} over {micro_batches} accumulation steps gives '
                    f'{micro} rows per step, not divisible by the {batch_ways} batch shards of the mesh')
  if seq_len % length_ways:
    raise UserError(f'seq_len={seq_len} is not divisible by the {length_ways} sequence shards of the mesh')


@dataclasses.dataclass(frozen=True)
class ActivationPlacement:
  """The mesh and rules that a traced function places its activations with. Attention
  mechanisms read it to run their kernels per shard (see model/attention/context_parallel.py)."""
  mesh: Mesh
  rules: tuple

  def spec(self, *logical_axes):
    return logical_spec(logical_axes, self.rules)

  def axis_size(self, entry):
    return _axis_size(self.mesh, entry)


_placement = threading.local()


@contextlib.contextmanager
def placing_activations(mesh, rules):
  """Within this context (entered inside a traced function), `current_placement()` is set."""
  previous = getattr(_placement, 'value', None)
  _placement.value = ActivationPlacement(mesh, tuple(rules))
  try:
    yield _placement.value
  finally:
    _placement.value = previous


def current_placement():
  """The ActivationPlacement of the enclosing `placing_activations`, or None."""
  return getattr(_placement, 'value', None)


def with_activation_placement(fn, mesh, rules):
  """fn whose body is traced within `placing_activations(mesh, rules)`."""
  def placed(*args, **kwargs):
    with placing_activations(mesh, rules):
      return fn(*args, **kwargs)
  return placed
