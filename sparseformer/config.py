"""The config schema, loading of `configs/*.py`, command-line overrides and validation.

Every field a run can set is declared in `base_config()` with its default and type
(an attention mechanism's options by the mechanism's class: model/attention/base.py);
`configs/NAME.py:get_config(arg)` starts from it and changes values. Overrides
(`--config.a.b=v`) may only set declared fields, parsed with the field's type. A renamed
field's old name keeps working, with one warning naming the new one (renamed_fields.py).
"""

import ast
import importlib.util
import json
import math
import os

import ml_collections

from sparseformer import renamed_fields
from sparseformer.errors import UserError, closest_match

FORMAT_VERSION = 1
# train.attention_backward -> block_sparse_attention(deterministic=...)
MAX_SHORT_CONV = 16
ATTENTION_BACKWARDS = {'default': None, 'deterministic': True, 'fused': False}


def base_config():
  """All fields with their defaults: the schema every config file starts from."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ''  # a checkpoint (workdir, checkpoints dir or step dir): load model parameters only

  c.model = ml_collections.ConfigDict()
  m = c.model
  m.vocab_size = 0  # 0: the tokenizer's size, padded up to a multiple of 128
  m.d_model = 256
  m.num_layers = 4
  m.num_heads = 4
  m.num_kv_heads = 0  # 0: num_heads (multi-head); fewer: grouped-query attention
  m.head_dim = 0  # 0: d_model // num_heads
  m.mlp_dim = 0  # 0: 8/3 d_model rounded up to a multiple of 64 (SwiGLU)
  m.tie_embeddings = True
  m.qkv_bias = False  # biases on the q, k, v projections (Qwen2, Llama's attention_bias)
  m.out_bias = False  # a bias on the attention output projection (Llama's attention_bias)
  m.qk_norm = False  # RMSNorm of each head's q and k before RoPE (Qwen3)
  m.norm_eps = 1e-6
  m.init_std = 0.02
  m.dtype = 'auto'  # compute dtype; auto: bfloat16 on GPU/TPU, float32 on CPU
  m.param_dtype = 'float32'
  m.remat = 'none'  # none | full | dots (save matmul outputs)
  m.short_conv = 0  # >0: a causal depthwise convolution of this many taps before each attention (docs/architecture.md)
  m.rope = ml_collections.ConfigDict()
  m.rope.theta = 10000.0
  m.rope.scaling = 'none'  # none | linear (position interpolation) | ntk | yarn | llama3 (Llama 3.1)
  m.rope.factor = 1.0
  m.rope.original_seq_len = 0  # the length the checkpoint was trained at (yarn, llama3)
  m.rope.low_freq_factor = 1.0  # llama3: wavelengths above original_seq_len / low_freq_factor are divided by factor
  m.rope.high_freq_factor = 4.0  # llama3: wavelengths below original_seq_len / high_freq_factor are kept
  m.attention = ml_collections.ConfigDict()
  m.attention.kind = 'dense'  # the mechanism of every layer not named in layer_attention: name[:argument]
  m.attention.alternate_layers = ''  # layers that use alternate_kind instead: bottom:N | top:N | every:K | 0,5,...
  m.attention.alternate_kind = 'dense'  # e.g. MASFormer's dense layers among windows, or routing among windows
  m.attention.block_size = 128  # block of the block-sparse plans (window, block_local, ...)
  add_mechanism_options(m.attention)  # each mechanism's own options, declared in its module
  renamed_fields.add_aliases(c)
  m.layer_attention = ()  # optional: one spec per layer, e.g. ('dense', 'window:256', 'block_local:512', 'dense')

  c.data = ml_collections.ConfigDict()
  d = c.data
  d.name = 'sparseformer_text/tinyshakespeare'  # a TFDS name; sparseformer_text/* are shipped
  d.data_dir = ''  # '' -> $SPARSEFORMER_DATA_DIR or ~/.cache/sparseformer/tensorflow_datasets
  d.text_key = 'text'
  d.train_split = 'train'
  d.eval_split = 'validation'
  d.tokenizer = 'byte'  # byte | codes:N (bytes + N task symbols, docs/tasks.md) | spm:/path/to/model | hf:DIR
  d.seq_len = 256
  d.tasks = ()  # synthetic task specs mixed into training rows, e.g. ('passkey', 'mqar:pairs=64') (evaluation/tasks)
  d.task_fraction = 0.0  # fraction of training rows that hold task examples; 1.0: task rows only
  d.task_min_len = 0  # task examples' lengths are drawn from [task_min_len, seq_len]; 0: seq_len (one per row)
  d.task_loss = 'answers'  # loss on task rows: answers (the answer tokens only, as Zoology) | all
  d.task_answer_weight = 1.0  # loss weight of an answer token, against 1 for a text token (data/task_rows.py)
  d.workers = 0  # processes making training batches (0: threads in this one); the batch order depends on it

  c.train = ml_collections.ConfigDict()
  t = c.train
  t.steps = 1000
  t.global_batch_size = 32
  t.grad_accum_steps = 1
  t.lr = 3e-3
  t.warmup_steps = 100
  t.min_lr_ratio = 0.1  # cosine decays to lr * min_lr_ratio at the last step
  t.weight_decay = 0.1
  t.decay_embeddings = False
  t.b1 = 0.9
  t.b2 = 0.95
  t.eps = 1e-8
  t.grad_clip = 1.0  # global norm; 0 disables
  t.trainable = ''  # regex over parameter paths (e.g. '/block_gate/'): only matches train; '' = all
  t.lm_loss_weight = 1.0  # weight of the LM loss; 0 trains on the auxiliary losses alone (gate distillation)
  t.loss_chunk = 2048  # positions unembedded at a time in the loss (train and eval); 0: all at once (training/loss.py)
  # block-sparse kernels' backward: deterministic (bitwise reproducible, two kernels) | fused (the
  # GPU kernel with atomic dQ, faster) | default (the library's; docs/block_sparse_attention.md)
  t.attention_backward = 'default'
  t.log_every = 10
  t.eval_every = 0  # 0: only at the end
  t.eval_batches = 0  # batches per evaluation during training; 0: the whole split

  c.eval = ml_collections.ConfigDict()
  e = c.eval
  e.split = ''  # '' -> data.eval_split
  e.seq_len = 0  # 0 -> data.seq_len
  e.batch_size = 0  # 0 -> train.global_batch_size
  e.max_batches = 0  # 0: the whole split
  e.step = 0  # checkpoint step to evaluate; 0: the latest
  e.tasks = ()  # synthetic task specs scored by `python -m sparseformer.cli.eval_tasks` (and compare)
  e.task_lengths = ()  # example lengths in tokens; () -> (data.seq_len,)
  e.task_depths = 5  # needle depths evenly spaced over [0, 1]
  e.task_samples = 4  # examples per (task, length, depth)
  e.task_seed = 1234  # examples differ from the training rows' (which use the run's seed)
  e.task_batch_size = 0  # rows per forward pass; 0: eval.batch_size
  e.task_decode = False  # also decode every answer through the caches (sparseformer.generation) and report its accuracy

  c.checkpoint = ml_collections.ConfigDict()
  k = c.checkpoint
  k.every_steps = 500
  k.keep = 3
  k.async_save = True
  k.checksums = True  # record the SHA-256 of each file of a step when saving; verify before reading
  k.fallback_to_readable = False  # newest step damaged: resume (evaluate) the newest readable one, not stop

  c.mesh = ml_collections.ConfigDict()
  ms = c.mesh
  ms.data = -1  # -1: every device not used by the other axes
  ms.fsdp = 1
  ms.tensor = 1
  ms.sequence = 1
  # logical axis name -> mesh axes (a name not listed is replicated)
  ms.rules = (
      ('batch', ('data', 'fsdp')),
      ('length', 'sequence'),
      ('embed', 'fsdp'),
      ('vocab', 'tensor'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('mlp', 'tensor'),
  )
  return c


def add_mechanism_options(attention):
  """model.attention.<section>.* of every mechanism, from the OPTIONS its class declares
  (sparseformer/model/attention/base.py)."""
  from sparseformer.model.attention import base as mechanisms
  mechanisms.add_options(attention)


# ---------------------------------------------------------------------------------------
# Loading a config file


def load_config_file(spec):
  """`path/to/config.py[:arg]` -> ConfigDict from that file's get_config(arg)."""
  cfg = call_get_config(spec)
  check_schema(cfg, spec.partition(':')[0])
  return cfg


