"""benchmarks/attention.py on the CPU: the --quick smoke run end to end, and the pieces a
wrong number would come from (FLOP count, FlexAttention's block lists, the window
semantics handed to jax.nn.dot_product_attention, the WRONG mark)."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train_helpers import child_env

from benchmarks import attention as bench
from pallas_kernels.block_sparse_attention.masks import EMPTY, FULL, PARTIAL

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_run_prints_one_table_and_writes_json(tmp_path, capsys, monkeypatch):
  """The script's main in this process (no child Python to start, import jax and compile);
  the command line itself is main's argv."""
  out = tmp_path / 'attention.json'
  monkeypatch.chdir(tmp_path)
  bench.main(['--quick', '--implementations', 'reference,no_such_kernel', '--out', str(out)])
  stdout = capsys.readouterr().out
  assert len(re.findall(r'^S +mask +pass +impl', stdout, re.MULTILINE)) == 1  # one table
  rows = json.loads(out.read_text())['rows']
  missing = [r for r in rows if r['implementation'] == 'ours:no_such_kernel']
  assert len(missing) == 6 and all('unknown implementation' in r['note'] for r in missing)
  rows = [r for r in rows if r not in missing]
  by_key = {(r['mask'], r['direction'], r['implementation']): r for r in rows}
  assert len(by_key) == 10  # (ours, xla) x (fwd, fwd+bwd) x 3 masks, no xla for random blocks
  for row in rows:
    assert row['ms'] > 0 and row['tflops'] > 0, row
    assert row['err'] < 0.05 and 'WRONG' not in row['note'], row
  ours = by_key[('causal', 'fwd', 'ours:reference')]
  assert ours['vs_cudnn'] > 0 and ours['target'].startswith('cuDNN>=0.95:')
  random_target = by_key[('random:0.5', 'fwd+bwd', 'ours:reference')]['target']
  assert random_target.startswith('cuDNN>=0.75:') and random_target.endswith('Flex>1:n/a')  # torch is left out


@pytest.mark.slow  # 16 s; test_quick_run_prints_one_table_and_writes_json runs the benchmark by default
def test_attention_quick_run_with_gqa_and_a_deterministic_row(tmp_path, capsys):
  """4 query heads on 2 kv heads through ours, the XLA baseline and the oracle; NAME:deterministic
  is a row of its own (on the CPU the reference's one backward). Two masks keep it short."""
  out = tmp_path / 'attention.json'
  bench.main(['--quick', '--heads', '4', '--kv-heads', '2', '--implementations', 'reference,reference:deterministic',
              '--masks', 'causal_window:256,random:0.5', '--out', str(out)])
  assert 'H=4 query heads, 2 kv heads (GQA, 2 query heads per kv head)' in capsys.readouterr().out
  report = json.loads(out.read_text())
  assert report['meta']['heads'] == 4 and report['meta']['kv_heads'] == 2
  by_key = {(r['mask'], r['direction'], r['implementation']): r for r in report['rows']}
  labels = ('ours:reference', 'ours:reference:deterministic')
  expected = {(mask, direction, label) for mask in ('causal_window:256', 'random:0.5')
              for direction in ('fwd', 'fwd+bwd') for label in labels}
  expected |= {('causal_window:256', direction, 'xla') for direction in ('fwd', 'fwd+bwd')}
  assert set(by_key) == expected and len(report['rows']) == len(expected)
  for row in report['rows']:
    assert row['ms'] > 0 and row['err'] < 0.05 and 'WRONG' not in row['note'], row
  for label in labels:  # dk, dv [1, S, 2, D] checked against XLA's GQA
    assert by_key[('causal_window:256', 'fwd+bwd', label)]['dkv'] < 0.1
    assert by_key[('causal_window:256', 'fwd', label)]['target'].startswith('cuDNN>=1:')
  random_plan = bench.make_plan('random:0.5', 512, 128, heads=4)  # per query head, as without GQA
  assert by_key[('random:0.5', 'fwd', labels[1])]['tiles'] == bench.visited_tiles(random_plan, 4)
  with pytest.raises(SystemExit):
    bench.parse_args(['--heads', '4', '--kv-heads', '3'])
  assert bench.split_implementation('mosaic_gpu:deterministic') == ('mosaic_gpu', True)


