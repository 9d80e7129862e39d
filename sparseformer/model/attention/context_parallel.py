"""Attention over a sequence sharded across devices (context parallelism).

When a train or eval step is traced within `sharding.placing_activations(mesh, rules)`
and the mesh splits the `length` axis (config.mesh.sequence > 1), dense and local
(window, block_local) layers run their block-sparse kernels per shard under `shard_map`:

  - each device holds the queries, keys and values of T / N consecutive tokens (shard s of
    N holds global rows [s * T/N, (s + 1) * T/N));
  - it gathers the keys and values of the shards its queries can see: all N (an
    all_gather) for causal attention, only the last ceil((W - 1) / (T/N)) shards before
    its own (collective permutes) for a window of W tokens, so kv shards the plan would
    never visit are neither moved nor computed;
  - the kv buffer holds those shards in order, ending with its own, so in buffer
    coordinates the queries sit at a fixed offset (`QueryOffset`) and the plan is built
    with static mask functions; buffer slots before the first shard (or, after an
    all_gather, holding later shards) get a segment id no query has, so the plan skips
    their tiles.

Batch and heads stay sharded as the rules place them (batch over data/fsdp, heads over
tensor), so the kernels also run per device on meshes without sequence sharding. The
gradients flow through the gathers (their transposes are reduce-scatters and reverse
permutes). Causal shards are not load-balanced: shard s computes s + 1 shards' tiles.

The other mechanisms run their attention per device through `per_device` (arguments
named by logical axes): sse per row, head and sequence shard, passing linear-attention
state between shards (context_parallel_linear.py); the kernel methods a mechanism marks
with `base.kernel(...)` (gated, dynamic_mask, routing, strided) per row and head
(`per_row_and_head`), gathering the sequence where it is split.
"""

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pallas_kernels.block_sparse_attention import block_sparse_attention, masks, plan_from_mask
from sparseformer import sharding
from sparseformer.errors import UserError

# Segment id of buffer slots no query may see (queries have ids >= 0).
NO_QUERY_SEGMENT = -(2 ** 30)


@dataclasses.dataclass(frozen=True)
class QueryOffset(masks.Mask):
  """`inner` with every query index moved `offset` rows on: the mask of queries that sit
  at the end of a longer key buffer."""
  inner: masks.Mask
  offset: int

  def elements(self, q_index, k_index):
    return self.inner.elements(q_index + self.offset, k_index)

  def block_kind(self, q0, q1, k0, k1):
    return self.inner.block_kind(q0 + self.offset, q1 + self.offset, k0, k1)

  def key_span(self):
    return self.inner.key_span()


def axis_names(entry):
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def sequence_shards(placement):
  """How many shards the placement splits the `length` axis into (1 without placement)."""
  if placement is None:
    return 1
  return placement.axis_size(placement.spec('length')[0])


def placement_for_kernels(sequence_split_only=False):
  """The current activation placement if attention should run per shard, else None:
  whenever the length axis is split, and (unless `sequence_split_only`) whenever the mesh
  has several devices, since a kernel call is not partitioned by XLA."""
  placement = sharding.current_placement()
  if placement is None or placement.mesh.size == 1:
    return None
  if sequence_split_only and sequence_shards(placement) == 1:
    return None
  return placement


def check_shift_invariant(mask, shard_len):
  """Buffer coordinates move the rows by multiples of the shard length; the mask must not
  change under such a shift."""
  if isinstance(mask, (masks.Causal, masks.SlidingWindow, masks.Full)):
    return
  if isinstance(mask, masks.Chunked):
    if shard_len % mask.size:
      raise UserError(f'context parallelism: block_local:{mask.size} needs the per-device sequence length '
                      f'({shard_len}) to be a multiple of {mask.size}')
    return
  if isinstance(mask, (masks.And, masks.Or)):
    for part in mask.parts:
      check_shift_invariant(part, shard_len)
    return
  raise UserError(f'context parallelism does not support the mask {type(mask).__name__}')


def previous_shards(mask, shards, shard_len):
  """How many shards before its own a query shard needs keys from."""
  span = mask.key_span()
  if span is None:
    return shards - 1
  return min(shards - 1, math.ceil((span - 1) / shard_len))


