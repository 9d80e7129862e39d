"""The language model and its attention mechanisms."""

from sparseformer.model.dims import ModelDims, resolve_dims
from sparseformer.model.transformer import LanguageModel

__all__ = ['LanguageModel', 'ModelDims', 'resolve_dims']