def test_re_tiled_patterns_also_run_as_their_layers_do(tmp_path):
  """neighborhood:K/D and fixed:S: ours on the row's plan and as the layer tiles them
  (groups gathered; summary keys gathered), all against the exact rows; the re-tiled rows
  visit fewer tiles and count the same FLOPs."""
  out = tmp_path / 'attention.json'
  bench.main(['--quick', '--masks', 'neighborhood:40/4,fixed:64', '--block', '32', '--no-flex', '--out', str(out)])
  by_key = {(r['mask'], r['direction'], r['implementation']): r for r in json.loads(out.read_text())['rows']}
  assert set(by_key) == {(mask, d, impl) for mask, suffix in (('neighborhood:40/4', 'grouped'), ('fixed:64', 'gathered'))
                         for d in ('fwd', 'fwd+bwd') for impl in ('ours:reference', f'ours:reference:{suffix}')}
  for row in by_key.values():
    assert row['ms'] > 0 and row['err'] < 0.05 and 'WRONG' not in row['note'], row
  for mask, suffix in (('neighborhood:40/4', 'grouped'), ('fixed:64', 'gathered')):
    rows, layer = by_key[(mask, 'fwd', 'ours:reference')], by_key[(mask, 'fwd', f'ours:reference:{suffix}')]
    assert layer['flops'] == rows['flops'] and layer['tiles'] < rows['tiles'], mask


def test_flops_count_visited_tiles_of_every_head():
  plan = bench.make_plan('causal', 1024, 128, heads=16)
  assert plan.plan_heads == 1
  assert bench.visited_tiles(plan, 16) == 16 * 36
  assert bench.forward_flops(plan, 16, 128) == 4 * 128 * 128 * 128 * 16 * 36
  per_head = bench.make_plan('random:0.5', 1024, 128, heads=4)
  assert per_head.plan_heads == 4
  assert bench.visited_tiles(per_head, 8) == 2 * int(per_head.kv_count.sum())


def test_flex_block_lists_cover_the_plan_exactly():
  for spec in ('causal', 'causal_window:300', 'random:0.3'):
    plan = bench.make_plan(spec, 2048, 128, heads=3)
    partial_count, partial_index, full_count, full_index = bench.flex_block_lists(plan)
    kinds = np.asarray(plan.block_kinds())
    rebuilt = np.zeros_like(kinds)
    for count, index, kind in ((partial_count, partial_index, PARTIAL), (full_count, full_index, FULL)):
      assert count.dtype == index.dtype == np.int32
      for head, row in np.ndindex(*kinds.shape[1:3]):
        chosen = index[0, head, row, :count[0, head, row]]
        assert (np.diff(chosen) > 0).all()
        assert (rebuilt[0, head, row, chosen] == EMPTY).all()  # partial and full lists are disjoint
        rebuilt[0, head, row, chosen] = kind
    np.testing.assert_array_equal(rebuilt, kinds, err_msg=spec)


def test_window_handed_to_dot_product_attention_is_the_plans_window():
  length, window = 256, 100
  plan = bench.make_plan(f'causal_window:{window}', length, 64, heads=2)
  keys = jax.random.split(jax.random.key(1), 4)
  q, k, v, d_out = (jax.random.normal(key, (1, length, 2, 32), jnp.float32) for key in keys)
  rows = bench.sample_rows(length, 64)
  out_exact, _ = bench.exact_rows(q, k, v, d_out, plan, rows)
  out = bench.dense_attend('xla', f'causal_window:{window}')(q, k, v)
  np.testing.assert_allclose(np.asarray(out[:, rows]), out_exact, atol=2e-5)
  wider = bench.dense_attend('xla', f'causal_window:{window + 1}')(q, k, v)
  assert np.abs(np.asarray(wider[:, rows]) - out_exact).max() > 1e-3


