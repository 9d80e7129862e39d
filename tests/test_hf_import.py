"""python -m sparseformer.cli.import_hf (sparseformer/interop/hf_import.py) on tiny model
directories of each family written by tests/hf_fixtures.py: the imported model's logits
against tests/reference_lm.hf_logits (transformers' computation from its own tensor
names and layouts), shards, and every refusal before anything is written."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_fixtures
import reference_lm
from sparseformer import config as config_lib
from sparseformer import data, sharding
from sparseformer.cli.eval import load_run_config
from sparseformer.errors import UserError
from sparseformer.interop.hf_import import import_model
from sparseformer.model import resolve_dims
from sparseformer.training.checkpoint import Checkpointer
from sparseformer.training.state import abstract_model_arrays, model_spec

LENGTH = 24


def imported_model(workdir):
  """(model, config) restored from an imported workdir as eval.py restores it."""
  cfg = load_run_config(str(workdir))
  dims = resolve_dims(cfg.model, data.make_tokenizer(cfg.data.tokenizer).vocab_size)
  spec = model_spec(dims, sharding.make_mesh(cfg.mesh), tuple(cfg.mesh.rules))
  checkpointer = Checkpointer(os.path.join(workdir, 'checkpoints'), keep=1, async_save=False, read_only=True)
  try:
    arrays = checkpointer.restore_model(0, abstract_model_arrays(spec))
  finally:
    checkpointer.close()
  params = nnx.State(arrays['params'])
  mechanism_state = nnx.State(arrays['mechanism_state'])
  return nnx.merge(spec.graphdef, params, mechanism_state), cfg


def logits_of(model, tokens):
  out, _ = model(jnp.asarray(tokens[None], jnp.int32), jnp.arange(len(tokens), dtype=jnp.int32)[None], None)
  return np.asarray(out[0], np.float64)


@pytest.mark.parametrize('family', list(hf_fixtures.FAMILIES))
def test_an_imported_model_computes_what_transformers_computes(tmp_path, family):
  hf, tensors = hf_fixtures.write_model(tmp_path / 'source', family)
  report = import_model(str(tmp_path / 'source'), str(tmp_path / 'run'), {'model.dtype': 'float32'}, log=lambda *a: None)
  assert report['architecture'] == hf['architectures'][0] and report['tensors'] == len(tensors)
  model, cfg = imported_model(tmp_path / 'run')
  tokens = np.random.default_rng(1).integers(3, hf['vocab_size'], LENGTH)
  want = reference_lm.hf_logits(tensors, hf, tokens)
  # float32 compute against float64: relative to the logits' scale
  np.testing.assert_allclose(logits_of(model, tokens), want, rtol=0, atol=2e-4 * np.abs(want).max())
  assert cfg.model.attention.kind == ('window:8' if family == 'mistral' else 'dense')
  assert cfg.data.tokenizer == f'hf:{os.path.abspath(tmp_path / "run" / "hf")}'
  assert json.loads((tmp_path / 'run' / 'hf' / 'config.json').read_text()) == hf
  tokenizer = data.make_tokenizer(cfg.data.tokenizer)
  assert (tokenizer.bos_id is None) == (family in ('qwen2', 'qwen3'))


def test_sharded_checkpoints_and_the_cli(tmp_path):
  from sparseformer.cli.import_hf import main
  hf, tensors = hf_fixtures.write_model(tmp_path / 'source', 'qwen2', shards=3)
  with pytest.raises(SystemExit) as done:
    main(['--model_dir', str(tmp_path / 'source'), '--workdir', str(tmp_path / 'run'),
          '--config.model.dtype=float32'])
  assert done.value.code == 0
  model, _ = imported_model(tmp_path / 'run')
  tokens = np.arange(3, 3 + LENGTH)
  want = reference_lm.hf_logits(tensors, hf, tokens)
  np.testing.assert_allclose(logits_of(model, tokens), want, rtol=0, atol=2e-4 * np.abs(want).max())


def test_training_in_the_imported_workdir_is_refused_with_the_way_to_fine_tune(tmp_path):
  from sparseformer.training.trainer import check_resumable
  hf_fixtures.write_model(tmp_path / 'source', 'llama')
  import_model(str(tmp_path / 'source'), str(tmp_path / 'run'), log=lambda *a: None)
  with pytest.raises(UserError, match=r'holds a model imported from .*source .*--config.init_from=.*run'):
    check_resumable(str(tmp_path / 'run' / 'checkpoints'), 0, None, None)


def refused(tmp_path, message, overrides=None, **changes):
  source = tmp_path / 'source'
  hf_fixtures.write_model(source, changes.pop('family', 'llama'), **changes)
  return source, pytest.raises(UserError, match=message)


@pytest.mark.parametrize('change,message', [
    ({'architectures': ['GPT2LMHeadModel']}, r"architectures \['GPT2LMHeadModel'\] are not supported; .*LlamaForCausalLM"),
    ({'hidden_act': 'gelu'}, r"hidden_act 'gelu': sparseformer's MLP is SwiGLU"),
    ({'mlp_bias': True}, 'mlp_bias true'),
    ({'rope_scaling': {'rope_type': 'yarn', 'factor': 4.0, 'original_max_position_embeddings': 32}},
     "rope_scaling 'yarn' is not imported"),
    ({'rope_scaling': {'rope_type': 'dynamic', 'factor': 2.0}}, "rope_scaling 'dynamic' is not imported"),
    ({'family': 'qwen2', 'use_sliding_window': True}, 'sliding windows on some layers .* are not imported'),
    ({'layer_types': ['full_attention', 'sliding_attention']}, 'sliding windows on some layers'),
])
def test_unsupported_configs_are_one_line_errors_before_anything_is_written(tmp_path, change, message):
  family = change.pop('family', 'llama') if 'family' in change else 'llama'
  hf_fixtures.write_model(tmp_path / 'source', family)
  config_path = tmp_path / 'source' / 'config.json'
  config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **change}))
  with pytest.raises(UserError, match=message):
    import_model(str(tmp_path / 'source'), str(tmp_path / 'run'), log=lambda *a: None)
  assert not (tmp_path / 'run').exists()


def test_missing_misshapen_or_extra_tensors_are_named(tmp_path):
  from sparseformer.interop import safetensors
  hf, tensors = hf_fixtures.write_model(tmp_path / 'source', 'llama')
  weights = tmp_path / 'source' / 'model.safetensors'

  def rewrite(changed):
    safetensors.write_file(weights, changed)
    with pytest.raises(UserError) as error:
      import_model(str(tmp_path / 'source'), str(tmp_path / 'run'), log=lambda *a: None)
    assert not (tmp_path / 'run').exists()
    return str(error.value)
  without = {k: v for k, v in tensors.items() if k != 'model.layers.1.mlp.up_proj.weight'}
  assert 'lacks 1 tensors the model needs: model.layers.1.mlp.up_proj.weight' in rewrite(without)
  wrong = {**tensors, 'model.layers.0.self_attn.k_proj.weight': tensors['model.layers.0.self_attn.q_proj.weight']}
  assert 'tensor model.layers.0.self_attn.k_proj.weight: shape (64, 64), the config says (32, 64)' in rewrite(wrong)
  extra = {**tensors, 'model.layers.0.self_attn.rotary_emb.inv_freq': np.zeros(8, np.float32),
           'model.layers.0.mlp.extra_proj.weight': np.zeros((2, 2), np.float32)}
  assert 'have no place in the model: model.layers.0.mlp.extra_proj.weight' in rewrite(extra)


def test_a_non_empty_workdir_or_a_directory_without_weights_is_refused(tmp_path):
  hf_fixtures.write_model(tmp_path / 'source', 'llama')
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'notes.txt').write_text('keep me')
  with pytest.raises(UserError, match='is not empty: import into a new directory'):
    import_model(str(tmp_path / 'source'), str(tmp_path / 'run'), log=lambda *a: None)
  assert (tmp_path / 'run' / 'notes.txt').read_text() == 'keep me'
  os.remove(tmp_path / 'source' / 'model.safetensors')
  with pytest.raises(UserError, match='no model.safetensors or model.safetensors.index.json'):
    import_model(str(tmp_path / 'source'), str(tmp_path / 'other'), log=lambda *a: None)
  with pytest.raises(UserError, match='no config.json'):
    import_model(str(tmp_path), str(tmp_path / 'other'), log=lambda *a: None)
  assert config_lib  # the module is used by the CLI test through load_run_config


def test_transformers_5_rope_parameters_are_read_like_rope_scaling(tmp_path):
  hf, tensors = hf_fixtures.write_model(tmp_path / 'source', 'llama')
  v5 = {k: v for k, v in hf.items() if k not in ('rope_theta', 'rope_scaling')}
  v5['rope_parameters'] = {**hf['rope_scaling'], 'rope_theta': hf['rope_theta']}
  (tmp_path / 'source' / 'config.json').write_text(json.dumps(v5))
  import_model(str(tmp_path / 'source'), str(tmp_path / 'run'), {'model.dtype': 'float32'}, log=lambda *a: None)
  model, cfg = imported_model(tmp_path / 'run')
  assert (cfg.model.rope.scaling, cfg.model.rope.factor, cfg.model.rope.theta) == ('llama3', 8.0, 500000.0)
  tokens = np.arange(3, 3 + LENGTH)
  want = reference_lm.hf_logits(tensors, hf, tokens)
  np.testing.assert_allclose(logits_of(model, tokens), want, rtol=0, atol=2e-4 * np.abs(want).max())
