"""TFDS dataset `sparseformer_text`: the text corpora shipped in sparseformer/data/corpora."""

from sparseformer.data.sparseformer_text.sparseformer_text_dataset_builder import Builder

__all__ = ['Builder']
