"""Attention mechanisms, one file each, selected by name through the registry."""

from sparseformer.model.attention.base import (AttentionContext, Mechanism, MechanismState, get_mechanism,
                                               mechanism_names, no_aux, register)
from sparseformer.model.attention import dense  # noqa: F401  (registers 'dense')

__all__ = ['AttentionContext', 'Mechanism', 'MechanismState', 'get_mechanism', 'mechanism_names', 'no_aux',
           'register']
