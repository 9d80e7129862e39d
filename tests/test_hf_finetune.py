"""configs/hf_finetune.py on an imported tiny model (tests/hf_fixtures.py): MASFormer and
gated fine-tuning runs a few steps from the imported weights, eval.py reads the result,
and export_hf writes it back with the RoPE scaling the fine-tune chose."""

import json
import os

import pytest

import hf_fixtures
from sparseformer.config import load_config_file
from sparseformer.interop.hf_import import import_model
from train_helpers import ROOT, run_script

CONFIG = os.path.join(ROOT, 'configs', 'hf_finetune.py')
SMALL = ['--config.data.name=sparseformer_text/tinyshakespeare', '--config.train.steps=2',
         '--config.train.global_batch_size=2', '--config.train.warmup_steps=1', '--config.train.log_every=1',
         '--config.train.eval_batches=1', '--config.checkpoint.every_steps=2', '--config.model.remat=none']


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf')
  hf_fixtures.write_model(root / 'source', 'qwen2')  # max_position_embeddings 256, no RoPE scaling
  import_model(str(root / 'source'), str(root / 'imported'), log=lambda *a: None)
  return root / 'imported'


def test_the_config_extends_rope_and_switches_mechanisms(imported):
  cfg = load_config_file(f'{CONFIG}:{imported},masformer,1024')
  assert (cfg.model.rope.scaling, cfg.model.rope.factor) == ('linear', 4.0)  # 1024 over 256
  assert (cfg.model.attention.kind, cfg.model.attention.full_layers) == ('window:128', 'every:4')
  assert cfg.init_from == str(imported) and cfg.model.qkv_bias and cfg.data.tokenizer.startswith('hf:')
  short = load_config_file(f'{CONFIG}:{imported},dense,256')
  assert short.model.rope.scaling == 'none' and short.model.attention.kind == 'dense'
  gated = load_config_file(f'{CONFIG}:{imported},gated')
  assert gated.train.trainable == '/block_gate/' and gated.data.seq_len == 8192
  for bad, message in ((f'{imported},sparse', "unknown preset 'sparse'"), (f'{imported},dense,long', 'length'),
                       (str(imported.parent / 'nothing'), 'holds no config.json')):
    with pytest.raises(Exception, match=message):
      load_config_file(f'{CONFIG}:{bad}')


@pytest.mark.time_limit(420)
@pytest.mark.parametrize('preset', ['masformer', pytest.param('gated', marks=pytest.mark.slow)])  # 25 s each
def test_fine_tune_an_imported_model_then_evaluate_and_export_it(tmp_path, imported, data_dir, preset):
  run = tmp_path / 'run'
  two_layers = ['--config.model.attention.full_layers=every:2'] if preset == 'masformer' else []  # a dense one
  done = run_script('train.py', ['--config', f'{CONFIG}:{imported},{preset},512', '--workdir', str(run),
                                 f'--config.data.data_dir={data_dir}', *two_layers, *SMALL], timeout=360)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'loaded' in done.stdout + done.stderr  # the init_from report
  evaluated = run_script('eval.py', ['--workdir', str(run), '--config.eval.max_batches=1'], timeout=240)
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert 'nll' in evaluated.stdout.lower()
  exported = run_script(os.path.join('sparseformer', 'cli', 'export_hf.py'),
                        ['--workdir', str(run), '--out', str(tmp_path / 'out')], timeout=240)
  assert exported.returncode == 0, exported.stderr[-3000:]
  config = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert config['architectures'] == ['Qwen2ForCausalLM']
  assert config['rope_scaling'] == {'rope_type': 'linear', 'factor': 2.0}  # 512 over 256
  description = json.loads((tmp_path / 'out' / 'sparseformer.json').read_text())
  assert description['layer_mechanisms'] == (['window:64', 'dense'] if preset == 'masformer' else ['gated'] * 2)
