"""Hugging Face `config.json` of the Llama, Mistral, Qwen2 and Qwen3 families <->
sparseformer's `model.*` fields.

Reading maps every field that changes the computation and refuses, in one line naming
the field, what sparseformer does not compute the same way (another activation, MLP
biases, a RoPE scaling other than linear or llama3, per-layer sliding windows). Writing
gives back the source config (kept beside the checkpoint at import) with the fields
sparseformer may have changed, or builds a Llama config for a model trained here.
"""

from sparseformer.errors import UserError

# architecture -> (model_type, defaults of the fields a config.json may leave out)
FAMILIES = {
    'LlamaForCausalLM': ('llama', {'rope_theta': 10000.0, 'tie_word_embeddings': False, 'attention_bias': False,
                                   'rms_norm_eps': 1e-6}),
    'MistralForCausalLM': ('mistral', {'rope_theta': 10000.0, 'tie_word_embeddings': False, 'sliding_window': None,
                                       'rms_norm_eps': 1e-6}),
    'Qwen2ForCausalLM': ('qwen2', {'rope_theta': 10000.0, 'tie_word_embeddings': False, 'use_sliding_window': False,
                                   'rms_norm_eps': 1e-6}),
    'Qwen3ForCausalLM': ('qwen3', {'rope_theta': 10000.0, 'tie_word_embeddings': False, 'attention_bias': False,
                                   'use_sliding_window': False, 'rms_norm_eps': 1e-6}),
}


def family(hf):
  """(architecture, model_type) of a config.json dict; UserError for one not supported."""
  architectures = hf.get('architectures') or []
  known = [a for a in architectures if a in FAMILIES]
  if not known:
    raise UserError(f'config.json: architectures {architectures or "(none)"} are not supported; sparseformer '
                    f'imports {", ".join(FAMILIES)}')
  return known[0], FAMILIES[known[0]][0]


def field(hf, name, architecture):
  defaults = FAMILIES[architecture][1]
  if name in hf and hf[name] is not None:
    return hf[name]
  if name in defaults:
    return defaults[name]
  raise UserError(f'config.json ({architecture}): no {name!r}')


def rope_fields(hf, architecture):
  """{'scaling', 'factor', 'original_seq_len', 'low_freq_factor', 'high_freq_factor', 'theta'}.
  transformers 4 writes rope_theta and rope_scaling; transformers 5 one rope_parameters."""
  scaling = hf.get('rope_parameters') or hf.get('rope_scaling') or {}
  theta = scaling.get('rope_theta', hf.get('rope_theta'))
  rope = {'theta': float(theta if theta is not None else field(hf, 'rope_theta', architecture)),
          'scaling': 'none', 'factor': 1.0, 'original_seq_len': 0}
  kind = scaling.get('rope_type', scaling.get('type', 'default'))
  if kind == 'default':
    return rope
  if kind == 'linear':
    return {**rope, 'scaling': 'linear', 'factor': float(scaling['factor'])}
  if kind == 'llama3':
    return {**rope, 'scaling': 'llama3', 'factor': float(scaling['factor']),
            'original_seq_len': int(scaling['original_max_position_embeddings']),
            'low_freq_factor': float(scaling['low_freq_factor']),
            'high_freq_factor': float(scaling['high_freq_factor'])}
  raise UserError(f'config.json: rope_scaling {kind!r} is not imported (sparseformer computes default, linear and '
                  'llama3 as transformers does; its yarn ramp is continuous where transformers rounds it)')


def attention_fields(hf, architecture):
  """{'qkv_bias', 'out_bias', 'qk_norm', 'kind'}: biases, q/k norms, sliding window."""
  model_type = FAMILIES[architecture][0]
  bias = bool(field(hf, 'attention_bias', architecture)) if model_type in ('llama', 'qwen3') else False
  fields = {'qkv_bias': bias or model_type == 'qwen2', 'out_bias': bias, 'qk_norm': model_type == 'qwen3',
            'kind': 'dense'}
  if model_type == 'mistral' and field(hf, 'sliding_window', architecture):
    fields['kind'] = f'window:{int(hf["sliding_window"])}'
  windowed = set(hf.get('layer_types') or ()) - {'full_attention'}
  if (model_type in ('qwen2', 'qwen3') and field(hf, 'use_sliding_window', architecture)) or (
      model_type != 'mistral' and windowed):
    raise UserError(f'config.json ({architecture}): sliding windows on some layers (use_sliding_window, '
                    'layer_types) are not imported')
  return fields


