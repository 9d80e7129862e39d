"""The nominal attention FLOPs each mechanism reports (the comparison command's cost axis)."""

import numpy as np
import pytest

from sparseformer.config import base_config
from sparseformer.model import resolve_dims
from sparseformer.model.attention.base import layer_attention_flops, mean_causal_keys, softmax_flops


def dims_for(kind, **attention):
  m = base_config().model
  m.d_model, m.num_layers, m.num_heads, m.num_kv_heads = 256, 2, 4, 2
  m.attention.kind = kind
  for key, value in attention.items():
    node = m.attention
    *parents, leaf = key.split('.')
    for part in parents:
      node = node[part]
    node[leaf] = value
  return resolve_dims(m, 259)


@pytest.mark.parametrize('seq_len,window', [(1, None), (7, None), (100, 10), (100, 100), (100, 1000), (64, 1)])
def test_mean_causal_keys_counts_every_position(seq_len, window):
  w = seq_len if window is None else window
  expected = np.mean([min(t + 1, w) for t in range(seq_len)])
  assert mean_causal_keys(seq_len, window) == pytest.approx(expected)


def test_dense_is_the_causal_triangle():
  dims = dims_for('dense')
  assert layer_attention_flops(dims, 1024) == [softmax_flops(4, 64, 1025 / 2)] * 2


def test_a_window_as_long_as_the_row_costs_as_much_as_dense():
  assert layer_attention_flops(dims_for('window:1024'), 1024) == layer_attention_flops(dims_for('dense'), 1024)
  assert layer_attention_flops(dims_for('window:128'), 1024)[0] < layer_attention_flops(dims_for('dense'), 1024)[0] / 4


def test_costs_follow_each_mechanism_argument():
  at = lambda kind, length=4096, **a: layer_attention_flops(dims_for(kind, **a), length)[0]  # noqa: E731
  assert at('dynamic_mask:256') == at('window:256')
  assert at('block_local:512') == pytest.approx(softmax_flops(4, 64, 513 / 2))
  # gated: density 1 keeps every causal block (plus the gate), lower density proportionally less
  assert at('gated', **{'gate.density': 1.0}) >= at('dense')
  assert at('gated', **{'gate.density': 0.25}) < 0.3 * at('gated', **{'gate.density': 1.0})
  # routing: more clusters, fewer keys; no local heads and one cluster is dense plus the centroid scores
  assert at('routing:16') < at('routing:4')
  assert at('routing:1', **{'routing.local_heads': 0}) == pytest.approx(at('dense') + 4 * 2 * 64)
  # SSE: linear in the branches, independent of the length
  assert at('sse:4', 1024) == at('sse:4', 65536)
  assert at('sse:8', **{'sse.mode': 'mask'}) > at('sse:4', **{'sse.mode': 'mask'})
  assert at('sse:8', **{'sse.mode': 'varlen'}) == at('sse:4', **{'sse.mode': 'varlen'})


def test_every_layer_gets_its_own_mechanism_cost():
  m = base_config().model
  m.d_model, m.num_layers, m.num_heads = 128, 3, 2
  m.layer_attention = ('dense', 'window:16', 'dense')
  flops = layer_attention_flops(resolve_dims(m, 259), 256)
  assert flops[0] == flops[2] > flops[1]
