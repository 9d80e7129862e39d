"""Launch settings of the GLA Triton kernels (triton_gpu.py): the chunk and sub-chunk sizes
and, per kernel, num_warps, num_stages and the Dk / Dv block sizes it uses.

The defaults are below. SPARSEFORMER_GLA_LAUNCH overrides them without code edits; it is
read when a kernel is traced (a jitted function keeps the settings it was traced with), e.g.

    SPARSEFORMER_GLA_LAUNCH='chunk=128;chunk_dqk_kernel:num_warps=8,BK=32;chunk_states:BK=64,BV=64'
    SPARSEFORMER_GLA_LAUNCH='*:num_warps=8,BK=128;chunk_dqk:num_warps=4'
    SPARSEFORMER_GLA_LAUNCH='chunk_scores:unroll=1;chunk_dqk:unroll=1'
    SPARSEFORMER_GLA_LAUNCH='chunk_scores:blocks=1,BK=32'

';' separates entries, applied in order; `chunk=` and `sub_chunk=` stand alone, the others
are `kernel:key=value,...`, the kernel named with or without its `_kernel` suffix, or `*`
for every kernel (each taking the keys it has). A block size larger than the head dim is
clipped to it. Unknown kernels or keys, and values the kernels cannot take, raise
ValueError naming what is valid.
"""

import dataclasses
import functools
import os

ENV = 'SPARSEFORMER_GLA_LAUNCH'
NUM_WARPS = (1, 2, 4, 8, 16)


@dataclasses.dataclass(frozen=True)
class KernelLaunch:
  num_warps: int = 4
  num_stages: int = 3  # jax_triton's default
  BK: int = 64  # Dk columns per program, or per step of the kernel's loop over Dk
  BV: int = 64  # likewise for Dv
  unroll: int = 0  # 1: the loop over a sub-chunk's rows unrolled (OPTIONS)
  blocks: int = 0  # chunk_scores, 1: one program per [sub-chunk, sub-chunk] block of A, looping over Dk
  halves: int = 0  # chunk_scores with blocks=1, 1: a diagonal block's walk two rows a step (one per half)
  two_walks: int = 0  # chunk_dqk, 1: within a sub-chunk, dq and dk in two walks that sum nothing across the tile


# The block sizes each kernel reads; the defaults of the kernels that predate the settings
# are the values they had (sequential passes 32 wide, for more programs in flight).
BLOCKS = {
    'decayed_qk_kernel': ('BK',),  # grid (N, B*H, Dk/BK)
    'chunk_states_kernel': ('BK', 'BV'),  # grid (B*H, Dk/BK, Dv/BV), sequential over chunks
    'chunk_scores_kernel': ('BK',),  # grid (N * C/SUB, B*H, Dk/BK); Dk/BK > 1: float32 parts, summed;
    # blocks=1: chunk_score_blocks_kernel, grid (N * (C/SUB)^2, B*H), a loop over Dk/BK blocks
    'chunk_output_kernel': ('BK', 'BV'),  # grid (N, B*H, Dv/BV), loop over Dk
    'state_grads_kernel': ('BK', 'BV'),  # like chunk_states, backwards
    'chunk_dscores_kernel': ('BV',),  # grid (N, B*H), loop over Dv
    'chunk_dqk_kernel': ('BK', 'BV'),  # grid (N * C/SUB, B*H, Dk/BK), loop over Dv
    'chunk_dv_kernel': ('BK', 'BV'),  # grid (N, B*H, Dv/BV), loop over Dk
    'log_decay_grads_kernel': ('BK',),  # grid (N, B*H, Dk/BK)
}
# Other keys a kernel takes (0 or 1): `unroll` where a loop walks a sub-chunk's rows;
# `blocks` picks chunk_scores' other form (BLOCKS above), `halves` that form's paired-row
# walk; `two_walks` chunk_dqk's other walk.
OPTIONS = {'chunk_scores_kernel': ('unroll', 'blocks', 'halves'), 'chunk_dqk_kernel': ('unroll', 'two_walks')}
DEFAULTS = {
    'chunk_scores_kernel': KernelLaunch(BK=256),  # the whole Dk (clipped to it): no parts to add
    'chunk_states_kernel': KernelLaunch(BK=32, BV=32),
    'state_grads_kernel': KernelLaunch(BK=32, BV=32),
}


