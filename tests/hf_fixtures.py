"""Tiny Hugging Face model directories written with NumPy (no transformers): config.json
as each family's transformers config writes it, random weights under transformers'
names and layouts in safetensors, and a byte-level tokenizer.json. The import tests
check sparseformer against tests/reference_lm.hf_logits on these."""

import json

import ml_dtypes
import numpy as np

from sparseformer.interop import safetensors

BASE = {'hidden_size': 64, 'num_hidden_layers': 2, 'num_attention_heads': 4, 'num_key_value_heads': 2,
        'intermediate_size': 96, 'vocab_size': 384, 'rms_norm_eps': 1e-5, 'hidden_act': 'silu',
        'max_position_embeddings': 256, 'bos_token_id': 0, 'eos_token_id': 1}
FAMILIES = {
    'llama': {**BASE, 'architectures': ['LlamaForCausalLM'], 'model_type': 'llama', 'rope_theta': 500000.0,
              'tie_word_embeddings': False, 'attention_bias': False, 'mlp_bias': False, 'torch_dtype': 'bfloat16',
              'rope_scaling': {'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                               'original_max_position_embeddings': 32}},
    'mistral': {**BASE, 'architectures': ['MistralForCausalLM'], 'model_type': 'mistral', 'rope_theta': 10000.0,
                'tie_word_embeddings': False, 'sliding_window': 8, 'torch_dtype': 'float32'},
    'qwen2': {**BASE, 'architectures': ['Qwen2ForCausalLM'], 'model_type': 'qwen2', 'rope_theta': 1000000.0,
              'tie_word_embeddings': True, 'use_sliding_window': False, 'sliding_window': 4096,
              'torch_dtype': 'float32'},
    'qwen3': {**BASE, 'architectures': ['Qwen3ForCausalLM'], 'model_type': 'qwen3', 'rope_theta': 1000000.0,
              'tie_word_embeddings': True, 'head_dim': 32, 'attention_bias': False, 'use_sliding_window': False,
              'torch_dtype': 'bfloat16'},
}
DTYPES = {'bfloat16': ml_dtypes.bfloat16, 'float32': np.float32}


def tensor_shapes(hf):
  """{name: shape} of every tensor a transformers model of this config saves."""
  d, heads, kv = hf['hidden_size'], hf['num_attention_heads'], hf['num_key_value_heads']
  head_dim, f = hf.get('head_dim') or d // heads, hf['intermediate_size']
  shapes = {'model.embed_tokens.weight': (hf['vocab_size'], d)}
  for i in range(hf['num_hidden_layers']):
    p = f'model.layers.{i}'
    shapes.update({f'{p}.input_layernorm.weight': (d,), f'{p}.post_attention_layernorm.weight': (d,),
                   f'{p}.self_attn.q_proj.weight': (heads * head_dim, d), f'{p}.self_attn.k_proj.weight': (kv * head_dim, d),
                   f'{p}.self_attn.v_proj.weight': (kv * head_dim, d), f'{p}.self_attn.o_proj.weight': (d, heads * head_dim),
                   f'{p}.mlp.gate_proj.weight': (f, d), f'{p}.mlp.up_proj.weight': (f, d), f'{p}.mlp.down_proj.weight': (d, f)})
    if hf['model_type'] == 'qwen2' or hf.get('attention_bias'):
      shapes.update({f'{p}.self_attn.q_proj.bias': (heads * head_dim,), f'{p}.self_attn.k_proj.bias': (kv * head_dim,),
                     f'{p}.self_attn.v_proj.bias': (kv * head_dim,)})
    if hf.get('attention_bias'):
      shapes[f'{p}.self_attn.o_proj.bias'] = (d,)
    if hf['model_type'] == 'qwen3':
      shapes.update({f'{p}.self_attn.q_norm.weight': (head_dim,), f'{p}.self_attn.k_norm.weight': (head_dim,)})
  shapes['model.norm.weight'] = (d,)
  if not hf['tie_word_embeddings']:
    shapes['lm_head.weight'] = (hf['vocab_size'], d)
  return shapes


def random_tensors(hf, seed=0):
  rng = np.random.default_rng(seed)
  dtype = DTYPES[hf['torch_dtype']]
  tensors = {}
  for name, shape in tensor_shapes(hf).items():
    if name.endswith('norm.weight') or 'layernorm' in name:
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    else:
      value = 0.08 * rng.standard_normal(shape)
    tensors[name] = value.astype(dtype)
  return tensors


def write_model(directory, family, *, shards=1, seed=0, **changes):
  """Writes the model directory; returns (config dict, tensors)."""
  from test_hf_tokenizer import byte_level
  hf = {**FAMILIES[family], **changes}
  directory.mkdir(parents=True, exist_ok=True)
  byte_level(directory, bos=family in ('llama', 'mistral'))
  (directory / 'config.json').write_text(json.dumps(hf))
  tensors = random_tensors(hf, seed)
  names = list(tensors)
  if shards == 1:
    safetensors.write_file(directory / 'model.safetensors', tensors, {'format': 'pt'})
  else:
    weight_map = {}
    for k in range(shards):
      part = f'model-{k + 1:05d}-of-{shards:05d}.safetensors'
      chosen = names[k::shards]
      safetensors.write_file(directory / part, {n: tensors[n] for n in chosen}, {'format': 'pt'})
      weight_map.update({n: part for n in chosen})
    (directory / 'model.safetensors.index.json').write_text(json.dumps({'metadata': {}, 'weight_map': weight_map}))
  return hf, tensors
