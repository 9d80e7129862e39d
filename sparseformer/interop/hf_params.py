"""Hugging Face tensor names and layouts <-> sparseformer's parameter tree (Llama, Mistral,
Qwen2, Qwen3 share them).

transformers stores a linear layer as weight [out, in] (y = x W^T); sparseformer stores
einsum kernels [in, *out] (query [d_model, heads, head_dim], out [heads, head_dim,
d_model]). Both use the half-split rotary layout (feature i pairs with i + head_dim / 2),
so the q and k weights need no permutation. Every conversion is a transpose and a
reshape: exact, so import -> export gives back the same bits.
"""

import dataclasses

import numpy as np

# The transforms: HF array -> ours (to_ours) and back (to_hf), given our shape.
LAYOUTS = ('same', 'transpose', 'linear_in', 'linear_out', 'split_bias')


@dataclasses.dataclass(frozen=True)
class Entry:
  path: tuple  # our parameter path, e.g. ('blocks', 0, 'attention', 'query', 'kernel')
  name: str  # the transformers tensor name
  layout: str  # one of LAYOUTS

  def to_ours(self, array, shape):
    if self.layout == 'same':
      return array
    if self.layout == 'transpose':
      return array.T
    if self.layout == 'linear_in':  # [out..., in] -> [in, out...]
      return array.T.reshape(shape)
    if self.layout == 'linear_out':  # [out, in...] -> [in..., out]
      return array.T.reshape(shape)
    return array.reshape(shape)  # split_bias: [heads * head_dim] -> [heads, head_dim]

  def to_hf(self, array):
    if self.layout == 'same':
      return array
    if self.layout == 'transpose':
      return np.ascontiguousarray(array.T)
    if self.layout == 'linear_in':
      return np.ascontiguousarray(array.reshape(array.shape[0], -1).T)
    if self.layout == 'linear_out':
      return np.ascontiguousarray(array.reshape(-1, array.shape[-1]).T)
    return array.reshape(-1)


def layer_entries(i, dims):
  """The entries of decoder layer i."""
  hf, ours = f'model.layers.{i}', ('blocks', i)
  entries = [
      Entry(ours + ('attention_norm', 'scale'), f'{hf}.input_layernorm.weight', 'same'),
      Entry(ours + ('mlp_norm', 'scale'), f'{hf}.post_attention_layernorm.weight', 'same'),
      Entry(ours + ('mlp', 'gate', 'kernel'), f'{hf}.mlp.gate_proj.weight', 'transpose'),
      Entry(ours + ('mlp', 'up', 'kernel'), f'{hf}.mlp.up_proj.weight', 'transpose'),
      Entry(ours + ('mlp', 'down', 'kernel'), f'{hf}.mlp.down_proj.weight', 'transpose'),
      Entry(ours + ('attention', 'out', 'kernel'), f'{hf}.self_attn.o_proj.weight', 'linear_out'),
  ]
  for ours_name, hf_name in (('query', 'q_proj'), ('key', 'k_proj'), ('value', 'v_proj')):
    entries.append(Entry(ours + ('attention', ours_name, 'kernel'), f'{hf}.self_attn.{hf_name}.weight', 'linear_in'))
    if dims.qkv_bias:
      entries.append(Entry(ours + ('attention', ours_name, 'bias'), f'{hf}.self_attn.{hf_name}.bias', 'split_bias'))
  if dims.out_bias:
    entries.append(Entry(ours + ('attention', 'out', 'bias'), f'{hf}.self_attn.o_proj.bias', 'same'))
  if dims.qk_norm:
    entries.append(Entry(ours + ('attention', 'query_norm', 'scale'), f'{hf}.self_attn.q_norm.weight', 'same'))
    entries.append(Entry(ours + ('attention', 'key_norm', 'scale'), f'{hf}.self_attn.k_norm.weight', 'same'))
  return entries


def entries(dims):
  """Every parameter with a transformers counterpart, in transformers' order."""
  out = [Entry(('embedding',), 'model.embed_tokens.weight', 'same')]
  for i in range(dims.num_layers):
    out += layer_entries(i, dims)
  out.append(Entry(('final_norm', 'scale'), 'model.norm.weight', 'same'))
  if not dims.tie_embeddings:
    out.append(Entry(('unembedding',), 'lm_head.weight', 'transpose'))
  return out


def ignorable(name, dims):
  """Tensors a checkpoint may hold that carry nothing sparseformer needs: rotary tables
  (recomputed) and a copy of tied embeddings."""
  return name.endswith('rotary_emb.inv_freq') or (dims.tie_embeddings and name == 'lm_head.weight')