def test_a_wrong_output_is_marked():
  exact_out = np.ones((1, 4, 2, 8), np.float32)
  exact_dq = np.ones((1, 4, 2, 8), np.float32)
  good = bench.Row(512, 'causal', 'fwd', 'ours:x', 1, 1.0)
  bad = bench.Row(512, 'causal', 'fwd', 'ours:y', 1, 1.0)
  bench.check_rows([(good, {'out': exact_out + 0.01}), (bad, {'out': exact_out * 1.5})], (exact_out, exact_dq))
  assert 'WRONG' not in good.note and 'WRONG' in bad.note
  assert np.isclose(bad.err, 0.5)


def run_train_throughput_quick(tmp_path, variants):
  """(stdout, JSON report) of a --quick run of benchmarks/train_throughput.py."""
  out = tmp_path / 'throughput.json'
  result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'train_throughput.py'), '--quick',
                           '--variants', variants, '--out', str(out)],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout, json.loads(out.read_text())


@pytest.mark.slow  # a benchmark script's CPU smoke run (20-70 s): bash scripts/test.sh -m slow
def test_train_throughput_quick_run_has_every_variant_and_the_routing_attention_time(tmp_path):
  """One run of the three variants (each run starts a Python and compiles dense again)."""
  stdout, report = run_train_throughput_quick(tmp_path, 'dense,masformer,routing')
  assert len(re.findall(r'^variant +params +remat', stdout, re.MULTILINE)) == 1  # one table
  rows = {r['variant']: r for r in report['rows']}
  assert set(rows) == {'dense', 'masformer', 'routing'}
  assert rows['dense']['layers'] == 'dense dense' and rows['masformer']['layers'] == 'window:64 dense'
  assert rows['routing']['layers'] == 'routing:4 routing:4'
  for row in rows.values():
    for field in ('params', 'compile_s', 'step_ms', 'tokens_per_s', 'peak_gib', 'loss', 'vs_dense'):
      assert np.isfinite(row[field]) and row[field] > 0, (field, row)
    assert np.isclose(row['tokens_per_s'], 256 / (row['step_ms'] / 1e3))
  assert rows['dense']['vs_dense'] == 1.0
  assert report['summary'][0].startswith('target masformer >= 2.5x dense tokens/s: ')
  assert all(t['fwd_bwd_ms'] > 0 for t in report['attention_layer'].values())
  assert report['attention_layer']['routing:4']['fwd_bwd_ms'] > 0
  assert any(line.startswith('routing: attention fwd+bwd') for line in report['summary'])


def test_train_throughput_target_verdict():
  from benchmarks import train_throughput
  rows = [{'variant': 'dense', 'tokens_per_s': 100.0}, {'variant': 'masformer', 'tokens_per_s': 260.0}]
  train_throughput.add_ratios(rows)
  assert train_throughput.target_line(rows).endswith('2.60x, met')
  rows[1]['tokens_per_s'] = 240.0
  train_throughput.add_ratios(rows)
  assert train_throughput.target_line(rows).endswith('2.40x, missed')
  assert train_throughput.target_line(rows[:1]).endswith('not measured')
  assert train_throughput.strip_option(['--quick', '--out', 'x.json', '--out=y'], '--out') == ['--quick']