def call_get_config(spec, what='config'):
  """`path/to/file.py[:arg]` -> that file's get_config(arg); UserError for a missing or
  broken file (what: the word for the file in messages)."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise UserError(f'{what} file not found: {path}')
  module_spec = importlib.util.spec_from_file_location(f'_sparseformer_{what}', path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except UserError:
    raise
  except Exception as e:  # a broken config file is the user's to fix
    raise UserError(f'cannot load {what} {path}: {type(e).__name__}: {e}') from e
  if not hasattr(module, 'get_config'):
    raise UserError(f'{what} file {path} defines no get_config(arg=None)')
  renamed_fields.warn_in_source(path)
  try:
    return module.get_config(arg or None)
  except UserError:
    raise
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise UserError(f'{spec}: {e}') from e


def with_preset(cfg, arg, presets):
  """cfg with the overrides {'a.b': 'text'} of preset `arg` applied (none for arg None);
  ValueError naming the known presets for an unknown one. Config files use it for `file.py:preset`."""
  if arg is None:
    return cfg
  if arg not in presets:
    raise ValueError(f'unknown preset {arg!r}; known: {", ".join(sorted(presets))}')
  return apply_overrides(cfg, presets[arg])


def check_schema(cfg, origin):
  """A config file may change values but not invent fields or change their types."""
  base_fields = flatten(base_config())
  cfg_fields = flatten(cfg)
  for key in cfg_fields:
    if key not in base_fields:
      raise UserError(unknown_key_message(key, origin))
  for key in base_fields:
    if key not in cfg_fields:
      raise UserError(f'{origin}: config lacks field {key!r}; start from sparseformer.config.base_config()')


def flatten(cfg, prefix=''):
  """ConfigDict -> {'a.b': value} for every leaf field (old names left out)."""
  return renamed_fields.flatten_dict(cfg, prefix, skip=renamed_fields.is_alias)


def unknown_key_message(key, origin):
  hint = closest_match(key, flatten(base_config()))
  suffix = f' (did you mean {hint!r}?)' if hint else ''
  return f'{origin}: unknown config key {key!r}{suffix}'


# ---------------------------------------------------------------------------------------
# Overrides from the command line


def apply_overrides(cfg, overrides):
  """Sets `{'a.b': 'text'}` overrides, each parsed with the type of the field it sets."""
  fields = flatten(cfg)
  for key, text in overrides.items():
    key = renamed_fields.renamed(key, '--config')
    if key not in fields:
      raise UserError(unknown_key_message(key, '--config'))
    value = parse_value(key, text, fields[key])
    *parents, leaf = key.split('.')
    node = cfg
    for part in parents:
      node = node[part]
    with node.ignore_type():
      node[leaf] = value
  return cfg


def parse_value(key, text, current):
  """Parses override text into the type of the field's current value."""
  expected = type(current)
  try:
    if expected is bool:
      lowered = text.strip().lower()
      if lowered in ('true', '1', 'yes'):
        return True
      if lowered in ('false', '0', 'no'):
        return False
      raise ValueError
    if expected is int:
      return int(text)
    if expected is float:
      return float(text)
    if expected is str:
      return text
    if expected is tuple:
      value = ast.literal_eval(text) if text.strip() else ()
      if isinstance(value, str):
        value = (value,)
      if not isinstance(value, (tuple, list)):
        raise ValueError
      return tuple(value)
  except (ValueError, SyntaxError):
    pass
  raise UserError(f'--config.{key}: expected {expected.__name__}, got {text!r}')


