"""python -m sparseformer.cli.export_hf (sparseformer/interop/hf_export.py): import ->
export gives back every tensor bit for bit and the same config.json; shards; a run
trained here exports as Llama; mechanism parameters go to the documented side files."""

import json
import os

import numpy as np
import pytest

import hf_fixtures
import reference_lm
from sparseformer.cli.eval import load_run_config
from sparseformer.errors import UserError
from sparseformer.interop import safetensors
from sparseformer.interop.hf_export import EXTRA_FILE, MECHANISM_FILE, export_model
from sparseformer.interop.hf_import import import_model

QUIET = {'log': lambda *a: None}


@pytest.mark.parametrize('family,shards', [('llama', 1), ('mistral', 1), ('qwen2', 2), ('qwen3', 1)])
def test_import_then_export_gives_back_the_same_bits(tmp_path, family, shards):
  hf, tensors = hf_fixtures.write_model(tmp_path / 'source', family, shards=shards)
  import_model(str(tmp_path / 'source'), str(tmp_path / 'run'), **QUIET)
  report = export_model(str(tmp_path / 'run'), load_run_config(str(tmp_path / 'run')), str(tmp_path / 'out'),
                        max_shard_bytes=40_000 if shards > 1 else 5 << 30, **QUIET)
  exported = safetensors.SafetensorsModel(str(tmp_path / 'out'))
  assert sorted(exported.keys()) == sorted(tensors)
  for name, array in tensors.items():
    got = exported.read(name)
    assert got.dtype == array.dtype and got.shape == array.shape and got.tobytes() == array.tobytes(), name
  assert json.loads((tmp_path / 'out' / 'config.json').read_text()) == hf
  assert (len(report['files']) > 1) == (shards > 1)
  assert os.path.isfile(tmp_path / 'out' / 'tokenizer.json') and not report['extra']
  description = json.loads((tmp_path / 'out' / MECHANISM_FILE).read_text())
  assert description['layer_mechanisms'] == (['window:8'] * 2 if family == 'mistral' else ['dense'] * 2)


def test_a_changed_rope_scaling_is_written_into_the_config(tmp_path):
  hf, _ = hf_fixtures.write_model(tmp_path / 'source', 'qwen2')
  import_model(str(tmp_path / 'source'), str(tmp_path / 'run'), **QUIET)
  cfg = load_run_config(str(tmp_path / 'run'))
  cfg.model.rope.scaling, cfg.model.rope.factor = 'linear', 4.0  # as a long-context fine-tune sets it
  export_model(str(tmp_path / 'run'), cfg, str(tmp_path / 'out'), **QUIET)
  written = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert written == {**hf, 'rope_scaling': {'rope_type': 'linear', 'factor': 4.0}, 'rope_theta': hf['rope_theta']}
  cfg.model.rope.scaling = 'yarn'
  cfg.model.rope.original_seq_len = 64
  with pytest.raises(UserError, match="rope.scaling='yarn' has no transformers equivalent"):
    export_model(str(tmp_path / 'run'), cfg, str(tmp_path / 'out2'), **QUIET)


def test_a_model_with_a_short_convolution_is_not_exported(tmp_path):
  hf_fixtures.write_model(tmp_path / 'source', 'llama')
  import_model(str(tmp_path / 'source'), str(tmp_path / 'run'), **QUIET)
  cfg = load_run_config(str(tmp_path / 'run'))
  cfg.model.short_conv = 4
  with pytest.raises(UserError, match='model.short_conv=4: .*cannot be exported to transformers'):
    export_model(str(tmp_path / 'run'), cfg, str(tmp_path / 'out'), **QUIET)
  assert not (tmp_path / 'out').exists()


def test_a_model_trained_here_exports_as_llama_with_its_gates_beside(tmp_path, data_dir):
  """A tiny gated run (byte tokenizer, no source config) -> a LlamaForCausalLM directory,
  and the gate parameters in the side file."""
  from train_helpers import run_script, tiny_argv
  workdir = tmp_path / 'run'
  done = run_script('train.py', tiny_argv(workdir, data_dir, model__attention__kind='gated', train__steps=2,
                                          model__attention__block_size=64, model__attention__gate__width=16,
                                          data__seq_len=128), timeout=240)
  assert done.returncode == 0, done.stderr[-2000:]
  cfg = load_run_config(str(workdir))
  report = export_model(str(workdir), cfg, str(tmp_path / 'out'), **QUIET)
  hf = json.loads((tmp_path / 'out' / 'config.json').read_text())
  assert hf['architectures'] == ['LlamaForCausalLM'] and hf['hidden_size'] == 32 and report['dtype'] == 'float32'
  side = safetensors.SafetensorsFile(str(tmp_path / 'out' / EXTRA_FILE))
  assert report['extra'] and all(name.startswith(('params/blocks/', 'mechanism_state/')) for name in side.keys())
  assert any('gate' in name for name in side.keys())
  description = json.loads((tmp_path / 'out' / MECHANISM_FILE).read_text())
  assert description['layer_mechanisms'] == ['gated', 'gated'] and 'compute differently' in description['note']
  weights = safetensors.SafetensorsModel(str(tmp_path / 'out'))
  tensors = {name: weights.read(name) for name in weights.keys()}
  logits = reference_lm.hf_logits(tensors, hf, np.arange(3, 40))
  assert np.isfinite(logits).all() and logits.shape == (37, hf['vocab_size'])


def test_exporting_into_a_non_empty_directory_is_refused(tmp_path):
  hf_fixtures.write_model(tmp_path / 'source', 'llama')
  import_model(str(tmp_path / 'source'), str(tmp_path / 'run'), **QUIET)
  (tmp_path / 'out').mkdir()
  (tmp_path / 'out' / 'keep.txt').write_text('x')
  with pytest.raises(UserError, match='is not empty: export into a new directory'):
    export_model(str(tmp_path / 'run'), load_run_config(str(tmp_path / 'run')), str(tmp_path / 'out'), **QUIET)


MESH_SCRIPT = '''
import json, sys
from sparseformer.cli.eval import load_run_config
from sparseformer.interop.hf_export import export_model
from sparseformer.interop.hf_import import import_model
source, run, out = json.loads(sys.argv[1])
import_model(source, run, {'mesh.data': '2', 'mesh.fsdp': '2', 'mesh.tensor': '2'}, log=lambda *a: None)
cfg = load_run_config(run)
export_model(run, cfg, out, log=lambda *a: None)
print('RESULTS ' + json.dumps(list(cfg.mesh.items())))
'''


@pytest.mark.time_limit(300)
def test_import_and_export_on_a_sharded_mesh_keep_the_bits(tmp_path):
  from mesh_helpers import results_on_8_cpu_devices
  hf, tensors = hf_fixtures.write_model(tmp_path / 'source', 'qwen3')
  mesh = results_on_8_cpu_devices(MESH_SCRIPT, [str(tmp_path / 'source'), str(tmp_path / 'run'), str(tmp_path / 'out')])
  assert dict(mesh)['fsdp'] == 2 and dict(mesh)['tensor'] == 2
  exported = safetensors.SafetensorsModel(str(tmp_path / 'out'))
  for name, array in tensors.items():
    assert exported.read(name).tobytes() == array.tobytes(), name
