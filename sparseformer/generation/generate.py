"""Generating from a batch of prompts: one prefill (the training kernels over the prompts,
filling each layer's cache), then one jitted decode step per token, every row one new
token a step, with fixed shapes: a step compiles once for a batch size, prompt bucket and
cache length, not once per token.

Prompts of different lengths are right-padded to a bucket (the next power of two, at
least the attention block size); each row's tokens keep positions 0, 1, ... and its cache
slots its own. A row stops at a stop token (kept as its last token) or after
`max_new_tokens`; rows that stopped ride along until every row has.
"""

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparseformer import sharding
from sparseformer.errors import UserError
from sparseformer.generation.sampling import Sampling, next_tokens


@dataclasses.dataclass
class Generation:
  """What `generate` returns: per row the generated tokens (a stop token included as the
  last) and why it ended ('stop' or 'length'); the timings of the three phases."""
  tokens: list
  finish_reasons: list
  prompt_lengths: list
  compile_seconds: float
  prefill_seconds: float
  decode_seconds: float
  decode_steps: int
  cache_bytes: int  # every layer's cache, all rows

  @property
  def new_tokens(self):
    return sum(len(t) for t in self.tokens)

  @property
  def decode_tokens_per_second(self):
    """Tokens the decode steps produced (the first token of each row comes from the
    prefill), over the decode steps' time."""
    produced = self.new_tokens - sum(1 for t in self.tokens if t)
    return produced / self.decode_seconds if self.decode_seconds > 0 else float('nan')

  def summary(self):
    return (f'{len(self.tokens)} rows, {sum(self.prompt_lengths)} prompt tokens, {self.new_tokens} new tokens; '
            f'cache {self.cache_bytes / 2**20:.1f} MiB; compile {self.compile_seconds:.2f} s, prefill {self.prefill_seconds:.3f} s, '
            f'decode {self.decode_steps} steps in {self.decode_seconds:.3f} s '
            f'({self.decode_tokens_per_second:.1f} tokens/s)')


def prompt_bucket(longest, block_size):
  """The padded prompt length: the next power of two >= longest, at least block_size."""
  return max(block_size, 1 << max(0, math.ceil(math.log2(max(longest, 1)))))