# ---------------------------------------------------------------------------------------
# The resolved config in a workdir


def to_json(cfg):
  return json.dumps({'format_version': FORMAT_VERSION, 'config': cfg.to_dict()}, indent=2)


def from_json(text, origin):
  """Rebuilds a config written by `to_json`, typed by the schema (lists back to tuples)."""
  payload = json.loads(text)
  cfg = base_config()
  saved = renamed_fields.saved_fields(payload['config'], origin)
  fields = flatten(cfg)
  for key, value in saved.items():
    if key not in fields:
      raise UserError(unknown_key_message(key, origin))
    if isinstance(fields[key], tuple):
      value = to_tuple(value)
    elif isinstance(fields[key], float) and isinstance(value, int):
      value = float(value)
    *parents, leaf = key.split('.')
    node = cfg
    for part in parents:
      node = node[part]
    node[leaf] = value
  return cfg


def to_tuple(value):
  if isinstance(value, (list, tuple)):
    return tuple(to_tuple(v) for v in value)
  return value


# ---------------------------------------------------------------------------------------
# Validation that needs no devices or data


def validate(cfg):
  """Raises UserError for values that cannot work, before anything runs."""
  m, t = cfg.model, cfg.train
  validate_finite(cfg)
  for field in ('num_layers', 'd_model', 'num_heads'):
    require(m[field] > 0, f'model.{field}={m[field]}: use a positive size')
  if m.head_dim == 0:
    require(m.d_model % m.num_heads == 0,
            f'model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; set model.head_dim')
  validate_model_numbers(m)
  require(m.dtype in ('auto', 'float32', 'bfloat16', 'float16'), f'model.dtype={m.dtype!r}: use auto, float32, bfloat16 or float16')
  require(m.param_dtype in ('float32', 'bfloat16'), f'model.param_dtype={m.param_dtype!r}: use float32 or bfloat16')
  require(m.remat in ('none', 'full', 'dots'), f'model.remat={m.remat!r}: use none, full or dots')
  require(0 <= m.short_conv <= MAX_SHORT_CONV,
          f'model.short_conv={m.short_conv}: use 0 (none) or a width of 1 to {MAX_SHORT_CONV} tokens')
  validate_attention(m)
  if m.layer_attention:
    require(len(m.layer_attention) == m.num_layers,
            f'model.layer_attention has {len(m.layer_attention)} entries for {m.num_layers} layers')
  rope_problem = rope_problem_of(m.rope)
  require(rope_problem is None, rope_problem)
  validate_data(cfg.data)
  require(t.steps > 0, f'train.steps={t.steps}: use a positive count')
  for field in ('global_batch_size', 'grad_accum_steps'):
    require(t[field] > 0, f'train.{field}={t[field]}: use a positive count')
  require(t.global_batch_size % t.grad_accum_steps == 0,
          f'train.global_batch_size={t.global_batch_size} is not divisible by train.grad_accum_steps={t.grad_accum_steps}')
  require(t.lr > 0, f'train.lr={t.lr}: use a learning rate > 0')
  require(t.log_every > 0, f'train.log_every={t.log_every}: use a positive step count')
  require(t.lm_loss_weight >= 0, f'train.lm_loss_weight={t.lm_loss_weight}: use a weight >= 0')
  require(t.attention_backward in ATTENTION_BACKWARDS,
          f'train.attention_backward={t.attention_backward!r}: use one of {", ".join(ATTENTION_BACKWARDS)}')
  require(t.loss_chunk >= 0, f'train.loss_chunk={t.loss_chunk}: use positions per chunk > 0, or 0 (all at once)')
  require(valid_regex(t.trainable), f'train.trainable={t.trainable!r} is not a valid regular expression')
  validate_optimizer(t)
  validate_eval(cfg.eval)
  for field in ('every_steps', 'keep'):
    require(cfg.checkpoint[field] > 0, f'checkpoint.{field}={cfg.checkpoint[field]}: use a positive count')
  for axis in MESH_AXES:
    size = cfg.mesh[axis]
    require(size == -1 or size > 0, f'mesh.{axis}={size}: use a positive size or -1')
  rules_problem = mesh_rules_problem(cfg.mesh.rules)
  require(rules_problem is None, rules_problem)


