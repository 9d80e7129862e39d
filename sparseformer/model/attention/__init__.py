"""Attention mechanisms, one file each, selected by name through the registry."""

from sparseformer.model.attention.base import (AttentionContext, Mechanism, MechanismState, get_mechanism,
                                               mechanism_names, no_aux, register, split_spec)
from sparseformer.model.attention import dense, gated, local  # noqa: F401  (register 'dense', 'gated', 'window', 'block_local')
from sparseformer.model.attention import dynamic_mask  # noqa: F401  (registers 'dynamic_mask')
from sparseformer.model.attention import routing  # noqa: F401  (registers 'routing')
from sparseformer.model.attention import sse  # noqa: F401  (registers 'sse')

__all__ = ['AttentionContext', 'Mechanism', 'MechanismState', 'get_mechanism', 'mechanism_names', 'no_aux',
           'register', 'split_spec']
