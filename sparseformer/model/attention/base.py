"""What every attention mechanism shares: its inputs, its outputs and the registry.

A mechanism receives projected, rotated queries, keys and values and decides which keys
each query sees. It returns the attended values and an `aux` dict of auxiliary losses
(added to the training loss) and statistics (logged), never hidden globals.
"""

import dataclasses

import jax
from flax import nnx

from sparseformer.errors import UserError, closest_match


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
  rng: jax.Array | None = None  # this step's key (fold_in(seed, step)); mechanisms fold in their layer
  logit_scale: float = dataclasses.field(default=1.0, metadata=dict(static=True))
  training: bool = dataclasses.field(default=False, metadata=dict(static=True))  # False: leave mechanism state alone


def no_aux():
  return {'losses': {}, 'stats': {}}


class Mechanism(nnx.Module):
  """Base class. Subclasses implement `__call__(q, k, v, ctx) -> (y, aux)` with
  q [B, T, H, D], k and v [B, T, Hkv, D], y [B, T, H, D]. A subclass that sets
  `needs_pre_rope` also receives pre_rope=(q, k) before rotation, and one that sets
  `needs_layer_input` receives layer_input=x [B, T, d_model], the normed input the layer
  projects (linear-attention layers compute decays and gates from it)."""

  needs_pre_rope = False
  needs_layer_input = False

  def __init__(self, dims, layer_index, rngs):
    self.layer_index = layer_index
    self.options = dims.attention
    self.argument = split_spec(dims.layer_mechanisms[layer_index])[1]

  @classmethod
  def check_argument(cls, argument):
    """The error message for a bad `name:argument` spec of this mechanism, or None."""
    return None if argument is None else f'{cls.name} takes no argument'

  def __call__(self, q, k, v, ctx):
    raise NotImplementedError

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    """Nominal forward FLOPs per token of this layer's attention at `seq_len`: the score
    and value matmuls of all query heads over the keys each query attends (projections
    excluded), averaged over the positions of one document filling the row; the work
    of choosing the keys (gates, routers) included where it is not negligible. The
    comparison command puts mechanisms on this common axis. Default: causal dense."""
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
    name, argument = split_spec(spec)
    flops.append(float(_REGISTRY[name].attention_flops(argument, dims.attention, dims, seq_len)))
  return flops


_REGISTRY = {}


def register(name):
  """Class decorator: makes a mechanism selectable as `model.attention.kind=name`."""
  def wrap(cls):
    if name in _REGISTRY:
      raise ValueError(f'mechanism {name!r} registered twice')
    _REGISTRY[name] = cls
    cls.name = name
    return cls
  return wrap


def mechanism_names():
  return tuple(_REGISTRY)


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
