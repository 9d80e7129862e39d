"""Draws docs/plans/moba.png and docs/plans/infllm_v2.png (docs/block_selection.md): one layer
of each at 4096 tokens, 64-token blocks, random q and k, kv head 0.

    python docs/plans/draw_block_selection.py
"""

import os

import jax
from flax import nnx
from pallas_kernels.block_sparse_attention import plan_from_block_mask
from pallas_kernels.block_sparse_attention.render import render_plan
from sparseformer.config import base_config
from sparseformer.model import resolve_dims
from sparseformer.model.attention import get_mechanism

T, BLOCK = 4096, 64
keys = jax.random.split(jax.random.key(0), 2)
q = jax.random.normal(keys[0], (1, T, 4, 64))
k = jax.random.normal(keys[1], (1, T, 2, 64))
for kind, options in (('moba', {'block': 512, 'top_k': 3}),
                      ('infllm_v2', {'select_block': 64, 'select_count': 16, 'sparse_from': 1})):
  m = base_config().model
  m.num_layers, m.layer_attention, m.attention.block_size = 1, (kind,), BLOCK
  m.d_model, m.num_heads, m.num_kv_heads, m.dtype = 256, 4, 2, 'float32'
  for name, value in options.items():
    m.attention[kind][name] = value
  layer = get_mechanism(kind)(resolve_dims(m, 259), 0, nnx.Rngs(0))
  chosen, _ = layer.choose(q, k, None) if kind == 'moba' else layer.choose(q, k, None, 64 ** -0.5)
  plan = plan_from_block_mask(chosen, q_len=T, block_q=BLOCK, block_kv=BLOCK)
  render_plan(plan, os.path.join(os.path.dirname(os.path.abspath(__file__)), f'{kind}.png'), title=f'{kind}: {T} x {T}, blocks {BLOCK}, kv head 0')