def model_overrides(hf):
  """The `model.*` fields (dotted names -> values) that make sparseformer's model compute
  what the config.json describes."""
  architecture, _ = family(hf)
  if field(hf, 'hidden_act', architecture) != 'silu':
    raise UserError(f'config.json: hidden_act {hf["hidden_act"]!r}: sparseformer\'s MLP is SwiGLU (silu)')
  if hf.get('mlp_bias'):
    raise UserError('config.json: mlp_bias true: sparseformer\'s MLP has no biases')
  heads = int(field(hf, 'num_attention_heads', architecture))
  d_model = int(field(hf, 'hidden_size', architecture))
  attention = attention_fields(hf, architecture)
  overrides = {
      'model.vocab_size': int(field(hf, 'vocab_size', architecture)),
      'model.d_model': d_model,
      'model.num_layers': int(field(hf, 'num_hidden_layers', architecture)),
      'model.num_heads': heads,
      'model.num_kv_heads': int(hf.get('num_key_value_heads') or heads),
      'model.head_dim': int(hf.get('head_dim') or d_model // heads),
      'model.mlp_dim': int(field(hf, 'intermediate_size', architecture)),
      'model.tie_embeddings': bool(field(hf, 'tie_word_embeddings', architecture)),
      'model.norm_eps': float(field(hf, 'rms_norm_eps', architecture)),
      'model.qkv_bias': attention['qkv_bias'],
      'model.out_bias': attention['out_bias'],
      'model.qk_norm': attention['qk_norm'],
      'model.attention.kind': attention['kind'],
      'model.attention.alternate_layers': '',
      'model.layer_attention': (),
  }
  overrides.update({f'model.rope.{k}': v for k, v in rope_fields(hf, architecture).items()})
  return overrides


def source_dtype(hf):
  """The weights' dtype name as the config states it ('bfloat16', 'float32', ...)."""
  return str(hf.get('torch_dtype') or hf.get('dtype') or 'float32')


def llama_config(model_cfg, dtype='float32'):
  """A LlamaForCausalLM config.json dict for a sparseformer model that has no source
  config (trained here). model_cfg: a resolved ModelDims."""
  d = model_cfg
  if d.qk_norm or (d.qkv_bias != d.out_bias):
    raise UserError('this model has q/k norms or biases on q/k/v only, which LlamaForCausalLM lacks; it has no '
                    'source config.json to export it as (Qwen2 / Qwen3)')
  config = {
      'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'hidden_act': 'silu',
      'vocab_size': d.vocab_size, 'hidden_size': d.d_model, 'num_hidden_layers': d.num_layers,
      'num_attention_heads': d.num_heads, 'num_key_value_heads': d.num_kv_heads, 'head_dim': d.head_dim,
      'intermediate_size': d.mlp_dim, 'rms_norm_eps': d.norm_eps, 'rope_theta': d.rope.theta,
      'tie_word_embeddings': d.tie_embeddings, 'attention_bias': d.qkv_bias, 'mlp_bias': False,
      'torch_dtype': dtype, 'bos_token_id': 1, 'eos_token_id': 2, 'pad_token_id': 0,
      'max_position_embeddings': max(d.rope.original_seq_len, 2048),
  }
  config['rope_scaling'] = rope_scaling_of(d.rope)
  return config


def rope_scaling_of(rope):
  if rope.scaling == 'none':
    return None
  if rope.scaling == 'linear':
    return {'rope_type': 'linear', 'factor': rope.factor}
  if rope.scaling == 'llama3':
    return {'rope_type': 'llama3', 'factor': rope.factor, 'low_freq_factor': rope.low_freq_factor,
            'high_freq_factor': rope.high_freq_factor, 'original_max_position_embeddings': rope.original_seq_len}
  raise UserError(f'model.rope.scaling={rope.scaling!r} has no transformers equivalent that computes the same '
                  '(export with none, linear or llama3)')


def updated_source_config(hf, model_cfg):
  """The imported config.json with what a fine-tune may change (the RoPE scaling) brought
  up to date, and a check that the shapes still agree."""
  overrides = model_overrides(hf)
  for name, value in (('model.d_model', model_cfg.d_model), ('model.num_layers', model_cfg.num_layers),
                      ('model.num_heads', model_cfg.num_heads), ('model.num_kv_heads', model_cfg.num_kv_heads),
                      ('model.head_dim', model_cfg.head_dim), ('model.mlp_dim', model_cfg.mlp_dim),
                      ('model.vocab_size', model_cfg.vocab_size)):
    if overrides[name] != value:
      raise UserError(f'{name}={value} differs from the imported config.json ({overrides[name]}): the weights '
                      'no longer fit that architecture')
  source_rope = {k.split('.')[-1]: v for k, v in overrides.items() if k.startswith('model.rope.')}
  if all(model_cfg.rope[k] == v for k, v in source_rope.items()):
    return dict(hf)
  if 'rope_parameters' in hf:  # transformers 5
    parameters = rope_scaling_of(model_cfg.rope) or {'rope_type': 'default'}
    return {**hf, 'rope_parameters': {**parameters, 'rope_theta': model_cfg.rope.theta}}
  return {**hf, 'rope_scaling': rope_scaling_of(model_cfg.rope), 'rope_theta': model_cfg.rope.theta}
