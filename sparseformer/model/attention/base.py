"""What every attention mechanism shares: the interface it implements, the helpers it
uses, the placement of its kernels on a mesh, and the registry.

A mechanism is one class in one module of this package (docs/adding_a_mechanism.md
walks through one), registered by name with `@register('name')`. It declares:

  argument_meaning   what N in `name:N` is (a positive integer), e.g. ('size', 256);
                     None: the mechanism takes no argument
  options_section    its options live at model.attention.<options_section>.* ('': directly
  OPTIONS            in model.attention), each an Option(default, doc, check): config.py
                     builds the schema from them and validates them through
  validate_options   the message for values that cannot work, or None
  rotary             it reads q and k rotated by RoPE (False: the layer skips RoPE, q = k = None)
  extra_inputs       what else the layer passes: 'pre_rope' = (q, k) before RoPE,
                     'layer_input' = x [B, T, d_model], the normed input the layer projects
  placement          how its kernels run on a multi-device mesh (see `kernel` below)

and implements `forward(q, k, v, ctx, **extra_inputs) -> (y, aux)` with q [B, T, H, D],
k and v [B, T, Hkv, D], y [B, T, H, D]; aux holds auxiliary losses (added to the
training loss) and statistics (logged), never hidden globals.

Decoding (docs/generation.md) goes through `init_cache`, `prefill` and `decode`. A
softmax mechanism that reads a key/value cache implements only `decode_visible` (which
cached slots the new query sees) and, if it keeps fewer than all tokens, `cache_slots`;
one with a cache of another kind (a recurrent state) overrides the three.
"""

import dataclasses
import functools
import typing

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from sparseformer.errors import UserError, closest_match
from sparseformer.model.attention import context_parallel, kv_cache


