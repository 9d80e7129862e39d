"""Mesh sizes from the config, and the activation placement attention reads while tracing."""

import jax
import pytest

from sparseformer import sharding
from sparseformer.errors import UserError


def mesh_cfg(**sizes):
  return {'data': -1, 'fsdp': 1, 'tensor': 1, 'sequence': 1, **sizes}


@pytest.mark.parametrize('sizes,devices,expected', [
    ({}, 8, {'data': 8, 'fsdp': 1, 'tensor': 1, 'sequence': 1}),
    ({'tensor': 2}, 8, {'data': 4, 'fsdp': 1, 'tensor': 2, 'sequence': 1}),
    ({'data': 2, 'fsdp': -1, 'sequence': 2}, 8, {'data': 2, 'fsdp': 2, 'tensor': 1, 'sequence': 2}),
    ({'data': 1, 'sequence': 4}, 4, {'data': 1, 'fsdp': 1, 'tensor': 1, 'sequence': 4}),
])
def test_one_axis_fills_the_devices_the_others_leave(sizes, devices, expected):
  assert sharding.mesh_shape(mesh_cfg(**sizes), devices) == expected


@pytest.mark.parametrize('sizes,devices,fragment', [
    ({'fsdp': -1}, 8, 'only one axis may be -1'),
    ({'tensor': 3}, 8, 'cannot be split'),
    ({'data': 2, 'tensor': 2}, 8, 'multiply to 4'),
])
def test_meshes_that_do_not_fit_the_devices_are_user_errors(sizes, devices, fragment):
  with pytest.raises(UserError, match=fragment):
    sharding.mesh_shape(mesh_cfg(**sizes), devices)


def test_a_mesh_of_one_device_has_every_axis():
  mesh = sharding.make_mesh(mesh_cfg(), jax.devices()[:1])
  assert mesh.axis_names == sharding.MESH_AXES and mesh.size == 1


def test_the_placement_is_set_while_tracing_inside_the_context_only():
  mesh = sharding.make_mesh(mesh_cfg(), jax.devices()[:1])
  rules = (('batch', ('data', 'fsdp')), ('length', 'sequence'))
  seen = []

  def traced(x):
    seen.append(sharding.current_placement())
    return x + 1

  jax.jit(sharding.with_activation_placement(traced, mesh, rules))(1.0)
  assert seen[0].mesh is mesh and seen[0].spec('batch', 'length') == jax.P(('data', 'fsdp'), 'sequence')
  assert sharding.current_placement() is None
  jax.jit(traced)(2.0)
  assert seen[1] is None