MESH_AXES = ('data', 'fsdp', 'tensor', 'sequence')  # the device mesh's axes, in order (sparseformer.sharding)


def validate_attention(m):
  """model.attention and model.layer_attention: the layer pattern, every spec, and every
  registered mechanism's options (each option's own check always; checks against the
  model and the layers' arguments for the mechanisms some layer uses)."""
  from sparseformer.model.attention import base as mechanisms
  from sparseformer.model.dims import alternate_layer_indices
  try:
    alternate_layer_indices(m.attention.alternate_layers, m.num_layers)
  except ValueError as e:
    raise UserError(f'model.attention.alternate_layers={m.attention.alternate_layers!r}: {e}') from None
  where_specs = [('model.attention.kind', m.attention.kind), ('model.attention.alternate_kind',
                                                              m.attention.alternate_kind)]
  where_specs += [(f'model.layer_attention[{i}]', spec) for i, spec in enumerate(m.layer_attention)]
  for where, spec in where_specs:
    try:
      mechanisms.get_mechanism(spec)
    except UserError as e:
      raise UserError(f'{where}: {e}') from None
  require(m.attention.block_size in (64, 128, 256, 512),
          f'model.attention.block_size={m.attention.block_size}: use 64 or 128 (GPU kernels), 256 or 512')
  problem = mechanisms.options_problem(m, [spec for _, spec in where_specs])
  require(problem is None, problem)