def test_train_throughput_kernel_profile_sorts_kernels_by_kind():
  from benchmarks import train_throughput
  assert [train_throughput.kernel_kind(n) for n in ('block_sparse_dkv', 'sm90_flash_bwd', 'nvjet_tst_256x128',
                                                    'loop_fusion_3', 'chunk_dqk_kernel')] == [
      'attention', 'attention', 'matmul', 'other', 'attention']
  row = {'variant': 'dense', 'step_ms': 10.0, 'device_ms': 8.0, 'device_ms_by_kind': {'matmul': 5.0, 'other': 3.0},
         'longest_kernels': [['nvjet_a', 5.0], ['loop_fusion', 3.0]]}
  (line,) = train_throughput.kernel_profile_lines([row, {'variant': 'window', 'note': 'FAILED'}])
  assert line == 'dense: kernels 8.0 ms of a 10.0 ms step (matmul 5.0, other 3.0); longest: nvjet_a 5.00, loop_fusion 3.00'


@pytest.mark.slow  # a benchmark script's CPU smoke run (20-70 s): bash scripts/test.sh -m slow
def test_gated_attention_quick_run_times_every_row(tmp_path):
  out = tmp_path / 'gated.json'
  result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'gated_attention.py'), '--quick',
                           '--out', str(out)], capture_output=True, text=True, timeout=180, cwd=tmp_path)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert len(re.findall(r'^S +block +what +pass', result.stdout, re.MULTILINE)) == 1  # one table
  rows = json.loads(out.read_text())['rows']
  keys = {(r['block'], r['what'], r['direction']) for r in rows}
  expected = {(0, 'xla', 'fwd'), (0, 'xla', 'fwd+bwd')} | {
      (block, what, direction) for block in (64, 128)
      for what, direction in (('gate', 'fwd'), ('gated', 'fwd'), ('gated', 'fwd+bwd'), ('distill', 'fwd'),
                              ('distill', 'fwd+bwd'))}
  assert keys == expected and len(rows) == len(expected)
  for row in rows:
    assert row['ms'] > 0 and np.isfinite(row['vs_cudnn']) and not row['note'], row
  for row in (r for r in rows if (r['what'], r['direction']) == ('gated', 'fwd')):
    assert row['err'] < 0.05 and 0 < row['density'] <= 1 and row['kernel'] == 'reference', row


@pytest.mark.slow  # a benchmark script's CPU smoke run (20-70 s): bash scripts/test.sh -m slow
def test_seer_quality_quick_run_tabulates_dense_and_three_densities(tmp_path):
  out = tmp_path / 'seer'
  env = child_env()
  result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'seer_quality.py'), '--quick',
                           '--out', str(out), '--data_dir', str(tmp_path / 'tfds')],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert 'initialised: params/blocks/1/attention/mechanism/block_gate/key' in result.stdout
  results = json.loads((out / 'results.json').read_text())
  rows = {r['label']: r for r in results['rows']}
  assert list(rows) == ['dense', 'gates, dense forward', 'gates, density 0.5', 'gates, density 0.2',
                        'gates, density 0.1']
  assert len({r['tokens'] for r in rows.values()}) == 1
  # The frozen base through its dense attention is the dense checkpoint.
  assert abs(rows['gates, dense forward']['nll'] - rows['dense']['nll']) < 1e-4
  assert rows['dense']['kept'] == rows['gates, dense forward']['kept'] == 1.0
  assert 0 < rows['gates, density 0.1']['kept'] <= rows['gates, density 0.5']['kept'] < 1
  assert 0 < results['distill_stats']['gate_recall'] <= 1 and results['distill_stats']['train_density'] == 0.2
  for row in rows.values():
    assert np.isfinite(row['nll']) and np.isclose(row['perplexity'], np.exp(row['nll'])), row
    assert 0.5 < row['vs_dense'] < 2, row
  assert results['target'].startswith('target perplexity at density 0.2 <= 1.03 x dense: ')
  config = json.loads((out / 'gates' / 'config.json').read_text())['config']
  assert config['train']['trainable'] == '/block_gate/' and config['train']['lm_loss_weight'] == 0.0
  assert config['model']['attention']['kind'] == 'gated' and config['model']['d_model'] == 64
  assert (out / 'results.md').read_text().count('| gates, density') == 3