def tree_bytes(tree):
  return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def round_up(value, multiple):
  return -(-value // multiple) * multiple


class Generator:
  """Jitted prefill and decode steps of one model (graphdef and its arrays {'params',
  'mechanism_state'}); on a mesh, the kernels run per device and the cache is split over
  the batch like the activations."""

  def __init__(self, graphdef, model_arrays, *, vocab_size, mesh=None, rules=()):
    model = nnx.merge(graphdef, model_arrays['params'], model_arrays['mechanism_state'])
    problems = model.decoding_problems()
    if problems:
      raise UserError('cannot generate: ' + '; '.join(problems))
    self.graphdef, self.arrays = graphdef, model_arrays
    self.dims = model.dims
    self.vocab_size = vocab_size
    self.mesh, self.rules = mesh, tuple(rules)
    self._compiled = {}

  # --------------------------------------------------------------------------------------
  # the jitted functions

  def _model(self, arrays):
    return nnx.merge(self.graphdef, arrays['params'], arrays['mechanism_state'])

  def _prefill(self, arrays, prompts, lengths, key, *, max_len, sampling):
    model = self._model(arrays)
    cache = self._place(model.init_cache(prompts.shape[0], max_len))
    logits, cache = model.prefill(prompts, lengths, cache)
    return next_tokens(logits, key, sampling, self.vocab_size), self._place(cache)

  def _decode(self, arrays, cache, tokens, positions, key, *, sampling):
    logits, cache = self._model(arrays).decode(tokens, positions, cache)
    return next_tokens(logits, key, sampling, self.vocab_size), self._place(cache)

  def _place(self, cache):
    """The cache split over the batch (keys and values also over kv heads where their
    head count divides), on a mesh."""
    if self.mesh is None:
      return cache
    placement = sharding.ActivationPlacement(self.mesh, self.rules)

    def constrain(path, leaf):
      name = str(getattr(path[-1], 'key', '')) if path else ''
      axes = ('batch', None, 'kv_heads', None) if name in ('k', 'v') and leaf.ndim == 4 else ('batch',)
      axes = axes + (None,) * (leaf.ndim - len(axes))
      spec = placement.spec(*axes)
      spec = jax.sharding.PartitionSpec(*(entry if dim % placement.axis_size(entry) == 0 else None
                                          for dim, entry in zip(leaf.shape, spec)))
      return jax.lax.with_sharding_constraint(leaf, jax.sharding.NamedSharding(self.mesh, spec))
    return jax.tree_util.tree_map_with_path(constrain, cache)

  def _placed(self, fn):
    if self.mesh is None:
      return fn
    return sharding.with_activation_placement(fn, self.mesh, self.rules)

  def compiled(self, batch, prompt_len, max_len, sampling):
    """(prefill, decode) compiled for these shapes (cached), and the seconds compiling took."""
    shapes = (batch, prompt_len, max_len, sampling)
    if shapes in self._compiled:
      return self._compiled[shapes], 0.0
    start = time.perf_counter()
    key = jax.random.key(0)
    ints = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    prefill = jax.jit(self._placed(lambda a, p, n, k: self._prefill(a, p, n, k, max_len=max_len, sampling=sampling)))
    prefill = prefill.lower(self.arrays, ints(batch, prompt_len), ints(batch), key).compile()
    cache_shape = prefill.out_info[1]
    decode = jax.jit(self._placed(lambda a, c, t, p, k: self._decode(a, c, t, p, k, sampling=sampling)),
                     donate_argnums=1)
    decode = decode.lower(self.arrays, cache_shape, ints(batch), ints(batch), key).compile()
    self._compiled[shapes] = (prefill, decode)
    return (prefill, decode), time.perf_counter() - start

  def device_loop(self, steps, sampling=Sampling()):
    """A jitted fn(arrays, cache, tokens, positions, key) -> (tokens, cache) running
    `steps` decode steps on the device, each feeding the token it chose (no host in the
    loop: what a step costs the device, for benchmarks)."""
    def run(arrays, cache, tokens, positions, key):
      def step(i, carry):
        tokens, cache = carry
        return self._decode(arrays, cache, tokens, positions + i, jax.random.fold_in(key, i), sampling=sampling)
      return jax.lax.fori_loop(0, steps, step, (tokens, cache))
    return jax.jit(self._placed(run), donate_argnums=1)

  # --------------------------------------------------------------------------------------

  def shapes(self, prompts, max_new_tokens):
    """(rows, padded prompt length, cache length) that `prompts` compile for."""
    block = self.dims.attention.block_size
    prompt_len = prompt_bucket(max(len(p) for p in prompts), block)
    return round_up(len(prompts), self.batch_multiple()), prompt_len, round_up(prompt_len + max_new_tokens, block)

  def batch_multiple(self):
    """Rows are padded to a multiple of the mesh's batch shards."""
    if self.mesh is None:
      return 1
    placement = sharding.ActivationPlacement(self.mesh, self.rules)
    return placement.axis_size(placement.spec('batch')[0])

  def generate(self, prompts, *, max_new_tokens, sampling=Sampling(), seed=0, stop_tokens=(), stop_texts=(),
               detokenize=None, on_step=None, pad_id=0):
    """Generation of up to `max_new_tokens` tokens after each prompt (a list of token id
    sequences). A row stops at any of `stop_tokens`, or once its text (`detokenize` of
    its new tokens) contains one of `stop_texts`. on_step(step, tokens [B] int, live [B]
    bool), if given, sees each step's tokens as they are made (live: rows still
    generating, whose token counts)."""
    if stop_texts and detokenize is None:
      raise ValueError('stop_texts need detokenize')
    check_request(prompts, max_new_tokens, sampling)
    rows = len(prompts)
    batch, prompt_len, max_len = self.shapes(prompts, max_new_tokens)
    lengths = np.array([len(p) for p in prompts] + [1] * (batch - rows), np.int32)
    padded = np.full((batch, prompt_len), pad_id, np.int32)
    for row, prompt in enumerate(prompts):
      padded[row, :len(prompt)] = prompt
    (prefill, decode), compile_seconds = self.compiled(batch, prompt_len, max_len, sampling)
    base_key = jax.random.key(seed)

    start = time.perf_counter()
    tokens, cache = prefill(self.arrays, padded, lengths, jax.random.fold_in(base_key, 0))
    tokens = np.asarray(tokens)
    prefill_seconds = time.perf_counter() - start

    stops = Stops(set(int(t) for t in stop_tokens), tuple(stop_texts), detokenize)
    generated = [[] for _ in range(rows)]
    finish = [None] * rows
    positions = lengths.copy()
    steps = 0
    start = time.perf_counter()
    for step in range(max_new_tokens):
      live = np.array([finish[r] is None for r in range(rows)])
      record(tokens[:rows], live, generated, finish, stops, max_new_tokens)
      if on_step is not None:
        on_step(step, tokens[:rows], live)
      if all(f is not None for f in finish):
        break
      tokens, cache = decode(self.arrays, cache, tokens, positions, jax.random.fold_in(base_key, step + 1))
      tokens = np.asarray(tokens)
      positions = positions + 1
      steps += 1
    return Generation(generated, finish, [len(p) for p in prompts], compile_seconds, prefill_seconds,
                      time.perf_counter() - start, steps, tree_bytes(prefill.out_info[1]))


@dataclasses.dataclass(frozen=True)
class Stops:
  """When a row stops: at one of `tokens`, or when its text contains one of `texts`."""
  tokens: set
  texts: tuple
  detokenize: object

  def reached(self, row_tokens):
    if row_tokens[-1] in self.tokens:
      return True
    return bool(self.texts) and any(text in self.detokenize(row_tokens) for text in self.texts)


def record(tokens, live, generated, finish, stops, max_new_tokens):
  """Appends each live row's token; marks rows that hit a stop or the length."""
  for row in np.flatnonzero(live):
    generated[row].append(int(tokens[row]))
    if stops.reached(generated[row]):
      finish[row] = 'stop'
    elif len(generated[row]) >= max_new_tokens:
      finish[row] = 'length'


def check_request(prompts, max_new_tokens, sampling):
  """UserError for a request that cannot run."""
  if not prompts:
    raise UserError('no prompt to generate from')
  empty = [i for i, p in enumerate(prompts) if len(p) == 0]
  if empty:
    raise UserError(f'prompt {empty[0]} is empty: give at least one token')
  if max_new_tokens < 1:
    raise UserError(f'max_new_tokens={max_new_tokens}: use a positive count')
  sampling.check()


def generate(graphdef, model_arrays, prompts, *, vocab_size, mesh=None, rules=(), **settings):
  """Generation of `prompts` (token id sequences) by one model: the library entry of
  `python -m sparseformer.cli.generate`; `settings` as Generator.generate's (a Generator
  compiles once per shape; keep one to call it again)."""
  generator = Generator(graphdef, model_arrays, vocab_size=vocab_size, mesh=mesh, rules=rules)
  return generator.generate(prompts, **settings)
