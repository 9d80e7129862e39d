"""Every shipped config file loads and validates with every preset it has, and names every
one in its docstring (`:preset`, or `file.py:preset` in a launch command): the run
configs of configs/*.py, every arm of the comparison suites of configs/compare/*.py, and
configs/hf_finetune.py (whose argument is an imported workdir) on an imported tiny model
with every preset of its table. A file's presets are those its error for an unknown one
lists ('known: a, b'; none for 'this config has none')."""

import ast
import json
import os
import re

import pytest

import hf_fixtures
from sparseformer import config as config_lib, renamed_fields
from sparseformer.cli import compare
from sparseformer.errors import UserError
from sparseformer.interop.hf_import import import_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(ROOT, 'configs')
SUITES = os.path.join(CONFIGS, 'compare')
NEEDS_A_WORKDIR = 'hf_finetune.py'


def docstring(path):
  with open(path) as handle:
    return ast.get_docstring(ast.parse(handle.read())) or ''


def docstring_presets(path):
  """The presets a config file's docstring names: `:name` after a non-word character, or
  `.py:name` in a launch command (some may be other files', named in the prose)."""
  doc = docstring(path)
  return set(re.findall(r'(?<!\w):([a-z0-9][\w-]*)', doc)) | set(re.findall(r'\.py:([a-z0-9][\w-]*)', doc))


def known_presets(load, path):
  """The presets of the file at `path`, from the error `load` raises for an unknown one."""
  with pytest.raises(UserError, match='unknown preset') as error:
    load(f'{path}:no-such-preset')
  known = re.search(r'known: (.*)', str(error.value))
  return known.group(1).split(', ') if known else []


def shipped(folder, load):
  """(file name, preset or '') of every config file in `folder` and each of its presets."""
  names = sorted(n for n in os.listdir(folder) if n.endswith('.py') and not n.startswith('_') and n != NEEDS_A_WORKDIR)
  return [(name, preset) for name in names for preset in [''] + known_presets(load, os.path.join(folder, name))]


def load_suite(spec):
  return compare.load_suite(spec, {})


def with_preset(folder, name, preset):
  path = os.path.join(folder, name)
  assert not preset or preset in docstring_presets(path), f'{name}: preset {preset!r} is not named in the docstring'
  return path + (f':{preset}' if preset else '')


@pytest.mark.parametrize('name,preset', shipped(CONFIGS, config_lib.load_config_file))
def test_every_run_config_and_preset_loads_and_validates(name, preset):
  config_lib.validate(config_lib.load_config_file(with_preset(CONFIGS, name, preset)))


@pytest.mark.parametrize('name,preset', shipped(SUITES, load_suite))
def test_every_suite_and_preset_loads_and_every_arm_validates(name, preset):
  suite = load_suite(with_preset(SUITES, name, preset))
  config_lib.validate(suite.run)
  for arm, changes in suite.arms:
    compare.arm_config(suite.run, arm, changes)  # validates, naming the arm


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
  root = tmp_path_factory.mktemp('hf')
  hf_fixtures.write_model(root / 'source', 'qwen2')
  import_model(str(root / 'source'), str(root / 'imported'), log=lambda *a: None)
  return root / 'imported'


def test_hf_finetune_loads_and_validates_with_every_preset(imported):
  path = os.path.join(CONFIGS, NEEDS_A_WORKDIR)
  from importlib.util import module_from_spec, spec_from_file_location
  spec = spec_from_file_location('hf_finetune_config', path)
  module = module_from_spec(spec)
  spec.loader.exec_module(module)
  for preset in module.PRESETS:  # its docstring lists them in a table
    assert re.search(rf'^\s+(\(none\) or )?{preset}\s', docstring(path), re.MULTILINE), preset
    config_lib.validate(config_lib.load_config_file(f'{path}:{imported},{preset},1024'))


# ---------------------------------------------------------------------------------------
# Renamed fields: model.attention.full_layers / full_kind -> alternate_layers / alternate_kind


@pytest.fixture
def warnings_shown(monkeypatch, capsys):
  """The rename warnings printed from here on (each old name warns once per process)."""
  monkeypatch.setattr(renamed_fields, '_warned', set())
  return lambda: [line for line in capsys.readouterr().err.splitlines() if 'is renamed' in line]


def test_old_names_in_overrides_map_to_the_new_fields_with_one_warning_each(warnings_shown):
  cfg = config_lib.base_config()
  config_lib.apply_overrides(cfg, {'model.attention.full_layers': 'every:2', 'model.attention.full_kind': 'window:64'})
  config_lib.apply_overrides(cfg, {'model.attention.full_layers': 'top:1'})
  assert (cfg.model.attention.alternate_layers, cfg.model.attention.alternate_kind) == ('top:1', 'window:64')
  assert warnings_shown() == [
      'warning: --config: model.attention.full_layers is renamed model.attention.alternate_layers; '
      'the old name works for now',
      'warning: --config: model.attention.full_kind is renamed model.attention.alternate_kind; the old name works for now']


def test_a_config_file_that_sets_the_old_names_loads_and_warns(tmp_path, warnings_shown):
  path = tmp_path / 'old.py'
  path.write_text('from sparseformer.config import base_config\n\n\ndef get_config(arg=None):\n'
                  '  c = base_config()\n  c.model.attention.kind = "window:64"\n'
                  '  c.model.attention.full_layers = "every:2"\n  return c\n')
  cfg = config_lib.load_config_file(str(path))
  config_lib.validate(cfg)
  assert cfg.model.attention.alternate_layers == 'every:2' and cfg.model.attention.full_layers == 'every:2'
  assert len(warnings_shown()) == 1
  assert 'model.attention.full_layers' not in config_lib.flatten(cfg)  # not a field of the schema


def test_saved_configs_old_and_new_load(warnings_shown):
  cfg = config_lib.base_config()
  cfg.model.attention.alternate_layers, cfg.model.attention.alternate_kind = 'every:3', 'routing:4'
  saved = json.loads(config_lib.to_json(cfg))
  attention = saved['config']['model']['attention']
  assert (attention['full_layers'], attention['full_kind']) == ('every:3', 'routing:4')  # for readers of the file
  assert config_lib.from_json(json.dumps(saved), 'new').model.attention.alternate_kind == 'routing:4'
  assert warnings_shown() == []
  del attention['alternate_layers'], attention['alternate_kind']  # a workdir written before the rename
  old = config_lib.from_json(json.dumps(saved), 'old/config.json')
  assert (old.model.attention.alternate_layers, old.model.attention.alternate_kind) == ('every:3', 'routing:4')
  assert len(warnings_shown()) == 2
  attention['alternate_kind'] = 'dense'
  with pytest.raises(UserError, match='disagree'):
    config_lib.from_json(json.dumps(saved), 'edited')