def test_seer_quality_target_verdict():
  from benchmarks import seer_quality
  # 128 blocks at density 0.1: k = 6 per row, all of the first rows' blocks, the diagonal and first block always
  n, k = 128, 6
  kept = 1 + 2 + sum(min(k, i + 1) for i in range(2, n))
  assert seer_quality.kept_fraction(0.1, 8192, 64) == kept / (n * (n + 1) / 2)
  assert seer_quality.kept_fraction(None, 8192, 64) == 1.0
  rows = [{'label': 'dense', 'density': None, 'perplexity': 10.0},
          {'label': 'gates, density 0.2', 'density': 0.2, 'perplexity': 10.2}]
  seer_quality.add_ratios(rows)
  assert seer_quality.target_line(rows).endswith('1.0200x, met')
  rows[1]['perplexity'] = 10.4
  seer_quality.add_ratios(rows)
  assert seer_quality.target_line(rows).endswith('1.0400x, missed')
  assert seer_quality.target_line(rows[:1]).endswith('not measured')


@pytest.mark.slow  # a benchmark script's CPU smoke run (20-70 s): bash scripts/test.sh -m slow
def test_dma_attention_quick_run_times_every_row(tmp_path):
  out = tmp_path / 'dma.json'
  result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'dma_attention.py'), '--quick',
                           '--block-smooth', 'budget', '--out', str(out)], capture_output=True, text=True,
                          timeout=240, cwd=tmp_path)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert len(re.findall(r'^S +block +what +pass', result.stdout, re.MULTILINE)) == 1  # one table
  rows = json.loads(out.read_text())['rows']
  keys = {(r['block'], r['what'], r['direction'], r['smooth']) for r in rows}
  dma_keys = {('select', 'fwd'), ('attention', 'fwd'), ('attention', 'fwd+bwd'), ('dma', 'fwd'), ('dma', 'fwd+bwd')}
  expected = {(0, what, direction, '') for what in ('xla', 'xla_window') for direction in ('fwd', 'fwd+bwd')} | {
      (64, what, direction, smooth) for what, direction in dma_keys for smooth in ('none', 'budget')}
  assert keys == expected and len(rows) == len(expected)
  for row in rows:
    assert row['ms'] > 0 and np.isfinite(row['vs_dense']) and np.isfinite(row['vs_window']) and not row['note'], row
  for smooth in ('none', 'budget'):
    dma = next(r for r in rows if (r['what'], r['direction'], r['smooth']) == ('dma', 'fwd', smooth))
    assert dma['err'] < 0.05 and 0 < dma['tiles'] <= 1 and dma['kernel'] == 'reference', dma
  tiles = {r['smooth']: r['tiles'] for r in rows if r['what'] == 'dma'}
  assert tiles['budget'] < tiles['none']  # whole blocks: the smoothed plan skips tiles the scattered top-w visits


def run_books_quality_quick(tmp_path, variants, timeout=300):
  """(OUT, results.json) of a --quick run of benchmarks/books_quality.py with these variants."""
  out = tmp_path / 'books'
  env = child_env()
  result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'books_quality.py'), '--quick',
                           '--variants', variants, '--out', str(out), '--data_dir', str(tmp_path / 'tfds')],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return out, json.loads((out / 'results.json').read_text())


@pytest.mark.slow  # a benchmark script's CPU smoke run (20-70 s): bash scripts/test.sh -m slow
def test_books_quality_quick_run_tabulates_the_variants_it_ran(tmp_path):
  out, results = run_books_quality_quick(tmp_path, 'dense,routing,dma')
  assert list(results['variants']) == ['dense', 'routing', 'dma']  # 'local' was not asked for
  for variant in results['variants'].values():
    assert np.isfinite(variant['eval']['nll']) and variant['eval']['seq_len'] == 256
  assert 0 < results['variants']['routing']['routing_stats']['train/layer1/routing_largest_cluster'] <= 1
  config = json.loads((out / 'routing' / 'config.json').read_text())['config']['model']
  assert config['attention']['full_kind'] == 'routing:4' and config['attention']['routing']['local_heads'] == 2
  table = (out / 'results.md').read_text()
  assert config['attention']['routing']['local_window'] == 64
  dma = json.loads((out / 'dma' / 'config.json').read_text())['config']['model']['attention']
  assert dma['kind'] == 'dynamic_mask:64'
  assert '| positions | dense | routing | DMA | routing/dense | DMA/dense |' in table and table.count('| overall |') == 1