def gather_previous(x, axes, shards, count):
  """[count + 1, ...]: x of shards s - count, ..., s - 1, s on device s (wrapping round
  below 0; the caller masks those slots)."""
  if count == 0:
    return x[None]
  if count == shards - 1:
    everything = jax.lax.all_gather(x, axes, axis=0)
    index = (jax.lax.axis_index(axes) - count + jnp.arange(count + 1)) % shards
    return jnp.take(everything, index, axis=0)
  received = [jax.lax.ppermute(x, axes, [(j, (j + p) % shards) for j in range(shards)])
              for p in range(count, 0, -1)]
  return jnp.stack(received + [x])


def join_shards(stacked):
  """[n, B, Tl, ...] -> [B, n * Tl, ...]."""
  n, b, tl = stacked.shape[:3]
  return jnp.moveaxis(stacked, 0, 1).reshape(b, n * tl, *stacked.shape[3:])


def shard_attention(q, k, v, segment_ids, *, mask, block, scale, axes, shards):
  """The body run on each device: q [B, Tl, H, D], k and v [B, Tl, Hkv, D], segment_ids
  [B, Tl] (all zeros when rows are single documents)."""
  shard_len = q.shape[1]
  count = previous_shards(mask, shards, shard_len)
  k_buffer = join_shards(gather_previous(k, axes, shards, count))
  v_buffer = join_shards(gather_previous(v, axes, shards, count))
  segment_buffer = gather_previous(segment_ids, axes, shards, count)
  shard_index = jax.lax.axis_index(axes) if axes else 0
  source_shard = shard_index - count + jnp.arange(count + 1)
  segment_buffer = jnp.where((source_shard >= 0)[:, None, None], segment_buffer, NO_QUERY_SEGMENT)
  plan = plan_from_mask(QueryOffset(mask, count * shard_len), q_len=shard_len, kv_len=(count + 1) * shard_len,
                        block_q=block, block_kv=block, q_segment_ids=segment_ids,
                        kv_segment_ids=join_shards(segment_buffer))
  return block_sparse_attention(q, k_buffer, v_buffer, plan, scale=scale)


