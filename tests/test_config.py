"""Config files, overrides and validation: bad input is a clear UserError."""

import json
import os

import pytest

from sparseformer import config as config_lib
from sparseformer.cli.args import parse_args
from sparseformer.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, 'configs', 'default.py')


PRESETS = {'default.py': ['smoke'], 'masformer_small.py': ['window', 'dense'], 'long_finetune.py': ['window', 'dense'],
           'routing_books.py': ['local', 'dense'], 'dma_books.py': ['window', 'dense', 'budget'],
           'sse_hybrid.py': ['gla', 'dense', 'varlen'], 'mqar.py': ['quick']}


NEEDS_A_WORKDIR = {'hf_finetune.py'}  # its argument is an imported workdir: tests/test_hf_finetune.py


def test_every_shipped_config_and_preset_loads_and_validates():
  for name in sorted(os.listdir(os.path.join(ROOT, 'configs'))):
    if name.endswith('.py') and not name.startswith('_') and name not in NEEDS_A_WORKDIR:
      for preset in [''] + [f':{p}' for p in PRESETS.get(name, [])]:
        cfg = config_lib.load_config_file(os.path.join(ROOT, 'configs', name) + preset)
        config_lib.validate(cfg)


def test_unknown_preset_names_the_known_ones():
  with pytest.raises(UserError, match='unknown preset .*known: dense, window'):
    config_lib.load_config_file(os.path.join(ROOT, 'configs', 'masformer_small.py') + ':windw')


def test_override_is_parsed_with_the_field_type():
  cfg = config_lib.load_config_file(DEFAULT)
  config_lib.apply_overrides(cfg, {'train.lr': '1e-4', 'train.steps': '7', 'model.tie_embeddings': 'false',
                                   'data.tokenizer': 'byte', 'model.layer_attention': "('dense', 'dense', 'dense', 'dense')"})
  assert cfg.train.lr == 1e-4 and cfg.train.steps == 7 and cfg.model.tie_embeddings is False
  assert cfg.model.layer_attention == ('dense',) * 4


def test_unknown_key_names_the_closest_one():
  cfg = config_lib.load_config_file(DEFAULT)
  with pytest.raises(UserError, match=r"unknown config key 'train.lrr' \(did you mean 'train.lr'\?\)"):
    config_lib.apply_overrides(cfg, {'train.lrr': '1e-3'})


def test_wrong_type_is_an_error():
  cfg = config_lib.load_config_file(DEFAULT)
  with pytest.raises(UserError, match='expected int'):
    config_lib.apply_overrides(cfg, {'train.steps': 'many'})
  with pytest.raises(UserError, match='expected bool'):
    config_lib.apply_overrides(cfg, {'model.tie_embeddings': 'maybe'})


def test_config_file_with_an_unknown_field(tmp_path):
  path = tmp_path / 'bad.py'
  path.write_text('from sparseformer.config import base_config\n'
                  'def get_config(arg=None):\n  c = base_config()\n  c.model.d_modle = 3\n  return c\n')
  with pytest.raises(UserError, match="did you mean 'model.d_model'"):
    config_lib.load_config_file(str(path))


def test_unknown_preset_and_missing_file():
  with pytest.raises(UserError, match='unknown preset'):
    config_lib.load_config_file(DEFAULT + ':nope')
  with pytest.raises(UserError, match='not found'):
    config_lib.load_config_file('configs/absent.py')


@pytest.mark.parametrize('field,value,message', [
    ('model.num_heads', '3', 'not divisible'),
    ('model.num_kv_heads', '3', 'multiple of model.num_kv_heads'),
    ('model.attention.kind', 'dens', "did you mean 'dense'"),
    ('model.layer_attention', "('dense',)", 'entries for 4 layers'),
    ('train.grad_accum_steps', '5', 'not divisible by train.grad_accum_steps'),
    ('model.remat', 'some', 'use none, full or dots'),
    ('model.short_conv', '-1', r'use 0 \(none\) or a width of 1 to 16'),
    ('model.short_conv', '17', r'use 0 \(none\) or a width of 1 to 16'),
])
def test_validation_errors(field, value, message):
  cfg = config_lib.load_config_file(DEFAULT)
  config_lib.apply_overrides(cfg, {field: value})
  with pytest.raises(UserError, match=message):
    config_lib.validate(cfg)


def test_json_round_trip_keeps_types():
  cfg = config_lib.load_config_file(DEFAULT)
  config_lib.apply_overrides(cfg, {'model.layer_attention': "('dense', 'dense', 'dense', 'dense')"})
  restored = config_lib.from_json(config_lib.to_json(cfg), 'test')
  assert restored.to_dict() == cfg.to_dict()
  assert isinstance(restored.mesh.rules, tuple) and isinstance(restored.model.layer_attention, tuple)
  assert json.loads(config_lib.to_json(cfg))['format_version'] == config_lib.FORMAT_VERSION


def test_parse_args_forms():
  flags, overrides = parse_args(['--config', 'a.py:smoke', '--workdir=w', '--config.train.lr=1', '--config.seed', '3'])
  assert flags == {'config': 'a.py:smoke', 'workdir': 'w'}
  assert overrides == {'train.lr': '1', 'seed': '3'}
  with pytest.raises(UserError, match='unknown flag --wokdir'):
    parse_args(['--wokdir=x'])
  with pytest.raises(UserError, match='needs a value'):
    parse_args(['--workdir'])


def test_attention_backward_names_its_choices():
  cfg = config_lib.base_config()
  for choice in config_lib.ATTENTION_BACKWARDS:
    cfg.train.attention_backward = choice
    config_lib.validate(cfg)
  cfg.train.attention_backward = 'fast'
  with pytest.raises(UserError, match="train.attention_backward='fast': use one of default, deterministic, fused"):
    config_lib.validate(cfg)