class MechanismState(nnx.Variable):
  """Non-gradient state of a mechanism (k-means centroids, EMA counts): checkpointed,
  updated inside the train step, never touched by the optimizer."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionContext:
  """Per-token information every layer needs, computed once per forward pass."""
  positions: jax.Array  # [B, T] position within the document
  segment_ids: jax.Array | None  # [B, T] document id within the row, 0 is padding; None: each row is one document
  cos: jax.Array  # [B, T, head_dim // 2] rotary angles
  sin: jax.Array
  logit_scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
  training: bool = dataclasses.field(default=False, metadata=dict(static=True))  # False: leave mechanism state alone


def no_aux():
  return {'losses': {}, 'stats': {}}


def token_weights(segment_ids, batch, length):
  """[B, T] float32: 1 for tokens, 0 for padding (segment id 0)."""
  if segment_ids is None:
    return jnp.ones((batch, length), jnp.float32)
  return (segment_ids != 0).astype(jnp.float32)


def softmax_scale(q, ctx):
  """The logit scale of softmax attention: 1 / sqrt(head_dim), times RoPE scaling's
  attention factor (YaRN's; 1 otherwise)."""
  return ctx.logit_scale / q.shape[-1] ** 0.5


# ---------------------------------------------------------------------------------------
# Options


@dataclasses.dataclass(frozen=True)
class Option:
  """One option of a mechanism. `default` fixes its type in the config; `doc` is one line;
  `check(value)` says whether a value can work, `advice` what to use instead. With
  `choices` the value must be one of them (and the advice names them)."""
  default: typing.Any
  doc: str
  check: typing.Callable | None = None
  advice: str = ''
  choices: tuple = ()

  def problem(self, path, value):
    """The message for `value` at config `path`, or None."""
    if self.choices and value not in self.choices:
      return f'{path}={value!r}: use {one_of(self.choices)}'
    if self.check is not None and not self.check(value):
      return f'{path}={value!r}: {self.advice}'
    return None


def one_of(choices):
  """'a or b' for two choices, 'a, b, c' for more."""
  return ' or '.join(choices) if len(choices) == 2 else ', '.join(choices)


def first_problem(checks, prefix=''):
  """The first message of (ok, message) pairs whose check failed, with `prefix`, or None."""
  return next((prefix + message for ok, message in checks if not ok), None)


# ---------------------------------------------------------------------------------------
# Kernel placement on a multi-device mesh

# XLA does not partition a kernel call (Pallas, Triton): on a mesh of several devices each
# call must run per device. A mechanism states how, in its `placement`:
PER_ROW_AND_HEAD = 'per_row_and_head'  # its kernel calls are methods marked @kernel(...)
CUSTOM = 'custom'  # it overrides sharded_forward (context parallelism of its own)
XLA = 'xla'  # it calls no kernel: plain jnp, which XLA partitions

# Layouts of kernel arguments: each dim named by a logical axis of config.mesh.rules
# ('batch', 'heads', 'kv_heads', 'length'), '.' for a dim that stays whole.
QUERIES = context_parallel.Q_NAMES  # [B, T, H, D], whole along the sequence
KEYS = context_parallel.KV_NAMES  # [B, T, Hkv, D], keys and values
ROWS = 'batch .'  # [B, T] per-token data of a row (segment ids)
HEAD_BLOCKS = 'batch heads . .'  # [B, H, nQ, nK] per-head block choices


def plan_layout(head_name):
  """The layout of a BlockSparsePlan argument whose plan heads are `head_name`'s (a plan of
  one head, or of one row for every row, stays whole)."""
  return lambda plan, args: context_parallel.plan_names(plan, args[0].shape[0], head_name)


def kernel(*layouts, out):
  """Marks a mechanism method that calls a kernel: on a mesh of several devices the method
  runs per device over rows and heads (shard_map), where the sequence is split gathering
  it whole (one warning per mechanism). It must be exact per batch row and head.

  `layouts` name the dims of each positional argument after self (a layout string; a
  pytree of them for a pytree argument; or a function (argument, arguments) -> that);
  a None argument stays None. Keyword arguments are static (scale, block sizes) and pass
  through. `out` names the result's dims likewise. Every array the method uses must come
  in as an argument: it runs on each device's block of them."""
  def decorate(method):
    @functools.wraps(method)
    def placed(self, *args, **static):
      names = tuple(None if arg is None else layout(arg, args) if callable(layout) else layout
                    for layout, arg in zip(layouts, args, strict=True))
      fn = functools.partial(method, self, **static)
      return context_parallel.per_row_and_head(self.name, fn, args, names, out)
    placed.kernel_layouts = layouts
    return placed
  return decorate


# ---------------------------------------------------------------------------------------
# The interface

INPUT_DOCS = {'pre_rope': 'pre_rope=(q, k), the projections before RoPE',
              'layer_input': 'layer_input=x, the normed input the layer projects'}


class Mechanism(nnx.Module):
  """Base class of the mechanisms (see the module docstring for what a subclass declares).
  Built as cls(dims, layer_index, rngs); called as mechanism(q, k, v, ctx, **inputs)."""

  argument_meaning = None  # (what N is, an example N) for `name:N` with a positive integer N
  options_section = None  # model.attention.<section> holds OPTIONS; '': model.attention itself
  OPTIONS = {}  # name -> Option
  rotary = True  # q, k arrive rotated by RoPE; False: as None (RoPE is not computed)
  extra_inputs = ()  # of INPUT_DOCS: what else the layer passes by keyword
  placement = PER_ROW_AND_HEAD  # PER_ROW_AND_HEAD, CUSTOM or XLA (see above)

  def __init__(self, dims, layer_index, rngs):
    self.layer_index = layer_index
    self.options = dims.attention  # model.attention: the shared options and each mechanism's section
    self.argument = self.parse_argument(dims.layer_mechanisms[layer_index])

  @property
  def block_size(self):
    return self.options.block_size

  @property
  def needs_pre_rope(self):
    return 'pre_rope' in self.extra_inputs

  @property
  def needs_layer_input(self):
    return 'layer_input' in self.extra_inputs

  def layer_inputs(self, **available):
    """The keyword inputs this mechanism declares, picked from what the layer has."""
    return {name: available[name] for name in self.extra_inputs}

  def __call__(self, q, k, v, ctx, **inputs):
    missing = [name for name in self.extra_inputs if inputs.get(name) is None]
    if missing:
      raise ValueError(f'the {self.name} mechanism needs ' + ' and '.join(INPUT_DOCS[n] for n in missing))
    placement = context_parallel.placement_for_kernels() if self.placement == CUSTOM else None
    if placement is not None:
      return self.sharded_forward(placement, q, k, v, ctx, **inputs)
    return self.forward(q, k, v, ctx, **inputs)

  def forward(self, q, k, v, ctx, **inputs):
    """(y, aux) of the layer's attention."""
    raise NotImplementedError

  def sharded_forward(self, placement, q, k, v, ctx, **inputs):
    """forward under a placement of several devices, for `placement = CUSTOM`: the
    mechanism runs its kernels per device itself (context_parallel.per_device)."""
    raise NotImplementedError

  # --------------------------------------------------------------------------------------
  # decoding: a cache per layer, filled by prefill, advanced one token per row by decode

  @classmethod
  def can_decode(cls):
    """Whether the mechanism implements decoding (decode_visible, or decode itself)."""
    return cls.decode_visible is not Mechanism.decode_visible or cls.decode is not Mechanism.decode

  def decode_problem(self):
    """Why this layer cannot decode with its options (its training forward reads later
    tokens, say), or None. Subclasses add their options' reasons."""
    return None if self.can_decode() else f'the {self.name} mechanism has no decoding yet'

  def check_decodable(self):
    """UserError with decode_problem's reason, if there is one."""
    problem = self.decode_problem()
    if problem:
      raise UserError(problem)

  def cache_slots(self, max_len):
    """Key/value slots per row the cache needs for rows of up to `max_len` tokens."""
    return max_len

  def init_cache(self, batch, max_len, kv_heads, head_dim, dtype):
    """An empty cache (a pytree of arrays) for `batch` rows of up to `max_len` tokens."""
    return kv_cache.empty(batch, self.cache_slots(max_len), kv_heads, head_dim, dtype)

  def prefill(self, q, k, v, ctx, cache, lengths, **inputs):
    """(y, cache) of prompts right-padded to T: the training forward over them (ctx's
    segment ids mark the padding) and the cache holding their `lengths` [B] tokens.
    Padding only follows each prompt, and no query sees a later key, so this forward
    runs as over unpacked rows (segment ids None: cuDNN for dense layers on a GPU);
    the padding's outputs are never read."""
    y, _ = self(q, k, v, dataclasses.replace(ctx, segment_ids=None), **inputs)
    return y, kv_cache.fill(cache, k, v, lengths)

  def decode(self, q, k, v, ctx, cache, **inputs):
    """(y [B, 1, H, D], cache) of one new token per row, at ctx.positions [B, 1]."""
    positions = ctx.positions[:, 0]
    cache = kv_cache.append(cache, k, v, positions)
    return kv_cache.attend(q, cache, self.decode_visible(cache, positions), softmax_scale(q, ctx)), cache

  def decode_visible(self, cache, positions):
    """bool [B, S], [B, Hkv, S] or [B, H, S]: the cache slots the query at `positions`
    [B] attends (kv_cache.attend), the same keys its training forward would."""
    raise NotImplementedError(f'the {self.name} mechanism has no decoding')

  # --------------------------------------------------------------------------------------
  # the `name:argument` spec

  @classmethod
  def check_argument(cls, argument):
    """The error message for a bad `name:argument` spec of this mechanism, or None."""
    if cls.argument_meaning is None:
      return None if argument is None else f'{cls.name} takes no argument'
    if argument is None or not argument.isdigit() or int(argument) < 1:
      meaning, example = cls.argument_meaning
      return f'{cls.name} needs a positive {meaning}, e.g. {cls.name}:{example}'
    return None

  @classmethod
  def parse_argument(cls, spec):
    """The argument of a checked spec as the mechanism uses it: an int, or None."""
    argument = split_spec(spec)[1]
    return None if cls.argument_meaning is None else int(argument)

  # --------------------------------------------------------------------------------------
  # options

  @classmethod
  def options(cls):
    """ConfigDict of the options' defaults (the schema of model.attention.<options_section>)."""
    return ml_collections.ConfigDict({name: option.default for name, option in cls.OPTIONS.items()})

  @classmethod
  def options_in(cls, attention):
    """This mechanism's options within model.attention (None if it declares none)."""
    if cls.options_section is None:
      return None
    return attention if cls.options_section == '' else attention[cls.options_section]

  @classmethod
  def option_path(cls, name):
    return '.'.join(['model.attention'] + ([cls.options_section] if cls.options_section else []) + [name])

  @classmethod
  def option_docs(cls):
    """{config path: one-line doc} of the options."""
    return {cls.option_path(name): option.doc for name, option in cls.OPTIONS.items()}

  @classmethod
  def validate_options(cls, options, model_cfg, arguments):
    """The message for option values that cannot work, or None. Every option's own check
    runs whether or not a layer uses the mechanism; checks against the model (heads) or
    the layers' arguments run for the `arguments` (parsed) of the layers that use it,
    none when unused. Subclasses add those, after calling this."""
    return next((problem for problem in (option.problem(cls.option_path(name), options[name])
                                         for name, option in cls.OPTIONS.items()) if problem), None)

  # --------------------------------------------------------------------------------------
  # cost

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    """Nominal forward FLOPs per token of this layer's attention at `seq_len` (argument
    parsed, options model.attention): the score and value matmuls of all query heads
    over the keys each query attends (projections excluded), averaged over the positions
    of one document filling the row; the work of choosing the keys (gates, routers)
    included where it is not negligible. The comparison command puts mechanisms on this
    common axis. Default: causal dense."""
    return softmax_flops(dims.num_heads, dims.head_dim, mean_causal_keys(seq_len))


def mean_causal_keys(seq_len, window=None):
  """Keys a causal query sees, averaged over positions 0..seq_len-1 of one document, within
  a window of `window` keys (itself included) if given."""
  w = seq_len if window is None else max(1, min(window, seq_len))
  return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def softmax_flops(heads, head_dim, keys):
  """q.k scores and probabilities x values: 2 matmuls of 2 x head_dim FLOPs per key and head."""
  return 4 * heads * head_dim * keys


def layer_attention_flops(dims, seq_len):
  """attention_flops of every layer's mechanism, as a list."""
  flops = []
  for spec in dims.layer_mechanisms:
    cls = get_mechanism(spec)
    flops.append(float(cls.attention_flops(cls.parse_argument(spec), dims.attention, dims, seq_len)))
  return flops


# ---------------------------------------------------------------------------------------
# The registry

_REGISTRY = {}


def register(name):
  """Class decorator: makes a mechanism selectable as `model.attention.kind=name`."""
  def wrap(cls):
    if name in _REGISTRY:
      raise ValueError(f'mechanism {name!r} registered twice')
    check_declarations(name, cls)
    _REGISTRY[name] = cls
    cls.name = name
    return cls
  return wrap


def check_declarations(name, cls):
  """TypeError for a mechanism class whose declarations cannot work (at import, so that
  its author sees it first)."""
  unknown = [i for i in cls.extra_inputs if i not in INPUT_DOCS]
  if unknown:
    raise TypeError(f'mechanism {name!r}: unknown extra_inputs {unknown}; known: {", ".join(INPUT_DOCS)}')
  if cls.OPTIONS and cls.options_section is None:
    raise TypeError(f'mechanism {name!r} declares OPTIONS but no options_section')
  for other in _REGISTRY.values():
    if cls.OPTIONS and other.OPTIONS and other.options_section == cls.options_section and (
        cls.options_section or set(other.OPTIONS) & set(cls.OPTIONS)):
      raise TypeError(f'mechanism {name!r}: options section {cls.options_section!r} is {other.name!r}\'s')
  kernels = [a for a in dir(cls) if hasattr(getattr(cls, a, None), 'kernel_layouts')]
  if cls.placement == PER_ROW_AND_HEAD and not kernels:
    raise TypeError(f'mechanism {name!r}: placement {PER_ROW_AND_HEAD} but no method is marked @kernel(...): '
                    f'its kernel calls would not be split on a mesh of several devices (placement {XLA} if it '
                    'calls no kernel, see base.py)')
  if cls.placement == CUSTOM and cls.sharded_forward is Mechanism.sharded_forward:
    raise TypeError(f'mechanism {name!r}: placement {CUSTOM} needs a sharded_forward')
  if cls.placement not in (PER_ROW_AND_HEAD, CUSTOM, XLA):
    raise TypeError(f'mechanism {name!r}: placement {cls.placement!r}; use {PER_ROW_AND_HEAD}, {CUSTOM} or {XLA}')


def mechanism_names():
  return tuple(_REGISTRY)


def mechanism_classes():
  """The registered classes, in registration order (each name once)."""
  return tuple(_REGISTRY.values())


def split_spec(spec):
  """A layer's mechanism spec, `name` or `name:argument` (e.g. `window:256`), as (name, argument or None)."""
  name, _, argument = spec.partition(':')
  return name, (argument or None)


def get_mechanism(spec):
  """The class of a spec's mechanism; UserError for an unknown name or a bad argument."""
  name, argument = split_spec(spec)
  if name not in _REGISTRY:
    hint = closest_match(name, _REGISTRY)
    raise UserError(f'unknown attention mechanism {name!r}' + (f' (did you mean {hint!r}?)' if hint else '')
                    + f'; known: {", ".join(sorted(_REGISTRY))}')
  problem = _REGISTRY[name].check_argument(argument)
  if problem:
    raise UserError(f'attention spec {spec!r}: {problem}')
  return _REGISTRY[name]


# ---------------------------------------------------------------------------------------
# What config.py asks of the mechanisms


def add_options(attention_cfg):
  """Adds every registered mechanism's options to `attention_cfg` (model.attention)."""
  for cls in mechanism_classes():
    if not cls.OPTIONS:
      continue
    if cls.options_section == '':
      for key, value in cls.options().items():
        if key in attention_cfg:
          raise TypeError(f'mechanism {cls.name!r}: option {key!r} is a field of model.attention already')
        attention_cfg[key] = value
    else:
      attention_cfg[cls.options_section] = cls.options()


def option_docs():
  """{config path: one-line doc} of every registered mechanism's options."""
  return {path: doc for cls in mechanism_classes() for path, doc in cls.option_docs().items()}


def options_problem(model_cfg, layer_specs):
  """The first message of every registered mechanism's validate_options, or None
  (`layer_specs`: the specs some layer may use, checked already)."""
  for cls in mechanism_classes():
    if not cls.OPTIONS:
      continue
    arguments = tuple(cls.parse_argument(spec) for spec in layer_specs if split_spec(spec)[0] == cls.name)
    problem = cls.validate_options(cls.options_in(model_cfg.attention), model_cfg, arguments)
    if problem:
      return problem
  return None
