"""Generation: prefill a batch of prompts, then decode one token per row at a time through
each layer's cache (model/attention: every mechanism's init_cache, prefill and decode)."""

from sparseformer.generation.generate import Generation, Generator, generate
from sparseformer.generation.sampling import Sampling

__all__ = ['Generation', 'Generator', 'Sampling', 'generate']