def sharded_attention(q, k, v, segment_ids, *, mask, block, scale, placement):
  """Causal block-sparse attention of q [B, T, H, D] to k, v [B, T, Hkv, D] under `mask`
  (row indices of the whole sequence), computed per shard of the placement's mesh."""
  q_spec = placement.spec('batch', 'length', 'heads', 'head_dim')
  kv_spec = placement.spec('batch', 'length', 'kv_heads', 'head_dim')
  row_spec = PartitionSpec(*q_spec[:2])
  axes = axis_names(q_spec[1])
  shards = placement.axis_size(q_spec[1])
  check_shift_invariant(mask, q.shape[1] // shards)
  if segment_ids is None:
    segment_ids = jnp.zeros(q.shape[:2], jnp.int32)

  def body(q, k, v, segment_ids):
    return shard_attention(q, k, v, segment_ids, mask=mask, block=block, scale=scale, axes=axes, shards=shards)

  return jax.shard_map(body, mesh=placement.mesh, in_specs=(q_spec, kv_spec, kv_spec, row_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, segment_ids)


# --------------------------------------------------------------------------------------
# Any per-(row, head) computation run per device, for the kernels XLA cannot partition
# (a mechanism reaches it through base.kernel, or per_device from its sharded_forward).

UNSPLIT = '.'  # a dim of an argument that no mesh axis splits
Q_NAMES = 'batch . heads .'  # q [B, T, H, D] split over rows and heads, whole along the sequence
KV_NAMES = 'batch . kv_heads .'
QKV_NAMES = (Q_NAMES, KV_NAMES, KV_NAMES)


def row_names(segment_ids):
  """Names of per-token row data [B, T] (None stays None)."""
  return None if segment_ids is None else 'batch .'
_warned = set()


def warn_once(key, message):
  if key not in _warned:
    _warned.add(key)
    warnings.warn(message, stacklevel=3)


def warn_gathered_once(mechanism):
  """One warning per mechanism name: its layers see the whole sequence on every device."""
  warn_once(mechanism, f'context parallelism: {mechanism} layers do not run per sequence shard yet; each device '
            'gathers the whole sequence of its rows and heads (config.mesh.sequence > 1)')


def _entry_axes(placement, name):
  return axis_names(placement.spec(name)[0]) if name != UNSPLIT else ()


def unusable_axes(placement, names, args, split_length):
  """Mesh axes no argument may be split over: those of `length` unless split_length, and
  any that would split some dim unevenly (e.g. 6 routing heads over tensor 4)."""
  unusable = set() if split_length else set(_entry_axes(placement, 'length'))
  for name_string, x in zip(names, args):
    for name, size in zip(name_string.split(), x.shape):
      axes = _entry_axes(placement, name)
      if size % placement.axis_size(axes):
        unusable.update(axes)
  return unusable


def spec_of(placement, name_string, unusable):
  """PartitionSpec of an argument whose dims are named by `name_string` ('batch . heads .')."""
  spec = placement.spec(*name_string.split())
  kept = [tuple(a for a in axis_names(entry) if a not in unusable) for entry in spec]
  return PartitionSpec(*[None if not axes else axes[0] if len(axes) == 1 else axes for axes in kept])


def per_device(fn, args, names, out_names, *, placement, split_length=False):
  """fn(*args) run under shard_map, each device on its block of every argument.

  `names` is a pytree like args whose leaves are strings naming each array's dims by
  logical axes ('batch length heads .'; '.' unsplit); None arguments stay None. fn must be
  exact per block: independent per batch row and head, and per sequence shard only with
  `split_length` (then fn does its own collectives over the length axes). `out_names`
  names fn's outputs likewise."""
  arg_leaves, arg_tree = jax.tree.flatten(args)
  name_leaves = jax.tree.leaves(names)
  if len(name_leaves) != len(arg_leaves):
    raise ValueError(f'per_device: {len(name_leaves)} names for {len(arg_leaves)} arrays')
  unusable = unusable_axes(placement, name_leaves, arg_leaves, split_length)
  in_specs = tuple(spec_of(placement, n, unusable) for n in name_leaves)
  out_specs = jax.tree.map(lambda n: spec_of(placement, n, unusable), out_names)

  def body(*leaves):
    return fn(*jax.tree.unflatten(arg_tree, leaves))

  return jax.shard_map(body, mesh=placement.mesh, in_specs=in_specs, out_specs=out_specs,
                       check_vma=False)(*arg_leaves)


def kernel_placement(mechanism):
  """The placement to run `mechanism`'s kernels per device under (warning once where the
  sequence is split, which it does not support), or None on one device."""
  placement = placement_for_kernels()
  if placement is not None and sequence_shards(placement) > 1:
    warn_gathered_once(mechanism)
  return placement


def per_row_and_head(mechanism, fn, args, names, out_names):
  """fn(*args), per device over the batch and head axes when a step is traced within a
  placement of several devices (its kernel calls are not partitioned by XLA), else as is.
  fn must be independent per batch row and head; where the sequence is split the
  arguments are gathered whole along it (one warning per mechanism name)."""
  placement = kernel_placement(mechanism)
  if placement is None:
    return fn(*args)
  return per_device(fn, args, names, out_names, placement=placement)


def plan_names(plan, batch, head_name):
  """Names for per_device of a BlockSparsePlan's arrays: a batch-1 plan (broadcast to every
  row) and a plan of one head are not split; other plan heads are `head_name`'s."""
  rows = 'batch' if plan.kv_count.shape[0] == batch and batch > 1 else UNSPLIT
  heads = head_name if plan.plan_heads > 1 else UNSPLIT
  lists = f'{rows} {heads} . .'
  per_token = None if plan.q_threshold is None else f'{rows} {heads} .'
  return dataclasses.replace(
      plan, kv_count=f'{rows} {heads} .', kv_index=lists, kv_full=lists, q_count=f'{rows} {heads} .', q_index=lists,
      q_full=lists, q_segment_ids=None if plan.q_segment_ids is None else f'{rows} .',
      kv_segment_ids=None if plan.kv_segment_ids is None else f'{rows} .', q_threshold=per_token,
      key_rank=None if plan.key_rank is None else per_token)
