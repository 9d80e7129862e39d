"""Attention mechanisms, one file each, selected by name through the registry."""

from sparseformer.model.attention.base import (AttentionContext, Mechanism, MechanismState, get_mechanism,
                                               mechanism_names, no_aux, register, split_spec)
from sparseformer.model.attention import dense, gated, local  # noqa: F401  (register 'dense', 'gated', 'window', 'block_local')

__all__ = ['AttentionContext', 'Mechanism', 'MechanismState', 'get_mechanism', 'mechanism_names', 'no_aux',
           'register', 'split_spec']
