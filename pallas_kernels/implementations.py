"""Implementations of a primitive and how its api picks one.

Every primitive's kernel modules (reference, tpu, mosaic_gpu, ...) export
`IMPLEMENTATIONS`, a tuple of `Implementation` records; the primitive's api.py holds one
`Registry` of them. `forward`, `backward` and `unavailable` take the primitive's own
arguments (its implementation or api docstring lists them); `unavailable` returns None
when the implementation can run on those inputs, else the reason (a short sentence).
"""

import dataclasses
import functools
import importlib
import os
import warnings
from typing import Callable

import jax

# implementation=None picks from the platform's preference order ('auto', the default) or,
# with 'reference', runs every primitive's jnp reference: the way around a kernel that
# fails on some machine (the TPU kernels have never run on a real TPU).
KERNELS_ENV = 'SPARSEFORMER_KERNELS'

# Interpret mode runs each warpgroup (or TPU core) of a kernel on its own thread, and their
# barriers are host callbacks that block one thread of XLA's CPU pool each. The pool has one
# thread per core unless PJRT_NPROC (read when the CPU backend starts) says otherwise; with
# too few, the threads that would release the barriers never run and the call hangs.
INTERPRET_MIN_CPU_THREADS = 8


def always_available(*args):
  return None


@dataclasses.dataclass(frozen=True)
class Implementation:
  name: str
  forward: Callable
  backward: Callable
  platforms: tuple = ('cpu', 'gpu', 'tpu')
  unavailable: Callable = always_available
  fast_backward: Callable | None = None  # faster, not bitwise reproducible (atomic sums)


class Registry:
  """The implementations of one primitive, collected from its kernel modules, and the
  choice among them: None picks the first available in the platform's preference order;
  a name fails fast with the reason it cannot run; a list is tried in order. Whenever a
  candidate is skipped (None or a list) a UserWarning names it and why, once per process
  for each distinct fallback: the api runs at trace time, so repeated calls would repeat it."""

  def __init__(self, primitive, package, kernel_modules, preference):
    self.primitive = primitive
    self.preference = preference
    self.warned_fallbacks = set()
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
      return self.checked(implementation)
    candidates = implementation or self.default_candidates()
    reasons = []
    for name in candidates:
      reason = self.reason_unavailable(name, *inputs)
      if reason is None:
        if reasons:
          self.warn_fallback(name, reasons)
        return self.checked(name)
      reasons.append(f'{name}: {reason}')
    raise ValueError(f'no {self.primitive} implementation can run: ' + '; '.join(reasons))

  def default_candidates(self):
    """The platform's preference order, or only the reference when $SPARSEFORMER_KERNELS=reference."""
    setting = os.environ.get(KERNELS_ENV, 'auto')
    if setting == 'reference':
      return ['reference']
    if setting != 'auto':
      raise ValueError(f'${KERNELS_ENV}={setting!r}: use auto (the platform\'s kernels) or reference')
    return [name for name in self.preference.get(jax.default_backend(), ('reference',)) if name in self.implementations]

  def warn_fallback(self, chosen, reasons):
    """One UserWarning per distinct (skipped implementations and reasons, chosen one)."""
    self.warn_once(f'{self.primitive} falls back to {chosen!r}, skipping ' + '; '.join(reasons))

  def checked(self, name):
    """The implementation `name`, after warning when it is an interpret mode that can hang here."""
    threads = cpu_pool_threads()
    if name.endswith('_interpret') and jax.default_backend() == 'cpu' and threads < INTERPRET_MIN_CPU_THREADS:
      self.warn_once(f'{name} can hang with {threads} XLA CPU threads (interpret mode blocks one per kernel thread); '
                     f'set PJRT_NPROC={2 * INTERPRET_MIN_CPU_THREADS} in the environment before JAX starts')
    return self.implementations[name]

  def warn_once(self, message):
    if message not in self.warned_fallbacks:
      self.warned_fallbacks.add(message)
      warnings.warn(message, UserWarning, stacklevel=6)  # the caller of the public function


def cpu_pool_threads():
  """Threads of XLA's CPU pool, as the CPU backend sizes it."""
  for name in ('PJRT_NPROC', 'NPROC'):
    value = os.environ.get(name, '')
    if value.isdigit():
      return int(value)
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


@functools.cache
def shared_lowering(kernel_vjp, static_args=2):
  """`kernel_vjp(*static, *arrays)` behind one jax.jit, its first `static_args` arguments
  static: under an outer jit, every call with the same shapes (the layers of a model)
  lowers to a call of one function, so each kernel is traced and lowered once per program
  instead of once per layer (a Mosaic GPU kernel takes about 0.4 s to lower)."""
  return jax.jit(kernel_vjp, static_argnums=tuple(range(static_args)))