@pytest.mark.slow
@pytest.mark.time_limit(660)  # its child process may take 600 s
def test_books_quality_quick_run_of_the_sse_variants(tmp_path):
  out, results = run_books_quality_quick(tmp_path, 'sse_h,gla', timeout=600)
  assert list(results['variants']) == ['sse_h', 'gla']
  for variant in results['variants'].values():
    assert np.isfinite(variant['eval']['nll'])
  sse = json.loads((out / 'sse_h' / 'config.json').read_text())['config']['model']['attention']
  gla = json.loads((out / 'gla' / 'config.json').read_text())['config']['model']['attention']
  assert (sse['kind'], sse['sse']['mode'], sse['full_layers']) == ('sse:4', 'varlen', 'every:4')
  assert (gla['kind'], gla['sse']['top_k'], gla['sse']['shared']) == ('sse:1', 1, False)
  assert '| positions | SSE-H | GLA-H (N=1) |' in (out / 'results.md').read_text()


@pytest.mark.parametrize('config_name,variants', [
    ('books_8192.py', {'': 'dense'}),
    ('routing_books.py', {'': 'routing', ':local': 'local', ':dense': 'dense'}),
    ('dma_books.py', {'': 'dma', ':window': 'local', ':dense': 'dense', ':budget': 'dma_budget'})])
def test_shipped_books_configs_are_the_books_quality_variants(config_name, variants):
  from benchmarks import books_quality
  from sparseformer import config as config_lib
  args = books_quality.parse_args(['--out', '/unused'])
  for preset, variant in variants.items():
    shipped = config_lib.flatten(config_lib.load_config_file(os.path.join(REPO, 'configs', config_name) + preset))
    script = config_lib.flatten(books_quality.train_config(args, variant))
    differing = {key for key in shipped if shipped[key] != script[key] and not key.startswith('train.log')}
    assert not differing, (preset, {key: (shipped[key], script[key]) for key in differing})


@pytest.mark.slow  # a benchmark script's CPU smoke run (20-70 s): bash scripts/test.sh -m slow
def test_block_selection_quick_run_times_every_mechanism_and_dense(tmp_path):
  out = tmp_path / 'block_selection.json'
  result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'block_selection.py'), '--quick',
                           '--out', str(out)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  rows = json.loads(out.read_text())['rows']
  whats = ('xla', 'nsa', 'nsa_nowin', 'moba', 'infllm_v2')
  assert [(r['what'], r['direction']) for r in rows] == [(w, d) for w in whats for d in ('fwd', 'fwd+bwd')]
  for row in rows:
    assert row['ms'] > 0 and np.isfinite(row['vs_cudnn']) and not row['note'], row


@pytest.mark.slow  # a benchmark script's CPU smoke run (about a minute): bash scripts/test.sh -m slow
def test_decode_quick_run_measures_every_variant(tmp_path):
  out = tmp_path / 'decode.json'
  result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'decode.py'), '--quick', '--out', str(out)],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  rows = json.loads(out.read_text())['rows']
  assert [(r['variant'], r['batch']) for r in rows] == [(v, b) for v in ('dense', 'window', 'masformer', 'gated', 'sse_h')
                                                         for b in (1, 2)]
  for row in rows:
    assert 'error' not in row, row
    assert row['decode_tokens_per_s'] > 0 and row['cache_mib'] > 0 and row['forward_s'] > 0, row
    assert row['device_tokens_per_s'] > 0, row


