"""Decoded answers of the long-context tasks (`eval.task_decode`): each answer piece is
generated greedily by `sparseformer.generation` from the true text before it (earlier
answers included, as teacher forcing scores them) and compared with the answer.

Teacher forcing (task_eval.py) already gives greedy exact match from one forward pass;
decoding gives it through each layer's cache, as a user generating would. The two agree
but for ties in the argmax and float rounding between the kernels and the decode path:
the comparison checks a mechanism's decoding on real tasks.
"""

import numpy as np


def answer_requests(encoded_examples):
  """(example index, prompt tokens, answer tokens) for every answer piece, in order."""
  requests = []
  for index, example in enumerate(encoded_examples):
    tokens = np.asarray(example.tokens)
    for start, end in example.answer_spans:
      requests.append((index, tokens[:start].tolist(), tokens[start:end].tolist()))
  return requests


def decoded_exact(generate, encoded_examples, batch_size):
  """Per example, a list of bools: each answer piece decoded exactly. `generate(prompts,
  max_new_tokens) -> token lists` (greedy) runs `batch_size` prompts at a time."""
  requests = answer_requests(encoded_examples)
  pieces = [[] for _ in encoded_examples]
  for first in range(0, len(requests), batch_size):
    chunk = requests[first:first + batch_size]
    longest = max(len(answer) for _, _, answer in chunk)
    outputs = generate([prompt for _, prompt, _ in chunk], longest)
    for (index, _, answer), output in zip(chunk, outputs, strict=True):
      pieces[index].append(list(output[:len(answer)]) == answer)
  return pieces


def generator_fn(generator):
  """decoded_exact's `generate` of a sparseformer.generation.Generator (greedy, no stops)."""
  return lambda prompts, count: generator.generate(prompts, max_new_tokens=count).tokens