@dataclasses.dataclass(frozen=True)
class LaunchSettings:
  chunk: int = 64
  sub_chunk: int = 16
  overrides: tuple = ()  # ((kernel name, KernelLaunch), ...) for kernels off their default

  def kernel(self, name):
    return dict(self.overrides).get(name, DEFAULTS.get(name, KernelLaunch()))

  def block(self, name, key, head_dim):
    """The kernel's `key` block size for a head dim (clipped to it)."""
    assert key in BLOCKS[name], (name, key)
    return min(getattr(self.kernel(name), key), head_dim)


def _integer(text, where):
  try:
    return int(text)
  except ValueError:
    raise ValueError(f'{ENV}: {where}={text!r} is not an integer') from None


def _power_of_two(value, lowest, where):
  if value < lowest or value & (value - 1):
    raise ValueError(f'{ENV}: {where}={value} must be a power of two >= {lowest}')


def _assignments(where, text):
  """{key: int} of 'key=value,...', each value checked."""
  values = {}
  for assignment in filter(None, (a.strip() for a in text.split(','))):
    key, _, value = (part.strip() for part in assignment.partition('='))
    values[key] = _integer(value, f'{where}:{key}')
    if key in ('BK', 'BV'):
      _power_of_two(values[key], 16, f'{where}:{key}')
    elif key == 'num_warps' and values[key] not in NUM_WARPS:
      raise ValueError(f'{ENV}: {where}:num_warps={values[key]} must be one of {NUM_WARPS}')
    elif key == 'num_stages' and values[key] < 1:
      raise ValueError(f'{ENV}: {where}:num_stages must be >= 1')
    elif key in ('unroll', 'blocks', 'halves', 'two_walks') and values[key] not in (0, 1):
      raise ValueError(f'{ENV}: {where}:{key}={values[key]} must be 0 or 1')
  return values


def _kernel_names(name):
  """The kernels an entry names: one (with or without the _kernel suffix), or '*' for all."""
  if name == '*':
    return list(BLOCKS)
  for candidate in (name, name + '_kernel'):
    if candidate in BLOCKS:
      return [candidate]
  raise ValueError(f'{ENV}: unknown kernel {name!r}; kernels: *, {", ".join(BLOCKS)}')


def _apply(kernels, name, values):
  """Sets `values` on the kernels `name` names ('*': each takes the keys it has)."""
  names = _kernel_names(name)
  keys = lambda kernel: ('num_warps', 'num_stages') + BLOCKS[kernel] + OPTIONS.get(kernel, ())  # noqa: E731
  for key in values:
    if not any(key in keys(n) for n in names):
      raise ValueError(f'{ENV}: {name} has no setting {key!r}; it takes {", ".join(keys(names[0]))}')
  for n in names:
    taken = {k: v for k, v in values.items() if k in keys(n)}
    kernels[n] = dataclasses.replace(kernels.get(n, LaunchSettings().kernel(n)), **taken)


def parse(text):
  """LaunchSettings from the SPARSEFORMER_GLA_LAUNCH syntax ('' gives the defaults); entries
  apply in order, so '*:num_warps=8;chunk_dqk:num_warps=4' sets all but one kernel to 8."""
  shape, kernels = {}, {}
  for entry in filter(None, (e.strip() for e in text.split(';'))):
    name, colon, assignments = entry.partition(':')
    if colon:
      _apply(kernels, name.strip(), _assignments(name.strip(), assignments))
      continue
    key, _, value = (part.strip() for part in entry.partition('='))
    if key not in ('chunk', 'sub_chunk'):
      raise ValueError(f'{ENV}: {entry!r} is neither chunk=, sub_chunk= nor kernel:key=value')
    shape[key] = _integer(value, key)
  settings = LaunchSettings(**shape, overrides=tuple(sorted(kernels.items())))
  scores = settings.kernel('chunk_scores_kernel')
  if scores.halves and not scores.blocks:
    raise ValueError(f'{ENV}: chunk_scores:halves=1 needs blocks=1 (it is a form of chunk_score_blocks_kernel)')
  _power_of_two(settings.sub_chunk, 16, 'sub_chunk')
  _power_of_two(settings.chunk, settings.sub_chunk, 'chunk')
  if settings.chunk > 128:
    raise ValueError(f'{ENV}: chunk={settings.chunk}: at most 128 (the kernels hold [chunk, chunk] tiles)')
  return settings


@functools.lru_cache(maxsize=None)
def _from_text(text):
  return parse(text)


def from_environment():
  """The settings SPARSEFORMER_GLA_LAUNCH names (parsed once per distinct value)."""
  return _from_text(os.environ.get(ENV, ''))
