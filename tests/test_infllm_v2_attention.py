"""InfLLM-V2 against dense softmax attention restricted to the blocks its rule picks, the
rule written out here in NumPy float64 from its definition (mean-pooled key spans, each
query's softmax over the complete spans of its document, summed over its GQA group and
query block onto the selection blocks the spans overlap; the document's first block, the
local blocks, then the best up to select_count): outputs and gradients, single and packed
rows, GQA, ragged lengths; dense below sparse_from; the choice shared by a group; config
errors; FLOPs; continued training from a dense checkpoint keeps every parameter.

Tolerance: float32, |infllm_v2 - dense| <= 2e-5 + 2e-5 |dense| (as the other mechanisms')."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from oracles import check_layer_against_oracle, masked_softmax_attention
from train_helpers import init_from_parameters, run_in_process, tiny_argv

from sparseformer import config as config_lib
from sparseformer.cli import compare
from sparseformer.cli.compare_arms import paper_arms, suite_run
from sparseformer.cli.eval import load_run_config
from sparseformer.cli.train import train_command
from sparseformer.config import base_config
from sparseformer.errors import UserError
from sparseformer.model import resolve_dims
from sparseformer.model.attention import AttentionContext, get_mechanism
from sparseformer.model.attention.base import layer_attention_flops

BLOCK = 16
SMALL = dict(cmp_len=16, cmp_stride=8, select_block=32, select_count=3, local_blocks=1, sparse_from=64)


def make_layer(kv_heads=2, heads=4, head_dim=16, **options):
  cfg = base_config().model
  cfg.num_layers, cfg.layer_attention, cfg.attention.block_size = 1, ('infllm_v2',), BLOCK
  cfg.num_heads, cfg.num_kv_heads, cfg.d_model = heads, kv_heads, heads * head_dim
  for name, value in {**SMALL, **options}.items():
    cfg.attention.infllm_v2[name] = value
  return get_mechanism('infllm_v2')(resolve_dims(cfg, 259), 0, nnx.Rngs(0))


def chosen_mask(q, k, segments, *, cmp_len, cmp_stride, select_block, select_count, local_blocks, **_):
  """bool [B, Hkv, T, T]: the keys InfLLM-V2's rule gives each query, token by token: query
  block I ranks the selection blocks of its document with query block I - 1's mass; the
  document's first block and the local blocks always, then the best up to select_count
  (ties to the earlier block)."""
  q, k = np.asarray(q, np.float64), np.asarray(k, np.float64)
  b, t, h, d = q.shape
  hkv = k.shape[2]
  group = h // hkv
  segments = np.ones((b, t), int) if segments is None else np.asarray(segments)
  spans = [(j * cmp_stride, j * cmp_stride + cmp_len) for j in range((t - cmp_len) // cmp_stride + 1)]
  ns, nq = -(-t // select_block), -(-t // BLOCK)
  visible = np.zeros((b, hkv, t, t), bool)
  for row in range(b):
    seg = segments[row]
    k_cmp = np.stack([k[row, s:e].mean(0) for s, e in spans])  # [Tc, Hkv, D]
    starts = [i for i in range(t) if i == 0 or seg[i] != seg[i - 1]]
    for kv in range(hkv):
      mass = np.zeros((nq, ns))
      for i in range(t):
        seen = [j for j, (s, e) in enumerate(spans) if e - 1 <= i and (seg[s:e] == seg[i]).all()]
        if seg[i] == 0 or not seen:
          continue
        for head in range(kv * group, (kv + 1) * group):
          logits = np.array([q[row, i, head] @ k_cmp[j, kv] for j in seen]) / np.sqrt(d)
          p = np.exp(logits - logits.max())
          p /= p.sum()
          for weight, j in zip(p, seen):
            s, e = spans[j]
            for block in range(s // select_block, (e - 1) // select_block + 1):
              mass[i // BLOCK, block] += weight
      key_last = [seg[min(t, (s + 1) * select_block) - 1] for s in range(ns)]
      for query_block in range(nq):
        first, last = query_block * BLOCK, min(t, (query_block + 1) * BLOCK) - 1
        own = first // select_block
        allowed = [s for s in range(own + 1) if s == own or key_last[s] == seg[first]]
        document_start = max(x for x in starts if x <= first)
        forced = ({document_start // select_block} | set(range(own - local_blocks + 1, own + 1))) & set(allowed)
        votes = mass[query_block - 1] if query_block else np.zeros(ns)  # the previous query block's
        others = sorted((s for s in allowed if s not in forced), key=lambda s: (-votes[s], s))
        for s in forced | set(others[:max(0, select_count - len(forced))]):
          visible[row, kv, first:last + 1, s * select_block:(s + 1) * select_block] = True
  causal = np.tril(np.ones((t, t), bool))
  same_doc = segments[:, :, None] == segments[:, None, :]
  return visible & causal & same_doc[:, None]


CASES = [  # t, kv_heads, options, packed
    (200, 2, {}, False), (200, 2, {'local_blocks': 2, 'select_count': 4}, True),
    (150, 4, {'select_block': 16, 'cmp_len': 8, 'cmp_stride': 8}, True), (170, 1, {'select_count': 2}, False),
]


@pytest.mark.parametrize('t,kv_heads,options,packed', CASES)
def test_layer_equals_dense_attention_on_the_blocks_its_rule_picks(t, kv_heads, options, packed):
  b, h, d = 2, 4, 16
  keys = jax.random.split(jax.random.key(7), 4)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k, v = (jax.random.normal(key, (b, t, kv_heads, d)) for key in keys[1:3])
  d_out = jax.random.normal(keys[3], (b, t, h, d))
  docs = [1] * (t // 2 - 3) + [2] * (t // 2 - 9) + [3] * 7
  segments = jnp.asarray([docs + [0] * (t - len(docs)), [1] * t], jnp.int32) if packed else None
  layer = make_layer(kv_heads, h, d, **options)
  ctx = AttentionContext(jnp.zeros((b, t), jnp.int32), segments, None, None)
  allowed = chosen_mask(q, k, segments, **{**SMALL, **options})

  aux = check_layer_against_oracle(lambda q, k, v: layer(q, k, v, ctx), q, k, v, d_out, allowed, segments)
  assert 0 < float(aux['stats']['infllm_v2_select_fraction']) < 1


def test_short_rows_run_dense_and_long_rows_sparse():
  b, t, h, d = 1, 128, 4, 16
  keys = jax.random.split(jax.random.key(1), 3)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k, v = (jax.random.normal(key, (b, t, 2, d)) for key in keys[1:])
  ctx = AttentionContext(jnp.zeros((b, t), jnp.int32), None, None, None)
  dense = jax.jit(lambda q, k, v: masked_softmax_attention(q, k, v, causal=True))(q, k, v)
  call = lambda layer: jax.jit(lambda q, k, v: layer(q, k, v, ctx))(q, k, v)  # compiled, not op by op
  y_short, aux = call(make_layer(sparse_from=129))
  np.testing.assert_allclose(y_short, dense, rtol=2e-5, atol=2e-5)
  assert aux['stats'] == {}
  y_long, aux = call(make_layer(sparse_from=128))
  assert float(aux['stats']['infllm_v2_select_fraction']) < 1 and not np.allclose(y_long, dense, atol=1e-3)


def test_a_group_shares_its_blocks_and_nothing_later_is_seen():
  b, t, h, d = 1, 192, 4, 16
  keys = jax.random.split(jax.random.key(3), 3)
  q = jax.random.normal(keys[0], (b, t, h, d))
  k, v = (jax.random.normal(key, (b, t, 2, d)) for key in keys[1:])
  layer = make_layer()
  chosen, _ = jax.jit(lambda q, k: layer.choose(q, k, None, d ** -0.5))(q, k)
  assert chosen.shape == (1, 2, 12, 12)  # one choice per kv head: the group's heads share it
  ctx = AttentionContext(jnp.zeros((b, t), jnp.int32), None, None, None)
  later = 100  # inside a query block: its later tokens must not change its choice
  call = jax.jit(lambda q, k, v: layer(q, k, v, ctx)[0])  # compiled once for both calls
  y = call(q, k, v)
  y2 = call(q.at[:, later:].multiply(-1.5), k.at[:, later:].multiply(-2.0), v.at[:, later:].multiply(3.0))
  np.testing.assert_allclose(y[:, :later], y2[:, :later], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('field,value,message', [
    ('select_block', 40, 'model.attention.infllm_v2.select_block=40: use a multiple of model.attention.block_size'),
    ('cmp_stride', 24,
     r'model.attention.infllm_v2.cmp_len=32: use a multiple of model.attention.infllm_v2.cmp_stride \(24\)'),
    ('select_count', 2, r'model.attention.infllm_v2.select_count=2: use at least local_blocks \+ 1 \(3\)'),
    ('sparse_from', 0, 'model.attention.infllm_v2.sparse_from=0: use a length of at least 1'),
])
def test_bad_infllm_v2_configs_are_one_line_errors(field, value, message):
  cfg = base_config()
  cfg.model.attention.kind, cfg.model.attention.block_size = 'infllm_v2', 64
  cfg.model.attention.infllm_v2[field] = value
  with pytest.raises(UserError, match=message) as error:
    config_lib.validate(cfg)
  assert '\n' not in str(error.value)


def test_flops_are_dense_below_the_switch_and_fewer_above():
  def flops(seq_len, sparse_from):
    m = base_config().model
    m.d_model, m.num_layers, m.num_heads, m.attention.kind = 256, 1, 4, 'infllm_v2'
    m.attention.infllm_v2.sparse_from = sparse_from
    return layer_attention_flops(resolve_dims(m, 259), seq_len)[0]
  dense = base_config().model
  dense.d_model, dense.num_layers, dense.num_heads = 256, 1, 4
  dense_flops = layer_attention_flops(resolve_dims(dense, 259), 8192)[0]
  assert flops(8192, 16384) == pytest.approx(dense_flops)
  keys = (2048 * 2049 / 2 + (8192 - 2048) * 2048) / 8192  # 16 blocks of 128 tokens, fewer at the start
  spans = ((8192 - 32) // 16 + 1) / 2
  assert flops(8192, 8192) == pytest.approx(4 * 4 * 64 * keys + 2 * 4 * 64 * spans)
  assert flops(8192, 8192) < dense_flops / 2


@pytest.mark.parametrize('seq_len', [256, 512, 2048, 8192])
def test_the_comparison_arm_validates_and_runs_sparse_at_the_suites_lengths(seq_len):
  run = suite_run()
  run.data.seq_len = seq_len
  (name, changes), = paper_arms(seq_len, names=('infllm_v2',))
  cfg = compare.arm_config(run, name, changes)
  assert cfg.model.attention.kind == 'infllm_v2' and cfg.model.attention.infllm_v2.sparse_from <= seq_len


def test_continued_training_from_a_dense_checkpoint_keeps_every_parameter(tmp_path, data_dir, capsys):
  """InfLLM-V2 adds no parameter: a dense checkpoint loads whole into it (nothing fresh,
  nothing skipped), bitwise, and the run trains on at a length where it is sparse."""
  dense, sparse = tmp_path / 'dense', tmp_path / 'sparse'
  assert run_in_process(train_command, tiny_argv(dense, data_dir, train__steps=2), capsys).returncode == 0
  cfg = load_run_config(str(dense))
  cfg.model.attention.kind, cfg.model.attention.block_size, cfg.data.seq_len = 'infllm_v2', 64, 128
  for name, value in {**SMALL, 'select_block': 64, 'select_count': 2}.items():
    cfg.model.attention.infllm_v2[name] = value
  report, loaded, saved = init_from_parameters(cfg, dense, 2)
  assert report['loaded'] and not report['initialised'] and not report['skipped'], report
  jax.tree.map(np.testing.assert_array_equal, saved, loaded)
  options = {f'model__attention__infllm_v2__{name}': value for name, value in
             {**SMALL, 'select_block': 64, 'select_count': 2}.items()}
  result = run_in_process(train_command, tiny_argv(sparse, data_dir, train__steps=2, data__seq_len=128,
                                                   model__attention__kind='infllm_v2', model__attention__block_size=64,
                                                   init_from=str(dense), **options), capsys)
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'initialised 0 fresh' in result.stdout, result.stdout[-2000:]
