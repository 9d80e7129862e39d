"""Static sparse patterns from the literature as layer specs: mask functions of positions
(pallas_kernels/block_sparse_attention/patterns.py), causal, with no parameters, attended
through the block-sparse kernels like window layers (docs/static_patterns.md).

    power:W          PowerAttention (arXiv 2503.03588): keys at power-of-two distances
                     (1, 2, 4, ...) plus the last W tokens; model.attention.power.sink
                     first tokens seen by all; distances between blocks of
                     model.attention.block_size (granularity=block, the paper's) or
                     between tokens (granularity=token)
    neighborhood:K   causal 1-D neighborhood attention (arXiv 2204.07143; dilated, DiNAT
                     arXiv 2209.15001): the last K keys of the query's dilation group
                     (model.attention.neighborhood.dilation); with a dilation d > 1 each
                     group is gathered contiguous first (tiling=grouped, as NATTEN splits a
                     dilated neighborhood into d undilated ones), so its window fills whole
                     tiles instead of touching every tile of a d-times-wider band
    neighborhood2d:K 2-D neighborhood attention (arXiv 2204.07143, 2209.15001) over
                     image tokens in raster order: the sequence's token p sits at (p // C,
                     p % C) of a grid of C = model.attention.neighborhood2d.columns
                     columns (as many grid rows as the sequence needs); the K x K window
                     centred on the query (shifted at the grid's left, right and top
                     edges, NA's rule; dilation model.attention.neighborhood2d.dilation
                     on both axes), and causal: the rows above within the window and
                     the query's row up to the query
    neighborhood3d:K 3-D neighborhood attention over video tokens in raster order: frames
                     of model.attention.neighborhood3d.rows x columns tokens (as many
                     frames as the sequence needs), the K x K x K window centred on the
                     query as above, causal: earlier frames' part of the window, then the
                     frame's rows above, then the row up to the query
    fixed:S          Sparse Transformer's fixed pattern (arXiv 1904.10509): the query's
                     chunk of S tokens, and the last model.attention.fixed.summary
                     tokens of every chunk; the summary keys are gathered in front of the
                     keys first (tiling=gathered), so tiles hold only keys in use
    radial:F         Radial Attention (arXiv 2506.19852) over frames of F tokens: the band
                     of keys shrinks as the frames' distance doubles
    bigbird:W        BigBird (arXiv 2007.14062) in blocks of model.attention.block_size:
                     the W blocks before the query's and its own, the first
                     model.attention.bigbird.global_blocks blocks, and random_blocks
                     blocks drawn per query block among the earlier ones (seeded hash)

The plan is built from the mask at block granularity, documents included (no T x T mask);
decoding reads a key/value cache through the same mask function.
"""

import numpy as np

from pallas_kernels.block_sparse_attention import block_sparse_attention, dilation_groups, masks, patterns, summary_prefix
from sparseformer.model.attention.base import Option, no_aux, register, softmax_flops, softmax_scale
from sparseformer.model.attention.local import LocalAttention

CAUSAL_LENGTH = 1 << 30  # a causal neighborhood never reaches the end of the row: no edge to clamp at
FLOP_QUERIES = 512  # queries sampled to count the keys a pattern sees per query


def mean_visible_keys(mask, seq_len):
  """Keys the mask lets a query see, averaged over the positions of one document of
  seq_len tokens (exact below FLOP_QUERIES tokens, else over evenly spaced queries)."""
  queries = np.unique(np.linspace(0, seq_len - 1, min(seq_len, FLOP_QUERIES)).astype(np.int64))
  keys = np.arange(seq_len)
  visible = np.asarray(mask.elements(queries[:, None], keys[None, :]))
  return float(visible.sum(1).mean())


class PatternAttention(LocalAttention):
  """A causal static pattern: subclasses give `pattern(argument, options)`, the mask
  function of a layer (options: model.attention), to which causality is added. The
  pattern restarts with every packed document (its positions are the document's)."""
  document_positions = True

  @classmethod
  def pattern(cls, argument, options):
    raise NotImplementedError

  @classmethod
  def causal_mask(cls, argument, options):
    return cls.pattern(argument, options) & masks.Causal()

  def mask(self):
    return self.causal_mask(self.argument, self.options)

  @classmethod
  def attention_flops(cls, argument, options, dims, seq_len):
    return softmax_flops(dims.num_heads, dims.head_dim, mean_visible_keys(cls.causal_mask(argument, options), seq_len))


