"""Command-line parsing shared by train and eval.

    --config PATH[:ARG]     a config file (train); eval reads workdir/config.json
    --config.a.b=VALUE      set one field, parsed with the field's type
    --workdir DIR
"""

from sparseformer.errors import UserError


def parse_args(argv, *, allowed=('config', 'workdir')):
  """argv (without the program name) -> ({'config': ..., 'workdir': ...}, {'a.b': 'text'})."""
  flags, overrides = {}, {}
  items = list(argv)
  while items:
    item = items.pop(0)
    if item in ('-h', '--help'):
      flags['help'] = True
      continue
    if not item.startswith('--'):
      raise UserError(f'unexpected argument {item!r}; flags look like --name=value')
    name, has_value, value = item[2:].partition('=')
    if not has_value:
      if not items or items[0].startswith('--'):
        raise UserError(f'--{name} needs a value')
      value = items.pop(0)
    if name.startswith('config.'):
      overrides[name[len('config.'):]] = value
    elif name in allowed:
      flags[name] = value
    else:
      raise UserError(f'unknown flag --{name}; known: ' + ', '.join(f'--{a}' for a in allowed) + ', --config.FIELD')
  return flags, overrides


def describe_fields(cfg):
  """One line per config field with its current value (for --help), and the doc of each
  mechanism option."""
  from sparseformer.config import flatten
  from sparseformer.model.attention.base import option_docs
  docs = option_docs()
  return '\n'.join(f'  --config.{key}={value!r}' + (f'  # {docs[key]}' if key in docs else '')
                   for key, value in flatten(cfg).items())