@pytest.mark.parametrize('spec', ['power_blocks:64', 'power:64', 'neighborhood:256', 'neighborhood:100/3', 'fixed:128',
                                  'radial:256', 'bigbird:1', 'causal_window:300', 'random:0.2',
                                  'neighborhood2d:7/32', 'neighborhood2d:5/48', 'neighborhood3d:3/8x8',
                                  'neighborhood3d:5/6x10'])
def test_flex_block_mask_covers_exactly_our_plan(spec):
  """FlexAttention's BlockMask from our lists (full blocks whole, partial ones through the
  mask_mod) equals the plan's element mask. Needs torch (the GPU machine's image has it;
  skipped where it is absent); no GPU: the rules are evaluated on CPU index tensors."""
  torch = pytest.importorskip('torch')
  from benchmarks.attention_flex import flex_block_lists, flex_mask_mod
  from pallas_kernels.block_sparse_attention.plan import dense_mask
  length, block = 2048, 128
  plan = bench.make_plan(spec, length, block, heads=2)
  partial_count, partial_index, full_count, full_index = flex_block_lists(plan)
  index = torch.arange(length)
  rule = flex_mask_mod(spec)(0, 0, index[:, None], index[None, :]).numpy()
  tile = np.ones((block, block), bool)
  for head in range(plan.plan_heads):
    blocks = [np.zeros((length // block,) * 2, bool) for _ in range(2)]
    for row in range(length // block):
      blocks[0][row, partial_index[0, head, row, :partial_count[0, head, row]]] = True
      blocks[1][row, full_index[0, head, row, :full_count[0, head, row]]] = True
    flex = np.kron(blocks[1], tile) | (np.kron(blocks[0], tile) & rule)
    np.testing.assert_array_equal(flex, np.asarray(dense_mask(plan, 0, head)))


@pytest.mark.slow  # 17 s: two launches of a training process
def test_launch_time_quick_run_times_a_fresh_and_a_cached_launch(tmp_path):
  """Two train.py launches of a tiny model: the phases up to the first finished step, and
  jax's compile log read from the child's output."""
  out = tmp_path / 'launch.json'
  result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'launch_time.py'), '--quick',
                           '--scratch', str(tmp_path / 'scratch'), '--out', str(out)],
                          capture_output=True, text=True, timeout=600, env=child_env())
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
  launches = json.loads(out.read_text())['launches']
  assert [launch['kind'] for launch in launches] == ['fresh', 'cached']
  for launch in launches:
    phases = launch['phases_s']
    assert launch['exit_code'] == 0 and phases['total'] == pytest.approx(phases['setup'] + phases['step'])
    assert any(kind == 'XLA compilation' for _, kind, _ in launch['longest_jax'])
  assert 'first step after' in result.stdout


@pytest.mark.slow  # a benchmark script's CPU smoke run (15-40 s): bash scripts/test.sh -m slow
def test_hf_finetune_parallel_quick_run_has_a_row_per_preset(tmp_path):
  result = subprocess.run([sys.executable, os.path.join(REPO, 'benchmarks', 'hf_finetune.py'), '--quick', '--parallel',
                           '--variants', 'dense,masformer', '--source', os.path.join(REPO, 'tests', 'fixtures', 'hf', 'llama'),
                           '--out', str(tmp_path)], capture_output=True, text=True, timeout=300, env=child_env(), cwd=REPO)
  assert result.returncode == 0, result.stderr[-3000:]
  rows = json.loads((tmp_path / 'hf_finetune.json').read_text())['rows']
  assert [r['variant'] for r in rows] == ['dense', 'masformer'], rows
  for row in rows:
    assert row['step_ms'] > 0 and row['compile_s'] > 0 and row['fit_estimate_gib'] > 0, row
  assert rows[1]['layers'] == ['window:64', 'window:64']
  assert (tmp_path / 'device.lock').exists()  # the presets took turns through it
  assert 'compiled in' in (tmp_path / 'masformer.log').read_text()
