"""Implementations of a primitive and how its api picks one.

Every primitive's kernel modules (reference, tpu, mosaic_gpu, ...) export
`IMPLEMENTATIONS`, a tuple of `Implementation` records; the primitive's api.py holds one
`Registry` of them. `forward`, `backward` and `unavailable` take the primitive's own
arguments (its implementation or api docstring lists them); `unavailable` returns None
when the implementation can run on those inputs, else the reason (a short sentence).
"""

import dataclasses
import importlib
import warnings
from typing import Callable

import jax


def always_available(*args):
  return None


@dataclasses.dataclass(frozen=True)
class Implementation:
  name: str
  forward: Callable
  backward: Callable
  platforms: tuple = ('cpu', 'gpu', 'tpu')
  unavailable: Callable = always_available


class Registry:
  """The implementations of one primitive, collected from its kernel modules, and the
  choice among them: None picks the first available in the platform's preference order;
  a name fails fast with the reason it cannot run; a list is tried in order, with a
  warning naming why each skipped one could not run."""

  def __init__(self, primitive, package, kernel_modules, preference):
    self.primitive = primitive
    self.preference = preference
    self.implementations = {
        implementation.name: implementation
        for module in kernel_modules
        for implementation in importlib.import_module(f'{package}.{module}').IMPLEMENTATIONS
    }

  def reason_unavailable(self, name, *inputs):
    if name not in self.implementations:
      return f'unknown implementation {name!r}; registered: {sorted(self.implementations)}'
    implementation = self.implementations[name]
    platform = jax.default_backend()
    if platform not in implementation.platforms:
      return f'{name} runs on {"/".join(implementation.platforms)}, not {platform}'
    return implementation.unavailable(*inputs)

  def select(self, implementation, *inputs):
    if isinstance(implementation, str):
      reason = self.reason_unavailable(implementation, *inputs)
      if reason:
        raise ValueError(f'{self.primitive} implementation {implementation!r} cannot run: {reason}')
      return self.implementations[implementation]
    candidates = implementation or [name for name in self.preference.get(jax.default_backend(), ('reference',))
                                    if name in self.implementations]
    reasons = []
    for name in candidates:
      reason = self.reason_unavailable(name, *inputs)
      if reason is None:
        if reasons and implementation:
          warnings.warn(f'{self.primitive} falls back to {name!r}: ' + '; '.join(reasons))
        return self.implementations[name]
      reasons.append(f'{name}: {reason}')
    raise ValueError(f'no {self.primitive} implementation can run: ' + '; '.join(reasons))