def validate_finite(cfg):
  """No float field may be inf or nan (train.lr=inf would pass `lr > 0`)."""
  for key, value in flatten(cfg).items():
    require(not isinstance(value, float) or math.isfinite(value), f'{key}={value}: use a finite number')


def validate_model_numbers(m):
  """The sizes and scalars of `model` that the other checks leave out."""
  require(m.vocab_size >= 0, f'model.vocab_size={m.vocab_size}: use a size > 0, or 0 (the tokenizer\'s, padded)')
  kv_heads = m.num_kv_heads or m.num_heads
  require(0 <= m.num_kv_heads <= m.num_heads,
          f'model.num_kv_heads={m.num_kv_heads}: use 1 to model.num_heads={m.num_heads}, or 0 (num_heads)')
  require(m.num_heads % kv_heads == 0,
          f'model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={kv_heads}')
  require(m.head_dim >= 0, f'model.head_dim={m.head_dim}: use a size > 0, or 0 (d_model // num_heads)')
  head_dim = m.head_dim or m.d_model // m.num_heads
  require(head_dim % 2 == 0, f'model.head_dim={head_dim} (resolved): RoPE rotates pairs of dims, use an even size')
  require(m.mlp_dim >= 0, f'model.mlp_dim={m.mlp_dim}: use a size > 0, or 0 (8/3 d_model)')
  require(m.norm_eps > 0, f'model.norm_eps={m.norm_eps}: use a value > 0')
  require(m.init_std > 0, f'model.init_std={m.init_std}: use a value > 0')


def rope_problem_of(rope):
  """The message for `model.rope` values that model/rope.py cannot use, or None."""
  from sparseformer.model.rope import scaling_names
  if rope.scaling not in scaling_names():
    return f'model.rope.scaling={rope.scaling!r}: use {", ".join(scaling_names())}'
  if not (rope.theta > 1 and math.isfinite(rope.theta)):
    return f'model.rope.theta={rope.theta}: use a finite base > 1'
  if not (rope.factor >= 1 and math.isfinite(rope.factor)):
    return f'model.rope.factor={rope.factor}: use a finite context extension factor >= 1'
  if rope.scaling == 'none' and rope.factor != 1:
    return (f'model.rope.factor={rope.factor} has no effect with model.rope.scaling=\'none\'; '
            'set model.rope.scaling (linear, ntk or yarn) or factor 1')
  if rope.original_seq_len < 0:
    return f'model.rope.original_seq_len={rope.original_seq_len}: use a length > 0, or 0 (unset)'
  if rope.scaling == 'yarn' and rope.original_seq_len == 0:
    return ('model.rope.original_seq_len=0: model.rope.scaling=\'yarn\' needs the context length '
            'the checkpoint was trained at')
  return None


def validate_data(d):
  require(d.seq_len > 0, f'data.seq_len={d.seq_len}: use a positive length')
  for field in ('name', 'text_key', 'train_split', 'eval_split', 'tokenizer'):
    require(d[field].strip(), f'data.{field} is empty')
  require(d.workers >= 0, f'data.workers={d.workers}: use a count of processes >= 0 (0: threads in this process)')
  validate_task_rows(d)


def validate_task_rows(d):
  """data.tasks, task_fraction, task_min_len, task_loss and task_answer_weight (the rows of data/task_rows.py).
  Whether a task fits in seq_len is known only by making an example: the train iterator
  does that when it is built, before the workdir is written."""
  validate_task_specs('data.tasks', d.tasks, row_length=d.seq_len)
  require(0 <= d.task_fraction <= 1, f'data.task_fraction={d.task_fraction}: use a fraction in [0, 1]')
  require(d.task_fraction == 0 or d.tasks,
          f'data.task_fraction={d.task_fraction} needs task specs in data.tasks, e.g. (\'mqar:pairs=64\',)')
  require(d.task_fraction > 0 or not d.tasks,
          f'data.tasks={tuple(d.tasks)!r} would be unused with data.task_fraction=0: '
          'set the fraction of training rows that hold task examples, or data.tasks=()')
  require(0 <= d.task_min_len <= d.seq_len,
          f'data.task_min_len={d.task_min_len}: use 0 (examples of data.seq_len) or a length in [1, {d.seq_len}]')
  require(d.task_loss in ('answers', 'all'), f'data.task_loss={d.task_loss!r}: use answers or all')
  require(d.task_answer_weight > 0, f'data.task_answer_weight={d.task_answer_weight}: use a weight > 0')


