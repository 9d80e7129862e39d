"""Renamed config fields: the old name keeps working, with one warning per name naming
the new one, wherever it is used: a config file (through an alias field), an override or
preset (`--config.old=v`), a comparison arm, or a saved config.json.
"""

import re
import sys

import ml_collections

from sparseformer.errors import UserError

RENAMED = {  # old path -> new path
    'model.attention.full_layers': 'model.attention.alternate_layers',
    'model.attention.full_kind': 'model.attention.alternate_kind',
}
_warned = set()


def add_aliases(cfg):
  """Each old name as an alias of its new field (reading or setting either is the same
  field), so that config files that set the old names keep working. Aliases are not
  fields of the schema (`flatten` leaves them out) but are written to config.json beside
  the new names, for scripts that read them."""
  for old, new in RENAMED.items():
    *parents, old_leaf = old.split('.')
    node = cfg
    for part in parents:
      node = node[part]
    node[old_leaf] = node.get_ref(new.rpartition('.')[2])


def is_alias(key):
  """Whether a flattened key (of the root config or a part of it) is an old name."""
  return any(old == key or old.endswith('.' + key) for old in RENAMED)


def renamed(key, origin):
  """The current name of a config key; an old name is mapped with one warning per name."""
  if key not in RENAMED:
    return key
  if key not in _warned:
    _warned.add(key)
    print(f'warning: {origin}: {key} is renamed {RENAMED[key]}; the old name works for now', file=sys.stderr)
  return RENAMED[key]


def warn_in_source(path):
  """One warning per old name that the config file at `path` mentions (a config file sets
  fields through the aliases, which cannot tell which name was used)."""
  try:
    with open(path) as handle:
      source = handle.read()
  except OSError:
    return
  for old in RENAMED:
    if re.search(r'\b' + re.escape(old.rpartition('.')[2]) + r'\b', source):
      renamed(old, path)


def saved_fields(config_dict, origin):
  """{'a.b': value} of a saved config, old names mapped: a config.json written before a
  rename has only the old name; one written since has both, equal."""
  flat = flatten_dict(config_dict)
  saved = {}
  for key, value in flat.items():
    new = RENAMED.get(key)
    if new is None:
      saved.setdefault(key, value)
    elif new not in flat:
      saved[renamed(key, origin)] = value
    elif flat[new] != value:
      raise UserError(f'{origin}: {key}={value!r} and {new}={flat[new]!r} disagree; {key} is the old name of '
                      f'{new}: remove it')
  return saved


def flatten_dict(tree, prefix='', skip=None):
  """Nested dicts or ConfigDicts -> {'a.b': value}, leaving out the names `skip` accepts
  (none by default: saved files are read whole)."""
  out = {}
  for key, value in tree.items():
    name = f'{prefix}{key}'
    if skip is not None and skip(name):
      continue
    if isinstance(value, (dict, ml_collections.ConfigDict)):
      out.update(flatten_dict(value, name + '.', skip))
    else:
      out[name] = value
  return out
