"""Synthetic long-context tasks: passkey retrieval, RULER's needle-in-a-haystack
variants, variable tracking and common words, and Zoology's multi-query associative
recall. Importing this package registers every generator.

    from sparseformer.evaluation import tasks
    example = tasks.make_example('niah_single:needle=uuid', tokenizer, 8192, seed=0, index=3, depth=0.5)
    encoded = tasks.encode(example, tokenizer)  # tokens, answer and needle spans
"""

from sparseformer.evaluation.tasks import common_words, mqar, niah, passkey, variable_tracking  # noqa: F401
from sparseformer.evaluation.tasks.base import (EncodedExample, Example, Piece, encode, make_example,
                                                parse_task_spec, task_names)

__all__ = ['EncodedExample', 'Example', 'Piece', 'encode', 'make_example', 'parse_task_spec', 'task_names']
