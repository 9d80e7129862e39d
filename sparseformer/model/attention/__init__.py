"""Attention mechanisms, one module each, selected by name through the registry.

Every module of this package is imported here, in name order, so that a new mechanism is
one new file whose class carries `@register('name')`: no list to edit."""

import importlib
import pkgutil

from sparseformer.model.attention.base import (AttentionContext, Mechanism, MechanismState, get_mechanism,
                                               mechanism_names, no_aux, register, split_spec)

for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
  importlib.import_module(f'{__name__}.{_module}')

__all__ = ['AttentionContext', 'Mechanism', 'MechanismState', 'get_mechanism', 'mechanism_names', 'no_aux',
           'register', 'split_spec']