@register('power')
class PowerAttention(PatternAttention):
  argument_meaning = ('local window', 64)
  options_section = 'power'
  OPTIONS = {
      'sink': Option(0, 'first tokens every query sees (attention sinks)', lambda n: n >= 0, 'use a count >= 0'),
      'granularity': Option('block', 'block: distances between blocks of block_size (the paper\'s; whole tiles) | '
                            'token: between tokens (a few elements in many tiles)', choices=('block', 'token')),
  }

  @classmethod
  def pattern(cls, argument, options):
    if options.power.granularity == 'token':
      return patterns.Power(local=argument, sink=options.power.sink)
    block = options.block_size
    return patterns.Power(local=-(-argument // block), sink=options.power.sink, block=block)


@register('neighborhood')
class NeighborhoodAttention(PatternAttention):
  argument_meaning = ('kernel size', 256)
  options_section = 'neighborhood'
  OPTIONS = {
      'dilation': Option(1, 'keys of the query\'s group (same index mod dilation), DiNAT', lambda n: n >= 1,
                         'use a dilation >= 1'),
      'tiling': Option('grouped', 'grouped: each dilation group gathered contiguous, its window in whole tiles | '
                       'rows: the mask over the row as it is (a dilated window touches every tile it spans)',
                       choices=('grouped', 'rows')),
  }

  @classmethod
  def pattern(cls, argument, options):
    return patterns.Neighborhood(CAUSAL_LENGTH, argument, options.neighborhood.dilation, causal=True)

  def forward(self, q, k, v, ctx):
    """With a dilation d > 1 (tiling=grouped): the causal window of K keys over each group's
    own sequence. Row index p is in group p % d at place p // d, and the pattern is exactly
    "same group, 0 <= place(q) - place(k) < K"; gathered group after group, documents kept
    apart by one segment id per (group, document), that is a sliding window."""
    dilation = self.options.neighborhood.dilation
    if dilation == 1 or self.options.neighborhood.tiling == 'rows':
      return super().forward(q, k, v, ctx)
    plan = dilation_groups.grouped_plan(self.argument, dilation, length=q.shape[1], block=self.block_size,
                                        segment_ids=ctx.segment_ids, batch=q.shape[0])
    attend = lambda q, k, v: block_sparse_attention(q, k, v, plan, scale=softmax_scale(q, ctx))  # noqa: E731
    return dilation_groups.grouped_attention(attend, q, k, v, dilation), no_aux()


class GridNeighborhoodAttention(PatternAttention):
  """Neighborhood attention over tokens in raster order on a grid whose first axis never
  ends (rows of an image, frames of a video): subclasses name the inner axes' sizes."""
  argument_meaning = ('kernel size', 7)
  INNER_AXES = ()  # the option names of the inner axes' sizes, outermost first

  @classmethod
  def inner_sizes(cls, options):
    return tuple(options[name] for name in cls.INNER_AXES)

  @classmethod
  def validate_options(cls, options, model_cfg, arguments):
    problem = super().validate_options(options, model_cfg, arguments)
    section = cls.options_section
    for kernel in sorted(set(arguments)):
      if problem is None and kernel % 2 == 0:
        problem = f'{section}:{kernel}: use an odd kernel size (the window is centred on the query)'
      for name in cls.INNER_AXES:
        if problem is None and kernel > options[name]:
          problem = (f'{section}:{kernel}: the kernel is wider than the grid '
                     f'(model.attention.{section}.{name}={options[name]})')
    return problem

  @classmethod
  def pattern(cls, argument, options):
    section = options[cls.options_section]
    inner = cls.inner_sizes(section)
    rank = len(inner) + 1
    grid = (CAUSAL_LENGTH // int(np.prod(inner)),) + inner
    return patterns.NeighborhoodGrid(grid, (argument,) * rank, (section.dilation,) * rank)


_GRID_DILATION = Option(1, 'dilation on every axis (DiNAT)', lambda n: n >= 1, 'use a dilation >= 1')


@register('neighborhood2d')
class Neighborhood2DAttention(GridNeighborhoodAttention):
  options_section = 'neighborhood2d'
  INNER_AXES = ('columns',)
  OPTIONS = {
      'columns': Option(32, 'grid width in tokens (an image row); rows follow as the sequence needs',
                        lambda n: n >= 1, 'use a width >= 1'),
      'dilation': _GRID_DILATION,
  }


@register('neighborhood3d')
class Neighborhood3DAttention(GridNeighborhoodAttention):
  options_section = 'neighborhood3d'
  INNER_AXES = ('rows', 'columns')
  OPTIONS = {
      'rows': Option(16, 'frame height in tokens', lambda n: n >= 1, 'use a height >= 1'),
      'columns': Option(16, 'frame width in tokens; frames follow as the sequence needs',
                        lambda n: n >= 1, 'use a width >= 1'),
      'dilation': _GRID_DILATION,
  }


@register('fixed')
class FixedAttention(PatternAttention):
  argument_meaning = ('stride', 128)
  # Chunks are cut in the packed row, as block_local's are: the gathered summary keys are
  # a static gather of row positions, the same for every row whatever its documents.
  document_positions = False
  options_section = 'fixed'
  OPTIONS = {
      'summary': Option(8, 'last tokens of every chunk that later queries see (c in the paper)',
                        lambda n: n >= 1, 'use a count >= 1'),
      'tiling': Option('gathered', 'gathered: the summary keys gathered in front of the keys, so tiles hold only '
                       'used keys | rows: the mask over the row as it is (summary columns touch every tile)',
                       choices=('gathered', 'rows')),
  }

  @classmethod
  def validate_options(cls, options, model_cfg, arguments):
    problem = super().validate_options(options, model_cfg, arguments)
    for stride in sorted(set(arguments)):
      if problem is None and options.summary > stride:
        problem = f'model.attention.fixed.summary={options.summary}: use at most the stride ({stride})'
    return problem

  @classmethod
  def pattern(cls, argument, options):
    return patterns.Fixed(argument, options.fixed.summary)

  def forward(self, q, k, v, ctx):
    """tiling=gathered: keys = [the summary keys of every chunk; the row], each query seeing
    the earlier chunks' summaries and its own chunk (summary_prefix.py), exactly the
    pattern's keys."""
    if self.options.fixed.tiling == 'rows':
      return super().forward(q, k, v, ctx)
    slots, plan = summary_prefix.gathered_plan(self.argument, self.options.fixed.summary, length=q.shape[1],
                                               block=self.block_size, segment_ids=ctx.segment_ids)
    k, v = (summary_prefix.with_summary_keys(x, slots) for x in (k, v))
    return block_sparse_attention(q, k, v, plan, scale=softmax_scale(q, ctx)), no_aux()


@register('radial')
class RadialAttention(PatternAttention):
  argument_meaning = ('frame size', 256)

  @classmethod
  def pattern(cls, argument, options):
    return patterns.Radial(argument)


@register('bigbird')
class BigBirdAttention(PatternAttention):
  argument_meaning = ('window in blocks', 1)
  options_section = 'bigbird'
  OPTIONS = {
      'global_blocks': Option(2, 'first blocks every query sees (ITC global tokens)', lambda n: n >= 0,
                              'use a count >= 0'),
      'random_blocks': Option(3, 'random earlier key blocks per query block', lambda n: n >= 0, 'use a count >= 0'),
      'seed': Option(0, 'seed of the random blocks (the same in every layer and step)'),
  }

  @classmethod
  def pattern(cls, argument, options):
    b = options.bigbird
    return patterns.BigBird(CAUSAL_LENGTH, options.block_size, window=argument,
                            global_tokens=b.global_blocks * options.block_size, random_blocks=b.random_blocks,
                            seed=b.seed, causal_draws=True)