def validate_optimizer(t):
  require(t.warmup_steps >= 0, f'train.warmup_steps={t.warmup_steps}: use a count >= 0')
  require(0 <= t.min_lr_ratio <= 1, f'train.min_lr_ratio={t.min_lr_ratio}: use a fraction in [0, 1]')
  require(t.weight_decay >= 0, f'train.weight_decay={t.weight_decay}: use a value >= 0')
  require(0 <= t.b1 < 1, f'train.b1={t.b1}: use a value in [0, 1)')
  require(0 <= t.b2 < 1, f'train.b2={t.b2}: use a value in [0, 1)')
  require(t.eps > 0, f'train.eps={t.eps}: use a value > 0')
  require(t.grad_clip >= 0, f'train.grad_clip={t.grad_clip}: use a global norm > 0, or 0 (off)')
  require(t.eval_every >= 0, f'train.eval_every={t.eval_every}: use a step count > 0, or 0 (only at the end)')
  require(t.eval_batches >= 0, f'train.eval_batches={t.eval_batches}: use a count > 0, or 0 (the whole split)')


def validate_eval(e):
  for field in ('seq_len', 'batch_size', 'max_batches', 'step', 'task_batch_size'):
    require(e[field] >= 0, f'eval.{field}={e[field]}: use a value > 0, or 0 (the default)')
  for length in e.task_lengths:
    require(isinstance(length, int) and length > 0,
            f'eval.task_lengths={tuple(e.task_lengths)!r}: use lengths in tokens > 0')
  require(e.task_depths >= 1, f'eval.task_depths={e.task_depths}: use a count >= 1 (1: depth 0 only)')
  require(e.task_samples >= 1, f'eval.task_samples={e.task_samples}: use a count >= 1')
  validate_task_specs('eval.tasks', e.tasks)


def validate_task_specs(field, specs, row_length=None):
  """A tuple of task specs that parse (sparseformer/evaluation/tasks), naming the bad one.
  Training specs (row_length: the rows' length) may end in '@L', L <= row_length
  (data/task_rows.py)."""
  require(isinstance(specs, (tuple, list)) and all(isinstance(spec, str) for spec in specs),
          f'{field}={specs!r}: use a tuple of task specs, e.g. (\'passkey\', \'mqar:pairs=64\')')
  if specs:
    from sparseformer.evaluation import tasks as _registered  # noqa: F401  (registers the generators)
    from sparseformer.data.task_rows import row_spec
    from sparseformer.evaluation.tasks.base import parse_task_spec
    for i, spec in enumerate(specs):
      try:
        require(row_length or '@' not in spec, f'{spec!r}: @L (an example length) is for data.tasks; '
                'evaluation lengths are eval.task_lengths')
        bare, length = row_spec(spec) if row_length else (spec, None)
        parse_task_spec(bare)
        require(length is None or length <= row_length,
                f'{spec!r}: @{length} is longer than the rows (data.seq_len={row_length})')
      except UserError as e:
        raise UserError(f'{field}[{i}]: {e}') from None


def mesh_rules_problem(rules):
  """The message for `mesh.rules` that are not (logical name, mesh axis or axes) pairs, or None."""
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
      return f'mesh.rules: {rule!r} is not a pair (logical axis name, mesh axes)'
    targets = (rule[1],) if isinstance(rule[1], str) or rule[1] is None else rule[1]
    if not isinstance(targets, (tuple, list)):
      return f'mesh.rules: {rule!r}: map to a mesh axis name, a tuple of them, or None'
    unknown = [axis for axis in targets if axis is not None and axis not in MESH_AXES]
    if unknown:
      return f'mesh.rules: {rule!r} names {unknown[0]!r}; mesh axes are {", ".join(MESH_AXES)}'
  names = [rule[0] for rule in rules]
  repeated = sorted({name for name in names if names.count(name) > 1})
  if repeated:
    return f'mesh.rules: logical axis {repeated[0]!r} has more than one rule'
  return None


def valid_regex(pattern):
  import re
  try:
    re.compile(pattern)
  except re.error:
    return False
  return True


def require(condition, message):
  if not condition:
    raise UserError(message)


def eval_settings(cfg):
  """The eval split, length and batch size, with 0/'' meaning 'as in training'."""
  split = cfg.eval.split or cfg.data.eval_split
  seq_len = cfg.eval.seq_len or cfg.data.seq_len
  batch_size = cfg.eval.batch_size or cfg.train.global_batch_size
  return split, seq_len, batch_size
